"""The scheduler's progress guarantee, property-tested: the real Scheduler and PagePool over a fake model whose
every output token is a hash of the context it reads back from its own paged cache.

Random pool and page sizes, prompts sharing prefixes, output lengths, arrivals and cancellations, prefix
caching on and off: every run ends within a bound of steps, every sequence finishes with a reason its numbers
explain, its tokens are those the context implies (a page-table or prefix-sharing bug changes them), and every
page is back in the pool.
"""

from __future__ import annotations

import asyncio
import zlib
from dataclasses import dataclass, field

import numpy as np
from hypothesis import HealthCheck, given, settings, target
from hypothesis import strategies as st

from serve.core.detokenizer import IncrementalDetokenizer, StopMatcher
from serve.core.kv_pages import PagePool
from serve.core.runner import DecodeOut
from serve.core.sampling import Sampler, SamplingParams
from serve.core.scheduler import Scheduler, Sequence
from serve.core.speculative import SpecConfig
from tests.tiny import char_tokenizer

VOCAB = 24  # ids 3.. are characters of the char tokenizer; 2 is EOS (about one token in 24)
EOS = 2
TOKENIZER, _ = char_tokenizer()


def next_token(context: list[int]) -> int:
    return zlib.crc32(np.asarray(context, np.int64).tobytes()) % VOCAB


@dataclass
class FakeABI:
    block_seq_stride: int
    max_seq_len: int
    prefill_batch_sizes: list[int]
    decode_batch_sizes: list[int]
    has_mixed: bool = True
    has_score: bool = True
    top_k: int | None = None


