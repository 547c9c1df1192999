"""Continuous batching on one device: page tables over a fixed pool, chunked prefill, preemption.

One asyncio task per device runs `step()` in a loop. Each step decodes one token for every running
sequence and spends a token budget on prefill for new or partially prefilled sequences, in one `mixed`
program call when both are there (the decoding sequences wait for no prefill call of its own), else in
`decode_bs{N}` (bucketed to the compiled batch sizes) or `prefill_bs{N}`. With speculation on, a step that
decodes few sequences and prefills none verifies prompt-lookup drafts (core.speculative) in one `score`
call and may give a sequence several tokens. The device calls run in a worker thread, so HTTP keeps flowing.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from models.abi import ModelABI

from .detokenizer import IncrementalDetokenizer, StopMatcher
from .guide import mask_words
from .kv_pages import PagePool
from .runner import Runner
from .sampling import Sampled, Sampler, SamplingParams, scored
from .speculative import SpecConfig, propose

log = logging.getLogger("aotllm.scheduler")


@dataclass
class Event:
    """What a request's stream receives: new text and tokens, and the finish when it comes."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Sampled] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: str | None = None
    embedding: np.ndarray | None = None  # an embedding request's pooled, L2-normalised vector
    # with the first token, when asked (SamplingParams.prompt_logprobs): one entry per prompt token, None for the first
    prompt_logprobs: list[Sampled | None] | None = None


@dataclass
class Sequence:
    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    sampler: Sampler
    detok: IncrementalDetokenizer
    stops: StopMatcher
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    output_ids: list[int] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)
    computed: int = 0  # tokens whose K/V are in the cache
    cached_tokens: int = 0  # prompt tokens the prefix cache held when the sequence was admitted
    finish_reason: str | None = None
    cancelled: bool = False
    pooling: str | None = None  # "mean" | "last": an embedding request (prefill only, no tokens out)
    pooled: np.ndarray | None = None  # running sum (mean) or last hidden state of what is prefilled
    arrival: float = field(default_factory=time.monotonic)
    order: int = field(default_factory=itertools.count().__next__)
    draft: list[int] = field(default_factory=list)  # this step's speculative tokens (after the pending one)
    draft_misses: int = 0  # verifications in a row that kept no drafted token
    draft_pause: int = 0  # steps left without drafting (backs off 2, 4, ... 16 steps after misses)
    prompt_logprobs: list[Sampled | None] = field(default_factory=lambda: [None])  # when asked: per prompt token

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def prefill_target(self) -> int:
        """Tokens to prefill: the prompt, or after a preemption everything but the pending token."""
        return len(self.prompt_ids) if not self.output_ids else len(self.tokens) - 1

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class Counters:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    preemptions: int = 0
    steps: int = 0
    step_seconds: float = 0.0  # wall time of the steps that ran the program
    device_seconds: float = 0.0  # of which inside the program's calls (the rest is host work)
    mixed_steps: int = 0  # steps that decoded and prefilled in one call
    draft_tokens: int = 0  # speculative tokens verified
    accepted_tokens: int = 0  # of which kept


# Prefill tokens per step while sequences decode: long prompts go in chunks this size, so a decoding
# sequence waits at most one chunk between two of its tokens. On 2 CPU cores a prompt token costs about what
# a decode row does, so a step with a chunk of C tokens beside 16 decoding streams costs about (16 + C) / 16
# of a decode step: 32 keeps the gap between tokens within 1.4x its median under arrivals, where 64 gave up
# to 3.5x and 128 up to 9x, for the same output tok/s; the time to first token is what it costs
# (docs/benchmarks.md, steady streams).
PREFILL_CHUNK = 32
# ... and while none decodes: nobody waits between tokens, and fewer, larger chunks read the weights fewer
# times (a 4096-token prompt's TTFT ~12 % shorter in 256-token chunks; 512 gains ~2 % more but doubles
# what a newly arriving request waits for the chunk in flight: docs/benchmarks.md).
IDLE_PREFILL_CHUNK = 256
# Guided sequences in a device call from which their masks are computed on a thread beside it.
MASK_THREAD_MIN = 4


