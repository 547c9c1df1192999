"""Continuous batching on one device: page tables over a fixed pool, chunked prefill, preemption.

One asyncio task per device runs `step()` in a loop. Each step decodes one token for every running
sequence (bucketed to the compiled batch sizes) and spends a token budget on prefill for new or
partially prefilled sequences. The device calls run in a worker thread, so HTTP keeps flowing.
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
from .sampling import Sampled, Sampler, SamplingParams

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


# Prefill tokens per step while sequences decode: long prompts go in chunks this size, so a decoding
# sequence waits at most one chunk between two of its tokens.
PREFILL_CHUNK = 128
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
    ):
        self.runner, self.pool, self.abi = runner, pool, abi
        self.page_size = abi.block_seq_stride
        self.eos_ids = set(eos_ids)
        self.max_running = max_running
        self.max_tokens_per_step = max(max_tokens_per_step, self.page_size)
        self.device_index = device_index
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
        decode_out, (prefill_out, prefill_masks) = await asyncio.to_thread(self._execute, decode, prefill)
        for seq, sampled in zip(decode, decode_out):
            seq.computed += 1
            self._emit(seq, sampled)
        for (seq, end), out in zip(prefill, prefill_out):
            new, seq.computed = end - seq.computed, end
            self.pool.register(seq.tokens, seq.pages, seq.computed)
            if seq.pooling:
                self._pool(seq, out[:new])
            elif end == seq.prefill_target and not seq.output_ids:
                self._emit(seq, seq.sampler.sample(out, prefill_masks.get(id(seq))))
        self.counters.step_seconds += time.perf_counter() - t0

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
        prefill = self._plan_prefill(
            self.max_tokens_per_step if decode else max(self.max_tokens_per_step, IDLE_PREFILL_CHUNK)
        )
        return [s for s in decode if s in self.running], prefill  # (prefill may have preempted a decoder)

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

    def _plan_prefill(self, budget: int) -> list[tuple[Sequence, int]]:
        plan: list[tuple[Sequence, int]] = []
        for seq in [s for s in self.running if s.computed < s.prefill_target]:
            if budget <= 0 or len(plan) == self.abi.prefill_batch_sizes[-1]:
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
        while (
            self.waiting
            and budget > 0
            and len(self.running) < self.max_running
            and len(plan) < self.abi.prefill_batch_sizes[-1]
        ):
            seq = self.waiting[0]
            if not seq.pooling:  # (embeddings need every position's hidden state)
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

    # -- device work (worker thread: reads the plan, touches no scheduler state)
    def _execute(
        self, decode: list[Sequence], prefill: list[tuple[Sequence, int]]
    ) -> tuple[list[Sampled], tuple[list[np.ndarray], dict[int, np.ndarray]]]:
        return self._decode(decode), self._prefill(prefill)

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
            pages = _page_table([s.pages for s in group], bs)
            toks = np.zeros(bs, np.int64)
            lens = np.zeros(bs, np.int64)
            for j, s in enumerate(group):
                toks[j], lens[j] = s.tokens[-1], len(s.tokens)
            masks = self._masks(group)
            t0 = time.perf_counter()
            out = self.runner.decode(toks, lens, pages)
            self.counters.device_seconds += time.perf_counter() - t0
            rows = masks.result() if masks else None
            for j, s in enumerate(group):
                if out.logits is not None:
                    mask = rows[j] if rows is not None and s.sampler.needs_mask else None
                    sampled.append(s.sampler.sample(out.logits[j], mask))
                else:
                    assert out.top_values is not None and out.top_indices is not None
                    sampled.append(s.sampler.sample_top_k(out.top_values[j], out.top_indices[j]))
        return sampled

    def _prefill(self, prefill: list[tuple[Sequence, int]]) -> tuple[list[np.ndarray], dict[int, np.ndarray]]:
        """Each chunk's last-position logits [V], or for an embedding its hidden states [S, H]; and the masks of
        the guided sequences whose prompt this completes (by `id` of the sequence)."""
        results: list[np.ndarray] = [np.empty(0)] * len(prefill)
        masks: dict[int, np.ndarray] = {}
        sizes = self.abi.prefill_batch_sizes
        for embed in (False, True):
            items = [(i, s, end) for i, (s, end) in enumerate(prefill) if bool(s.pooling) == embed]
            for k in range(0, len(items), sizes[-1]):
                group = items[k : k + sizes[-1]]
                bs = next(b for b in sizes if b >= len(group))
                # exactly the longest chunk: the program takes any length, and padding costs prefill time
                width = max(end - s.computed for _, s, end in group)
                toks = np.zeros((bs, width), np.int64)
                start = np.zeros(bs, np.int64)
                lens = np.zeros(bs, np.int64)
                for j, (_, s, end) in enumerate(group):
                    chunk = s.tokens[s.computed : end]
                    toks[j, : len(chunk)] = chunk
                    start[j], lens[j] = s.computed, end
                run = self.runner.embed if embed else self.runner.prefill
                last = [s for _, s, end in group if end == s.prefill_target and not s.output_ids]
                pending = self._masks(last)
                t0 = time.perf_counter()
                out = run(toks, start, lens, _page_table([s.pages for _, s, _ in group], bs))
                self.counters.device_seconds += time.perf_counter() - t0
                for j, (i, _, _) in enumerate(group):
                    results[i] = out[j]
                if pending is not None:
                    rows = pending.result()
                    masks.update((id(s), rows[j]) for j, s in enumerate(last) if s.sampler.needs_mask)
        return results, masks

    # -- results
    def _emit(self, seq: Sequence, sampled: Sampled) -> None:
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
            if stopped or (seq.sampler.guide is not None and seq.sampler.guide.stopped):
                finish = "stop"  # (a grammar that allows nothing more ends the sequence as a stop string does)
            elif len(seq.output_ids) >= p.max_tokens or len(seq.tokens) >= self.abi.max_seq_len:
                finish = "length"
        if finish and not stopped:
            text += self._flush_text(seq)
        seq.events.put_nowait(Event(text=text, token_ids=[tok], logprobs=[sampled]))
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


def _page_table(page_lists: list[list[int]], rows: int) -> np.ndarray:
    """[rows, P] page ids; short rows and unused slots are padded with the padding page 0."""
    table = np.zeros((rows, max(1, max(len(p) for p in page_lists))), np.int64)
    for i, pages in enumerate(page_lists):
        table[i, : len(pages)] = pages
    return table