class FakeModel:
    """The runner's interface over a token-id "KV cache" [pages, page_size]: each call writes its tokens at
    their positions through the page table, then reads the whole context back through it."""

    def __init__(self, page_count: int, page_size: int):
        self.page_size = page_size
        self.cache = np.full((page_count, page_size), -1, np.int64)

    def _slot(self, pages: np.ndarray, pos: int) -> tuple[int, int]:
        page = int(pages[pos // self.page_size])
        assert page != 0, f"position {pos} maps to the padding page"
        return page, pos % self.page_size

    def _logits(self, pages: np.ndarray, n: int) -> np.ndarray:
        context = [int(self.cache[self._slot(pages, p)]) for p in range(n)]
        assert -1 not in context, "a position was read before it was written"
        logits = np.zeros(VOCAB, np.float32)
        logits[next_token(context)] = 10.0
        return logits

    def prefill(self, tokens: np.ndarray, start: np.ndarray, lens: np.ndarray, pages: np.ndarray) -> np.ndarray:
        out = np.zeros((len(tokens), VOCAB), np.float32)
        for j in np.flatnonzero(lens):
            for pos in range(start[j], lens[j]):
                self.cache[self._slot(pages[j], pos)] = tokens[j, pos - start[j]]
            out[j] = self._logits(pages[j], lens[j])
        return out

    def decode(self, tokens: np.ndarray, lens: np.ndarray, pages: np.ndarray) -> DecodeOut:
        out = np.zeros((len(tokens), VOCAB), np.float32)
        for j in np.flatnonzero(lens):
            self.cache[self._slot(pages[j], lens[j] - 1)] = tokens[j]
            out[j] = self._logits(pages[j], lens[j])
        return DecodeOut(logits=out)

    def mixed(self, dec_tokens, dec_lens, dec_pages, tokens, start, lens, pages) -> np.ndarray:
        assert len(tokens) == 1, "the mixed program takes one prefill chunk"
        return np.concatenate(
            [self.decode(dec_tokens, dec_lens, dec_pages).logits, self.prefill(tokens, start, lens, pages)]
        )

    def score(self, tokens: np.ndarray, start: np.ndarray, lens: np.ndarray, pages: np.ndarray) -> np.ndarray:
        out = np.zeros((*tokens.shape, VOCAB), np.float32)
        for j in np.flatnonzero(lens):
            for pos in range(start[j], lens[j]):
                self.cache[self._slot(pages[j], pos)] = tokens[j, pos - start[j]]
            for pos in range(start[j], lens[j]):
                out[j, pos - start[j]] = self._logits(pages[j], pos + 1)
        return out


@dataclass
class Request:
    arrival: int  # the tick it is added at
    prompt: list[int]
    max_tokens: int
    ignore_eos: bool
    cancel_at: int | None  # the tick its client goes away, if it does
    seq: Sequence | None = None
    events: list = field(default_factory=list)


@dataclass
class World:
    page_size: int
    pages: int  # usable pages (the pool also has the padding page 0)
    prefix_caching: bool
    max_running: int
    max_tokens_per_step: int
    prefill_batch_sizes: list[int]
    decode_batch_sizes: list[int]
    max_seq_len: int
    requests: list[Request]
    mixed_step: bool = True
    speculative: SpecConfig | None = None


@st.composite
def worlds(draw) -> World:
    page_size = draw(st.sampled_from([1, 2, 4, 8]))
    bases = [draw(st.lists(st.integers(3, VOCAB - 1), max_size=24)) for _ in range(3)]  # shared prefixes
    requests = []
    for _ in range(draw(st.integers(1, 12))):
        prompt = draw(st.sampled_from(bases)) + draw(st.lists(st.integers(3, VOCAB - 1), min_size=1, max_size=16))
        requests.append(
            Request(
                arrival=draw(st.integers(0, 10)),
                prompt=prompt,
                max_tokens=draw(st.integers(1, 48)),
                ignore_eos=draw(st.booleans()),
                cancel_at=draw(st.integers(0, 60)) if draw(st.integers(0, 3)) == 0 else None,  # 1 in 4 leaves
            )
        )
    return World(
        page_size=page_size,
        pages=max(1, draw(st.integers(4, 240)) // page_size),  # from a few tokens to several requests' worth
        prefix_caching=draw(st.booleans()),
        max_running=draw(st.integers(1, 8)),
        max_tokens_per_step=draw(st.integers(1, 64)),
        prefill_batch_sizes=draw(st.sampled_from([[1], [1, 4]])),
        decode_batch_sizes=draw(st.sampled_from([[1], [1, 2], [1, 4, 8]])),
        max_seq_len=draw(st.sampled_from([32, 256])),
        mixed_step=draw(st.booleans()),
        speculative=draw(
            st.sampled_from([None, SpecConfig(num_tokens=4, min_ngram=1), SpecConfig(num_tokens=2, max_batch=8)])
        ),
        requests=requests,
    )


def step_bound(w: World) -> int:
    """Each step the oldest running sequence advances one token or more, or ends; once oldest it stays so,
    and it computes at most its prompt, a recomputation of its output and its output again. A step with
    nothing running admits the head (or refuses it), and the next step is one of the former kind."""
    last_arrival = max(r.arrival for r in w.requests)
    return last_arrival + sum(len(r.prompt) + 2 * r.max_tokens + 2 for r in w.requests) + 1


async def simulate(w: World) -> tuple[Scheduler, int]:
    pool = PagePool(w.pages + 1, w.page_size, w.prefix_caching)
    abi = FakeABI(w.page_size, w.max_seq_len, w.prefill_batch_sizes, w.decode_batch_sizes)
    model = FakeModel(w.pages + 1, w.page_size)
    sched = Scheduler(model, pool, abi, [EOS], w.max_running, w.max_tokens_per_step, 0, w.mixed_step, w.speculative)
    bound, tick, steps = step_bound(w), 0, 0
    while tick <= max(r.arrival for r in w.requests) or sched.load:
        for r in w.requests:
            if r.arrival == tick:
                params = SamplingParams(max_tokens=r.max_tokens, temperature=0.0, ignore_eos=r.ignore_eos)
                r.seq = Sequence(
                    rid=f"r{len(r.prompt)}",
                    prompt_ids=list(r.prompt),
                    params=params,
                    sampler=Sampler(params, r.prompt),
                    detok=IncrementalDetokenizer(TOKENIZER, r.prompt),
                    stops=StopMatcher([]),
                )
                sched.add(r.seq)
            if r.cancel_at == tick and r.seq is not None:
                r.seq.cancel()
        if sched.load:
            await sched.step()
            steps += 1
            assert steps <= bound, f"no end after {steps} steps (bound {bound}): the scheduler does not progress"
        tick += 1
    return sched, steps


def check(w: World, sched: Scheduler) -> None:
    total_tokens = w.pages * w.page_size
    assert sched.pool.stats().used == 0, "pages still referenced after every sequence ended"
    assert sched.pool.available() == w.pages
    for r in w.requests:
        seq = r.seq
        assert seq is not None and seq.finish_reason is not None
        events = []
        while not seq.events.empty():
            events.append(seq.events.get_nowait())
        assert events and events[-1].finish_reason == seq.finish_reason
        assert [t for e in events for t in e.token_ids] == seq.output_ids
        out = seq.output_ids
        assert out == [next_token(r.prompt + out[:i]) for i in range(len(out))], "tokens differ from the context's"
        n = len(r.prompt) + len(out)
        if seq.finish_reason == "stop":
            assert out[-1] == EOS and not r.ignore_eos
        elif seq.finish_reason == "length":
            assert len(out) == r.max_tokens or n >= w.max_seq_len or n > total_tokens, (len(out), n)
        elif seq.finish_reason == "error":
            assert len(r.prompt) > total_tokens and not out
            assert "--kv-pages" in events[-1].error
        else:
            assert seq.finish_reason == "cancelled" and r.cancel_at is not None


@settings(
    max_examples=500, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow], database=None
)
@given(worlds())
def test_every_sequence_finishes_and_returns_its_pages(w: World):
    sched, _ = asyncio.run(simulate(w))
    check(w, sched)
    target(float(sched.counters.preemptions), label="preemptions")  # steer towards pools under pressure


def test_livelock_under_pressure_with_prefix_caching():
    """Issue 28, hang 1: 8 requests of a 100-token prompt and 400 tokens against a pool that holds about two
    of them. A preempted sequence's pages stay in the prefix cache; when it came back to the queue's head it
    took them again and kept them although it could not run, so the one running sequence preempted itself."""
    rng = np.random.default_rng(0)
    w = World(
        page_size=8,
        pages=125,
        prefix_caching=True,
        max_running=8,
        max_tokens_per_step=128,
        prefill_batch_sizes=[1, 4],
        decode_batch_sizes=[1, 4, 8],
        max_seq_len=1024,
        requests=[Request(0, rng.integers(3, VOCAB, 100).tolist(), 400, True, None) for _ in range(8)],
    )
    sched, steps = asyncio.run(simulate(w))
    check(w, sched)
    assert all(len(r.seq.output_ids) == 400 for r in w.requests if r.seq)
    assert sched.counters.preemptions > 0  # the pool was short: the test exercised preemption


def test_speculation_and_mixed_steps_under_pressure():
    """Drafts verified under a pool short enough to preempt, beside arrivals that prefill in mixed steps: the
    tokens are still the context's (a rejected draft's cache slots are overwritten before they are read), some
    drafts were kept, and every page comes back (a verification's spare pages included)."""
    rng = np.random.default_rng(1)
    # prompts that repeat themselves: the fake model's tokens (a hash of the context) rarely do
    w = World(
        page_size=4,
        pages=60,
        prefix_caching=True,
        max_running=4,
        max_tokens_per_step=16,
        prefill_batch_sizes=[1, 4],
        decode_batch_sizes=[1, 4],
        max_seq_len=512,
        requests=[Request(3 * i, np.tile(rng.integers(3, VOCAB, 6), 5).tolist(), 120, True, None) for i in range(6)],
        speculative=SpecConfig(num_tokens=4, min_ngram=1, max_batch=4),
    )
    sched, _ = asyncio.run(simulate(w))
    check(w, sched)
    c = sched.counters
    assert c.draft_tokens > 100 and c.accepted_tokens > 0 and c.mixed_steps > 0 and c.preemptions > 0, c


def test_a_generation_longer_than_the_pool_ends_with_length():
    """Issue 28, hang 2: 16 pages of 4 tokens and 200 tokens asked: it ends when the pool is full."""
    w = World(4, 15, True, 4, 16, [1], [1], 256, [Request(0, [5, 6, 7], 200, True, None)])
    sched, _ = asyncio.run(simulate(w))
    check(w, sched)
    seq = w.requests[0].seq
    assert (
        seq is not None and seq.finish_reason == "length" and len(seq.tokens) == 61
    )  # the pool full, plus the last token sampled


class RecordingModel(FakeModel):
    """A FakeModel that records the tokens of every prefill call."""

    def __init__(self, page_count: int, page_size: int):
        super().__init__(page_count, page_size)
        self.chunks: list[int] = []

    def prefill(self, tokens, start, lens, pages):
        self.chunks.append(int((lens - start).clip(min=0).sum()))
        return super().prefill(tokens, start, lens, pages)


def test_long_prompts_prefill_in_larger_chunks_while_nothing_decodes():
    """Alone, a 700-token prompt goes in IDLE_PREFILL_CHUNK chunks; while another sequence decodes, the
    next one's go in --max-tokens-per-step chunks (the decoder waits at most one of them per token)."""
    from serve.core.scheduler import IDLE_PREFILL_CHUNK

    page_size, pages = 4, 600
    pool = PagePool(pages + 1, page_size, False)
    abi = FakeABI(page_size, 2048, [1], [1, 4])
    model = RecordingModel(pages + 1, page_size)
    sched = Scheduler(model, pool, abi, [EOS], 4, 128)

    def seq(n, max_tokens):
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        prompt = [3 + i % (VOCAB - 3) for i in range(n)]
        s = Sequence(
            rid=f"r{n}",
            prompt_ids=prompt,
            params=params,
            sampler=Sampler(params, prompt),
            detok=IncrementalDetokenizer(TOKENIZER, prompt),
            stops=StopMatcher([]),
        )
        sched.add(s)
        return s

    async def run():
        first = seq(700, 40)
        while not first.output_ids:
            await sched.step()
        assert model.chunks == [IDLE_PREFILL_CHUNK, IDLE_PREFILL_CHUNK, 700 - 2 * IDLE_PREFILL_CHUNK]
        model.chunks.clear()
        second = seq(300, 1)
        while sched.load:
            await sched.step()
        assert model.chunks == [128, 128, 300 - 256] and second.finish_reason == "length"

    asyncio.run(run())