class Scheduler:
    def __init__(
        self,
        runner: Runner,
        pool: PagePool,
        abi: ModelABI,
        eos_ids: list[int],
        max_running: int = 16,
        max_tokens_per_step: int = PREFILL_CHUNK,
        device_index: int = 0,
        mixed_step: bool = True,
        speculative: SpecConfig | None = None,
    ):
        self.runner, self.pool, self.abi = runner, pool, abi
        self.page_size = abi.block_seq_stride
        self.eos_ids = set(eos_ids)
        self.max_running = max_running
        self.max_tokens_per_step = max(max_tokens_per_step, self.page_size)
        self.device_index = device_index
        self.mixed_step = mixed_step and abi.has_mixed
        # (a --top-k program's decode sampling differs from a full row's; such programs do not speculate)
        self.speculative = speculative if abi.has_score and not abi.top_k else None
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.counters = Counters()
        self._wake = asyncio.Event()
        self._mask_thread: ThreadPoolExecutor | None = None  # guided sequences' masks, beside the device call

    # -- requests
    def add(self, seq: Sequence) -> None:
        self.counters.prompt_tokens += len(seq.prompt_ids)
        self.waiting.append(seq)
        self._wake.set()

    @property
    def load(self) -> int:
        return len(self.waiting) + len(self.running)

    async def run_forever(self) -> None:
        while True:
            if not self.waiting and not self.running:
                self._wake.clear()
                await self._wake.wait()
            try:
                await self.step()
            except Exception:  # a failed device call fails its batch, never the server
                log.exception("step failed")
                for seq in self.running + self.waiting:
                    self._finish(seq, "error", error="the model's program failed (details in the server log)")
                self.running, self.waiting = [], []

    # -- one step
    async def step(self) -> None:
        self.counters.steps += 1
        for seq in [s for s in self.running + self.waiting if s.cancelled]:
            self._finish(seq, "cancelled")
        decode, prefill = self._plan()
        if not decode and not prefill:
            if self.waiting and not self.running:  # the pool is all free and the head does not fit: it never will
                self._finish(
                    self.waiting[0],
                    "error",
                    error="the prompt needs more KV pages than the pool has; "
                    "hint: start the server with more --kv-pages",
                )
            await asyncio.sleep(0)
            return
        t0 = time.perf_counter()
        prefill_tokens = sum(end - s.computed for s, end in prefill)
        drafted = sum(len(s.draft) for s in decode)
        decode_out, prefill_out = await asyncio.to_thread(self._execute, decode, prefill)
        self.counters.draft_tokens += drafted
        for seq, tokens in zip(decode, decode_out):
            self.counters.accepted_tokens += len(tokens) - 1
            for i, sampled in enumerate(tokens):  # (the pending token and the accepted drafts are now in the cache)
                if seq.finish_reason:
                    break
                seq.computed += 1
                self._emit(seq, sampled, last=i == len(tokens) - 1)
            if seq.draft:  # pages that held only rejected drafts go back
                seq.draft_misses = 0 if len(tokens) > 1 else seq.draft_misses + 1
                seq.draft_pause = min(2**seq.draft_misses, 16) if seq.draft_misses else 0
                seq.draft, keep = [], self._pages_needed(len(seq.tokens))
                if not seq.finish_reason and len(seq.pages) > keep:
                    self.pool.release(seq.pages[keep:])
                    del seq.pages[keep:]
        for (seq, end), out in zip(prefill, prefill_out.rows):
            new, seq.computed = end - seq.computed, end
            self.pool.register(seq.tokens, seq.pages, seq.computed)
            if id(seq) in prefill_out.prompt_logprobs:
                seq.prompt_logprobs += prefill_out.prompt_logprobs[id(seq)]
            if seq.pooling:
                self._pool(seq, out[:new])
            elif end == seq.prefill_target and not seq.output_ids:
                self._emit(seq, seq.sampler.sample(out, prefill_out.masks.get(id(seq))))
        self.counters.step_seconds += time.perf_counter() - t0
        # (bench/step_gaps.py reads these lines: the gaps between a decoding stream's tokens, server-side)
        log.debug(
            "step end=%.4f ms=%.1f decoding=%d drafted=%d prefill=%d",
            time.monotonic(),
            (time.perf_counter() - t0) * 1e3,
            len(decode),
            drafted,
            prefill_tokens,
        )

    # -- planning. Three invariants make the oldest sequence advance at every step, so the scheduler never
    # livelocks however small the pool:
    # - every running sequence is older (smaller `order`) than every waiting one: admission takes the
    #   oldest waiting sequence, preemption sends back the newest running one;
    # - waiting sequences hold no pages (a prefix match that cannot be extended is given back at once);
    # - a sequence short of pages takes them from newer running sequences (newest first), never from older
    #   ones. So the oldest running sequence gets its decode token or a prefill chunk of at least one token,
    #   or, when its pages alone fill the pool, it ends ("length"; "error" for a prompt that cannot fit).
    def _plan(self) -> tuple[list[Sequence], list[tuple[Sequence, int]]]:
        self.running.sort(key=lambda s: s.order)
        decode = self._plan_decode()
        # (the mixed program takes one chunk beside the decode rows: export.paged_llm)
        prefill = self._plan_prefill(
            self.max_tokens_per_step if decode else max(self.max_tokens_per_step, IDLE_PREFILL_CHUNK),
            1 if decode and self.mixed_step else self.abi.prefill_batch_sizes[-1],
        )
        decode = [s for s in decode if s in self.running]  # (prefill may have preempted a decoder)
        if self.speculative and not prefill and len(decode) <= self.speculative.max_batch:
            self._plan_drafts(decode, self.speculative)
        return decode, prefill

    def _plan_drafts(self, decode: list[Sequence], spec: SpecConfig) -> None:
        """Prompt-lookup drafts for the decoding sequences, with pages for them from the free pool (a draft
        never preempts anyone: without pages there is no draft). A draft stops short of max_tokens and the
        context, so every token a verification gives may be kept."""
        for seq in decode:
            if seq.draft_pause:  # (free text: a verification that keeps nothing costs more than a decode step)
                seq.draft_pause -= 1
                continue
            if seq.sampler.needs_mask:  # (its mask would be needed at every drafted position before the call)
                continue
            room = min(seq.params.max_tokens - len(seq.output_ids), self.abi.max_seq_len - len(seq.tokens)) - 1
            k = min(spec.num_tokens, room)
            if k <= 0:
                continue
            draft = propose(np.asarray(seq.tokens, np.int64), k, spec.max_ngram, spec.min_ngram)
            if draft and self._grow(seq, len(seq.tokens) + len(draft)):
                seq.draft = draft

    def _pages_needed(self, n_tokens: int) -> int:
        return -(-n_tokens // self.page_size)

    def _grow(self, seq: Sequence, n_tokens: int) -> bool:
        extra = self._pages_needed(n_tokens) - len(seq.pages)
        if extra <= 0:
            return True
        pages = self.pool.allocate(extra)
        if pages is None:
            return False
        seq.pages += pages
        return True

    def _make_room(self, seq: Sequence, end: int, least: int) -> int:
        """Grow the running `seq`'s pages to hold `end` tokens, or as many as the pool can give if that is
        at least `least`, preempting newer running sequences (newest first) while it is not. Returns the
        tokens it now has room for (in [least, end]), or 0 if even all newer sequences' pages are too few."""
        while True:
            room = (len(seq.pages) + self.pool.available()) * self.page_size
            if room >= least:
                end = min(end, room)
                assert self._grow(seq, end)
                return end
            newer = [s for s in self.running if s.order > seq.order]
            if not newer:
                return 0
            self._preempt(newer[-1])

    def _preempt(self, seq: Sequence) -> None:
        """Free the sequence's pages; it waits again, ahead of every newer sequence, and is recomputed."""
        self.counters.preemptions += 1
        self.running.remove(seq)
        self.pool.release(seq.pages)
        seq.pages, seq.computed, seq.pooled = [], 0, None
        self.waiting.insert(0, seq)  # (it is newer than what still runs, so older than what waits)

    def _out_of_pages(self, seq: Sequence) -> None:
        """`seq` runs alone and its pages fill the pool: it ends where it is."""
        if not seq.output_ids:
            self._finish(
                seq,
                "error",
                error=f"the prompt ({len(seq.prompt_ids)} tokens) needs more KV pages than the pool's "
                f"{self.pool.total} of {self.page_size} tokens; hint: start the server with more --kv-pages",
            )
            return
        log.warning(
            "%s: the KV pool (%d tokens) holds no more of it; ending it", seq.rid, self.pool.total * self.page_size
        )
        text = self._flush_text(seq)
        if text:
            seq.events.put_nowait(Event(text=text))
        self._finish(seq, "length")

    def _plan_decode(self) -> list[Sequence]:
        planned = []
        for seq in [s for s in self.running if s.output_ids and s.computed == len(s.tokens) - 1]:
            if seq not in self.running:  # preempted to make room for an older one
                continue
            if self._make_room(seq, len(seq.tokens), len(seq.tokens)):
                planned.append(seq)
            elif seq is self.running[0]:
                self._out_of_pages(seq)
            else:
                self._preempt(seq)  # the older ones hold the pool: it gives its pages to them
        return planned

    def _plan_prefill(self, budget: int, max_seqs: int) -> list[tuple[Sequence, int]]:
        plan: list[tuple[Sequence, int]] = []
        for seq in [s for s in self.running if s.computed < s.prefill_target]:
            if budget <= 0 or len(plan) == max_seqs:
                break
            if seq not in self.running:
                continue
            end = self._make_room(seq, min(seq.prefill_target, seq.computed + budget), seq.computed + 1)
            if end:
                plan.append((seq, end))
                budget -= end - seq.computed
            elif seq is self.running[0]:
                self._out_of_pages(seq)
            # else: it keeps its pages and waits for the older ones to finish (or to preempt it)
        while self.waiting and budget > 0 and len(self.running) < self.max_running and len(plan) < max_seqs:
            seq = self.waiting[0]
            if not seq.pooling and seq.params.prompt_logprobs is None:  # (these need every position's output)
                seq.pages = self.pool.match_prefix(seq.tokens[: seq.prefill_target + 1])
                seq.computed = len(seq.pages) * self.page_size
            end = min(seq.prefill_target, seq.computed + budget)
            if not self._grow(seq, end):  # the pool is full: wait for pages to come back, holding none
                self.pool.release(seq.pages)
                seq.pages, seq.computed = [], 0
                break
            self.waiting.pop(0)
            self.running.append(seq)
            if not seq.output_ids:  # (first admission: what the prefix cache gave the prompt, for usage reports)
                seq.cached_tokens = seq.computed
            if end > seq.computed:  # (a preempted sequence may find all it needs in the prefix cache)
                plan.append((seq, end))
                budget -= end - seq.computed
        return plan

    # -- device work (worker thread: reads the plan, touches no scheduler state but the samplers)
    def _execute(
        self, decode: list[Sequence], prefill: list[tuple[Sequence, int]]
    ) -> tuple[list[list[Sampled]], PrefillOut]:
        """-> (each decoding sequence's tokens: one, or with a draft the accepted ones and one more; the
        prefill's outputs)."""
        if any(s.draft for s in decode):  # (planned only in steps without prefill)
            return self._verify(decode), self._prefill(prefill)
        if self.mixed_step and decode and any(_kind(s) == "logits" for s, _ in prefill):
            self.counters.mixed_steps += 1
            out = self._prefill(prefill, decode)
            return [[t] for t in out.decoded], out
        return [[t] for t in self._decode(decode)], self._prefill(prefill)

    def _masks(self, seqs: list[Sequence]) -> Future[np.ndarray] | None:
        """Start computing the guided sequences' next-token masks (rows of `seqs`' order) on the mask thread,
        so that they are ready when the device call that runs meanwhile returns the logits. A few masks
        (tens of microseconds each) are computed at once instead: waking the thread beside a device call
        that keeps every core busy cost more than it hid (docs/benchmarks.md, structured output)."""
        guided = [(i, s.sampler.guide) for i, s in enumerate(seqs) if s.sampler.needs_mask and s.sampler.guide]
        if not guided:
            return None
        rows = np.zeros((len(seqs), mask_words(self.abi.vocab_size)), np.int32)

        def fill() -> np.ndarray:
            for i, guide in guided:
                guide.fill(rows[i])
            return rows

        if len(guided) < MASK_THREAD_MIN:
            done: Future[np.ndarray] = Future()
            done.set_result(fill())
            return done
        if self._mask_thread is None:
            self._mask_thread = ThreadPoolExecutor(1, thread_name_prefix=f"guide{self.device_index}")
        return self._mask_thread.submit(fill)

    def _decode(self, decode: list[Sequence]) -> list[Sampled]:
        """One token for each sequence, in groups of the compiled batch sizes."""
        sampled: list[Sampled] = []
        sizes = self.abi.decode_batch_sizes
        for i in range(0, len(decode), sizes[-1]):
            group = decode[i : i + sizes[-1]]
            bs = next(b for b in sizes if b >= len(group))
            masks = self._masks(group)
            t0 = time.perf_counter()
            out = self.runner.decode(*_decode_rows(group, bs))
            self.counters.device_seconds += time.perf_counter() - t0
            rows = masks.result() if masks else None
            for j, s in enumerate(group):
                if out.logits is not None:
                    sampled.append(s.sampler.sample(out.logits[j], _row(rows, j, s)))
                else:
                    assert out.top_values is not None and out.top_indices is not None
                    sampled.append(s.sampler.sample_top_k(out.top_values[j], out.top_indices[j]))
        return sampled

    def _verify(self, decode: list[Sequence]) -> list[list[Sampled]]:
        """One `score` call over each sequence's pending token and its draft; per sequence, the drafted tokens
        the sampler accepts, in order, then the token of the first position it rejects (or after the last)."""
        width = 1 + max(len(s.draft) for s in decode)
        toks = np.zeros((len(decode), width), np.int64)
        start, lens = np.zeros(len(decode), np.int64), np.zeros(len(decode), np.int64)
        for j, s in enumerate(decode):
            toks[j, : 1 + len(s.draft)] = [s.tokens[-1], *s.draft]
            start[j], lens[j] = len(s.tokens) - 1, len(s.tokens) + len(s.draft)
        pending = self._masks(decode)  # (a sequence that needs its mask first has no draft)
        t0 = time.perf_counter()
        logits = self.runner.score(toks, start, lens, _page_table([s.pages for s in decode], len(decode)))
        self.counters.device_seconds += time.perf_counter() - t0
        masks = pending.result() if pending is not None else None
        out: list[list[Sampled]] = []
        for j, s in enumerate(decode):
            tokens: list[Sampled] = []
            guide = s.sampler.guide
            for i, draft in enumerate(s.draft):
                sampled, accepted = s.sampler.sample_draft(logits[j, i], draft)
                tokens.append(sampled)
                if not accepted or (guide is not None and guide.stopped):  # (a finished grammar ends it here)
                    break
            else:
                tokens.append(s.sampler.sample(logits[j, len(s.draft)], _row(masks, j, s)))
            out.append(tokens)
        return out

    def _prefill(self, prefill: list[tuple[Sequence, int]], decode: list[Sequence] | None = None) -> PrefillOut:
        """Each chunk's last-position logits [V], or for an embedding its hidden states [S, H]; the masks of the
        guided sequences whose prompt this completes; the prompt logprobs of the chunks that need them. With
        `decode`, the plain chunk (one: the plan's) goes in one `mixed` call with those sequences' decode tokens,
        which it samples (PrefillOut.decoded)."""
        out = PrefillOut([np.empty(0)] * len(prefill))
        sizes = self.abi.prefill_batch_sizes
        for kind in ("logits", "embed", "score"):
            items = [(i, s, end) for i, (s, end) in enumerate(prefill) if _kind(s) == kind]
            for k in range(0, len(items), sizes[-1]):
                group = items[k : k + sizes[-1]]
                bs = next(b for b in sizes if b >= len(group))
                # exactly the longest chunk: the program takes any length, and padding costs prefill time
                width = max(end - s.computed for _, s, end in group)
                rows = len(group) if decode or kind == "score" else bs  # (mixed and score: dynamic batch)
                toks = np.zeros((rows, width), np.int64)
                start = np.zeros(rows, np.int64)
                lens = np.zeros(rows, np.int64)
                for j, (_, s, end) in enumerate(group):
                    chunk = s.tokens[s.computed : end]
                    toks[j, : len(chunk)] = chunk
                    start[j], lens[j] = s.computed, end
                pages = _page_table([s.pages for _, s, _ in group], rows)
                last = [s for _, s, end in group if end == s.prefill_target and not s.output_ids]
                pending = self._masks((decode or []) + last)
                t0 = time.perf_counter()
                if decode:
                    assert len(group) == 1, "the mixed program takes one prefill chunk"
                    logits = self.runner.mixed(*_decode_rows(decode, len(decode)), toks, start, lens, pages)
                    chunks = logits[len(decode) :]
                elif kind == "score":
                    scores = self.runner.score(toks, start, lens, pages)
                    chunks = np.stack([scores[j, end - s.computed - 1] for j, (_, s, end) in enumerate(group)])
                else:
                    chunks = (self.runner.embed if kind == "embed" else self.runner.prefill)(toks, start, lens, pages)
                self.counters.device_seconds += time.perf_counter() - t0
                masks = pending.result() if pending is not None else None
                if decode:
                    out.decoded = [s.sampler.sample(logits[j], _row(masks, j, s)) for j, s in enumerate(decode)]
                    masks = masks[len(decode) :] if masks is not None else None
                    decode = None
                for j, (i, s, end) in enumerate(group):
                    out.rows[i] = chunks[j]
                    if kind == "score":
                        out.prompt_logprobs[id(s)] = _prompt_logprobs(s, scores[j], end)
                if masks is not None:
                    out.masks.update((id(s), masks[j]) for j, s in enumerate(last) if s.sampler.needs_mask)
        return out

    # -- results
    def _emit(self, seq: Sequence, sampled: Sampled, last: bool = True) -> None:
        """`last`: the step's last token of `seq` (its guide has consumed this step's tokens: only after the last
        does its state say whether the grammar ended here)."""
        if seq.finish_reason:
            return
        tok = sampled.token_id
        seq.output_ids.append(tok)
        self.counters.generated_tokens += 1
        p = seq.params
        finish, text, stopped = None, "", False
        if (tok in self.eos_ids and not p.ignore_eos) or tok in p.stop_token_ids:
            finish = "stop"  # the end token itself is not part of the text
        else:
            text, stopped = seq.stops.feed(seq.detok.add(tok))
            if stopped or (last and seq.sampler.guide is not None and seq.sampler.guide.stopped):
                finish = "stop"  # (a grammar that allows nothing more ends the sequence as a stop string does)
            elif len(seq.output_ids) >= p.max_tokens or len(seq.tokens) >= self.abi.max_seq_len:
                finish = "length"
        if finish and not stopped:
            text += self._flush_text(seq)
        prompt_logprobs = seq.prompt_logprobs if p.prompt_logprobs is not None and len(seq.output_ids) == 1 else None
        seq.events.put_nowait(Event(text=text, token_ids=[tok], logprobs=[sampled], prompt_logprobs=prompt_logprobs))
        if finish:
            self._finish(seq, finish)

    @staticmethod
    def _flush_text(seq: Sequence) -> str:
        """The text held back (an incomplete character, a possible stop string's start) as the sequence ends."""
        tail, stopped = seq.stops.feed(seq.detok.flush())
        return tail if stopped else tail + seq.stops.flush()

    def _pool(self, seq: Sequence, hidden: np.ndarray) -> None:
        """Fold a prefilled chunk's hidden states [n, H] into the embedding; finish when the prompt is in."""
        if seq.pooling == "last":
            seq.pooled = hidden[-1].astype(np.float64)
        else:
            seq.pooled = hidden.sum(0, dtype=np.float64) + (0 if seq.pooled is None else seq.pooled)
        if seq.computed < seq.prefill_target:
            return
        vec = seq.pooled / (seq.computed if seq.pooling == "mean" else 1)
        vec /= max(float(np.linalg.norm(vec)), 1e-12)
        seq.events.put_nowait(Event(embedding=vec.astype(np.float32)))
        self._finish(seq, "stop")

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq.pages:
            self.pool.release(seq.pages)
            seq.pages = []
        if seq.finish_reason is None:
            seq.finish_reason = reason
            seq.events.put_nowait(Event(finish_reason=reason, error=error))


@dataclass
class PrefillOut:
    """What a step's prefill gives back (Scheduler._prefill), by the plan's order and by `id` of the sequence."""

    rows: list[np.ndarray]  # each chunk's last-position logits [V], or an embedding chunk's hidden states [S, H]
    masks: dict[int, np.ndarray] = field(default_factory=dict)  # guided sequences whose prompt is now in
    prompt_logprobs: dict[int, list[Sampled | None]] = field(default_factory=dict)  # new prompt positions'
    decoded: list[Sampled] = field(default_factory=list)  # a mixed call's decode tokens


def _kind(seq: Sequence) -> str:
    """How a sequence's prefill runs: embed (hidden states), score (every position's logits: prompt logprobs)
    or logits (the last position's)."""
    return "embed" if seq.pooling else "score" if seq.params.prompt_logprobs is not None else "logits"


def _prompt_logprobs(seq: Sequence, logits: np.ndarray, end: int) -> list[Sampled | None]:
    """The logprobs of the prompt tokens this chunk's logits [S, V] predict that `seq` has not recorded yet
    (after a preemption its prompt is scored again)."""
    k = seq.params.prompt_logprobs or 0
    prompt = seq.prompt_ids
    return [
        scored(logits[pos - 1 - seq.computed], prompt[pos], k)
        for pos in range(len(seq.prompt_logprobs), min(end + 1, len(prompt)))
    ]


def _row(masks: np.ndarray | None, j: int, seq: Sequence) -> np.ndarray | None:
    return masks[j] if masks is not None and seq.sampler.needs_mask else None


def _decode_rows(seqs: list[Sequence], rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """decode's inputs for `seqs` in `rows` rows (the rest padding): each last token, sequence length, pages."""
    toks, lens = np.zeros(rows, np.int64), np.zeros(rows, np.int64)
    for j, s in enumerate(seqs):
        toks[j], lens[j] = s.tokens[-1], len(s.tokens)
    return toks, lens, _page_table([s.pages for s in seqs], rows)


def _page_table(page_lists: list[list[int]], rows: int) -> np.ndarray:
    """[rows, P] page ids; short rows and unused slots are padded with the padding page 0."""
    table = np.zeros((rows, max(1, max(len(p) for p in page_lists))), np.int64)
    for i, pages in enumerate(page_lists):
        table[i, : len(pages)] = pages
    return table
