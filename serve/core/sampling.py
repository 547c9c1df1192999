"""Per-sequence token sampling on the host (torch-free: stdlib and numpy only).

`SamplingParams` holds what an OpenAI-style request asks for; `Sampler` turns one sequence's next-token
logits (a full `[V]` row, or an on-device top-k) into a token, in vLLM's order:

    logit_bias -> repetition penalty -> presence/frequency penalties -> the constraint's token mask
    -> temperature == 0: argmax (ties: lowest id)
    -> else: / temperature -> top-k -> top-p -> min-p -> one draw from the sequence's own generator

Each `Sampler` owns a `np.random.Generator(PCG64(seed))` and draws exactly one uniform number per
sampled token (inverse CDF over the surviving candidates in ascending token-id order), so a seeded
sequence gives the same tokens whatever else is in the batch, and a top-k row that holds the whole
probability mass gives the same token as the full row. Over a full row nothing is sorted in the usual
cases: top-k and top-p first bound their candidates by the maxima of blocks of `BLOCK` ids, and the draw
is a two-level inverse CDF.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .guide import Constraint, Guide, allowed

MAX_TOKENS_LIMIT = 1_000_000
MAX_N = 16
MAX_STOPS = 16
MAX_LOGPROBS = 20
# Below this temperature, dividing the logits would overflow float32: treated as greedy (as vLLM does).
GREEDY_EPS = 1e-5
BLOCK = 64  # block size of the two-level searches over the vocabulary


@dataclass
class SamplingParams:
    """What a request asks of the sampler (OpenAI / vLLM field names and semantics)."""

    max_tokens: int = 128  # max completion tokens
    temperature: float = 1.0  # 0 => greedy
    top_k: int = 0  # 0 or -1 => off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF/vLLM: logits of prompt+output tokens: >0 divided, <0 multiplied
    presence_penalty: float = 0.0  # OpenAI, over generated tokens
    frequency_penalty: float = 0.0  # OpenAI, over generated tokens
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1
    logprobs: int | None = None  # top logprobs per token (0 => only the chosen token's)
    prompt_logprobs: int | None = None  # the same for every prompt token after the first (echo, vLLM's)
    constraint: Constraint | None = None  # the output must match it (core/guide.py)
    skip_special_tokens: bool = True  # special tokens add no text (vLLM's); tool-call markers may be special

    def validate(self, vocab_size: int) -> None:
        """Raise ParamError for the first field out of range, naming the range it must be in."""
        v = vocab_size
        _check(
            _is_int(self.max_tokens) and 1 <= self.max_tokens <= MAX_TOKENS_LIMIT,
            "max_tokens",
            f"max_tokens must be an integer in [1, {MAX_TOKENS_LIMIT}], got {self.max_tokens!r}",
        )
        _check(
            0.0 <= self.temperature <= 100.0,
            "temperature",
            f"temperature must be in [0, 100] (0 = greedy), got {self.temperature!r}",
        )
        _check(0.0 < self.top_p <= 1.0, "top_p", f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        _check(0.0 <= self.min_p <= 1.0, "min_p", f"min_p must be in [0, 1] (0 = off), got {self.min_p!r}")
        _check(
            _is_int(self.top_k) and -1 <= self.top_k <= v,
            "top_k",
            f"top_k must be an integer in [-1, {v}] (0 or -1 = off), got {self.top_k!r}",
        )
        _check(
            0.0 < self.repetition_penalty < math.inf,
            "repetition_penalty",
            f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty!r}",
        )
        for name, value in (("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)):
            _check(-2.0 <= value <= 2.0, name, f"{name} must be in [-2, 2] (0 = off), got {value!r}")
        for tok, bias in self.logit_bias.items():
            _check(
                _is_int(tok) and 0 <= tok < v,
                "logit_bias",
                f"logit_bias keys must be token ids in [0, {v}), got {tok!r}",
            )
            _check(-100.0 <= bias <= 100.0, "logit_bias", f"logit_bias[{tok}] must be in [-100, 100], got {bias!r}")
        _check(self.seed is None or _is_int(self.seed), "seed", f"seed must be an integer or null, got {self.seed!r}")
        _check(len(self.stop) <= MAX_STOPS, "stop", f"stop allows at most {MAX_STOPS} strings, got {len(self.stop)}")
        for s in self.stop:
            _check(isinstance(s, str) and s != "", "stop", f"stop strings must be non-empty strings, got {s!r}")
        for tok in self.stop_token_ids:
            _check(
                _is_int(tok) and 0 <= tok < v,
                "stop_token_ids",
                f"stop_token_ids must be token ids in [0, {v}), got {tok!r}",
            )
        _check(_is_int(self.n) and 1 <= self.n <= MAX_N, "n", f"n must be an integer in [1, {MAX_N}], got {self.n!r}")
        _check(
            self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
            "logprobs",
            f"logprobs must be null or an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}",
        )
        _check(
            self.prompt_logprobs is None
            or (_is_int(self.prompt_logprobs) and 0 <= self.prompt_logprobs <= MAX_LOGPROBS),
            "prompt_logprobs",
            f"prompt_logprobs must be null or an integer in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs!r}",
        )


class ParamError(ValueError):
    """A sampling parameter out of range: `field` is its SamplingParams name (front-ends map it to their
    protocol's name), the message says the range it must be in."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _check(ok: bool, field: str, msg: str) -> None:
    if not ok:
        raise ParamError(field, msg)


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


@dataclass
class Sampled:
    """One sampled token; logprobs are of the raw model distribution (log_softmax of the raw logits)."""

    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None  # (token id, logprob), highest first


class Sampler:
    """Per-sequence sampling state. The same seed gives the same tokens whatever else is in the batch.

    With `n > 1` give each sequence its own seed (e.g. `params.seed + i`), or they all draw alike.
    """

    def __init__(
        self, params: SamplingParams, prompt_ids: list[int], seed: int | None = None, guide: Guide | None = None
    ) -> None:
        self.params = params
        self.guide = guide  # consumes every sampled token
        # A guided sequence's mask comes with the logits (sample's `mask`), or with no filter to apply it is
        # needed only when the token drawn without it is not allowed: drawing from the unmasked distribution
        # and keeping an allowed token, else drawing from the masked one, gives each allowed token
        # p(t) + (1 - Z) p(t) / Z = p(t) / Z, the masked distribution (greedy: the unmasked argmax, when
        # allowed, is the masked one). Top-k/p and min-p would filter a different distribution.
        filters = params.top_k > 0 or params.top_p < 1.0 or params.min_p > 0.0
        self.needs_mask = guide is not None and params.temperature >= GREEDY_EPS and filters
        self._mask_buffer: np.ndarray | None = None
        seed = params.seed if seed is None else seed
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little")
        self.seed = int(seed) % 2**64
        self._rng = np.random.Generator(np.random.PCG64(self.seed))
        self.greedy = params.temperature < GREEDY_EPS
        self._bias_ids = np.fromiter(params.logit_bias.keys(), np.int64, len(params.logit_bias))
        self._bias_vals = np.fromiter(params.logit_bias.values(), np.float32, len(params.logit_bias))
        self._use_rep = params.repetition_penalty != 1.0
        self._use_counts = params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
        self._seen: set[int] = set(int(t) for t in prompt_ids) if self._use_rep else set()
        self._seen_arr: np.ndarray | None = None  # sorted self._seen, rebuilt when it grows
        self._counts: dict[int, int] = {}  # generated token -> times generated
        self.num_generated = 0

    def sample(self, logits: np.ndarray, mask: np.ndarray | None = None) -> Sampled:
        """Sample from the full next-token logits `[V]` and record the token for the penalties. `mask` is the
        guide's bitmask of allowed tokens (core/guide.py), computed for this step."""
        logits = np.asarray(logits, dtype=np.float32)
        if logits.ndim != 1:
            raise ValueError(f"logits must be one row [V], got shape {logits.shape}")
        adjusted = self.apply_penalties(logits)
        if mask is not None:
            adjusted = self._masked(adjusted, mask)
        pos = self._pick(adjusted, logits)
        if self.guide is not None and mask is None and not self.guide.allows(pos):
            pos = self._pick(self._masked(self.apply_penalties(logits), self.guide.mask(len(logits))), logits)
        return self._finish(pos, logits, None)

    def sample_draft(self, logits: np.ndarray, draft: int) -> tuple[Sampled, bool]:
        """Verify a drafted token against the next-token logits `[V]`: -> (the token this position gets, whether
        it is the draft). Greedy: `sample`'s token, accepted when it is the draft. Otherwise speculative
        sampling's rule for a draft that is one token with certainty (prompt lookup): keep the draft d with
        probability p(d) under this sampler's distribution p (penalties, constraint, temperature, top-k/p,
        min-p applied), else draw from p without d, renormalised. Each token t then comes out with
        probability p(d) [t = d] + (1 - p(d)) p(t) / (1 - p(d)) [t != d] = p(t): the sampled distribution is
        unchanged (Leviathan et al. 2023). Two uniform draws where `sample` takes one: a seeded sequence is
        reproducible, but not the same tokens as without speculation."""
        if self.greedy:
            sampled = self.sample(logits)
            return sampled, sampled.token_id == draft
        logits = np.asarray(logits, dtype=np.float32)
        adjusted = self.apply_penalties(logits)
        if self.guide is not None:
            adjusted = self._masked(adjusted, self.guide.mask(len(logits)))
        pos, weights = self._weights(np.divide(adjusted, np.float32(self.params.temperature)), None)
        at = draft if pos is None else int(np.searchsorted(pos, draft))
        drafted = pos is None or (at < len(pos) and pos[at] == draft)  # (else the filters dropped it: p = 0)
        p_draft = float(weights[at]) / float(weights.sum(dtype=np.float64)) if drafted else 0.0
        if self._rng.random() < p_draft:
            return self._finish(draft, logits, None), True
        if p_draft > 0.0:
            weights[at] = 0.0
        i = _inverse_cdf(weights, self._rng.random())
        return self._finish(i if pos is None else int(pos[i]), logits, None), False

    def _pick(self, adjusted: np.ndarray, logits: np.ndarray) -> int:
        """Greedy, or one draw (in place on `adjusted` when it is not the caller's `logits`)."""
        if self.greedy:
            return int(np.argmax(adjusted))
        scratch = None if adjusted is logits else adjusted  # never write into the caller's array
        return self._draw(np.divide(adjusted, np.float32(self.params.temperature), out=scratch), None)

    def _masked(self, logits: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """`logits` with the tokens the mask forbids at -inf, in this sampler's own buffer (reused: no
        vocabulary-sized allocation per token)."""
        if self._mask_buffer is None or self._mask_buffer.shape != logits.shape:
            self._mask_buffer = np.empty_like(logits)
        out = self._mask_buffer
        out.fill(-np.inf)
        np.copyto(out, logits, where=allowed(mask, logits.shape[0]))
        return out

    def sample_top_k(self, values: np.ndarray, indices: np.ndarray) -> Sampled:
        """Sample from an on-device top-k (`values [K]` logits of token ids `indices [K]`).

        Penalties touch only these candidates; logprobs are normalised over the K candidates (exact
        when they hold the whole mass).
        """
        values = np.asarray(values, dtype=np.float32)
        indices = np.asarray(indices, dtype=np.int64)
        if values.ndim != 1 or values.shape != indices.shape:
            raise ValueError(f"values and indices must both be [K], got {values.shape} and {indices.shape}")
        adjusted = self.apply_penalties(values, indices)
        if self.greedy:
            best = np.flatnonzero(adjusted == adjusted.max())
            pos = int(best[np.argmin(indices[best])])  # ties: lowest token id, as argmax on the full row
        else:
            pos = self._draw(adjusted / np.float32(self.params.temperature), indices)
        return self._finish(pos, values, indices)

    def apply_penalties(self, logits: np.ndarray, token_ids: np.ndarray | None = None) -> np.ndarray:
        """`logits` after logit_bias, repetition, presence and frequency penalties (a new array if any
        applies, else `logits` itself). `token_ids[i]` is the token of `logits[i]` (None: i itself)."""
        p = self.params
        use_bias, use_rep = len(self._bias_ids) > 0, self._use_rep and len(self._seen) > 0
        use_counts = self._use_counts and len(self._counts) > 0
        if not (use_bias or use_rep or use_counts):
            return logits
        out = np.array(logits, dtype=np.float32, copy=True)
        find = _finder(token_ids) if token_ids is not None else lambda ids: (ids, slice(None))
        if use_bias:
            pos, hit = find(self._bias_ids)
            out[pos] += self._bias_vals[hit]
        if use_rep:
            if self._seen_arr is None:
                self._seen_arr = np.fromiter(sorted(self._seen), np.int64, len(self._seen))
            pos, _ = find(self._seen_arr)
            x = out[pos]
            out[pos] = np.where(x > 0, x / p.repetition_penalty, x * p.repetition_penalty)
        if use_counts:
            ids = np.fromiter(self._counts.keys(), np.int64, len(self._counts))
            counts = np.fromiter(self._counts.values(), np.float32, len(self._counts))
            pos, hit = find(ids)
            out[pos] -= counts[hit] * p.frequency_penalty + p.presence_penalty
        return out

    def _candidates(self, x: np.ndarray) -> np.ndarray | None:
        """Positions that survive top-k, top-p and min-p on the tempered logits `x` (None: all)."""
        p, n = self.params, x.shape[0]
        pos: np.ndarray | None = None
        if 0 < p.top_k < n:
            head = _head(x, p.top_k)
            pos = head[np.argpartition(x[head], len(head) - p.top_k)[len(head) - p.top_k :]]
        if p.top_p < 1.0:
            pos = self._nucleus(x, pos)
        if p.min_p > 0.0:  # prob >= min_p * max_prob  <=>  logit >= max_logit + ln(min_p)
            threshold = x.max() + math.log(p.min_p)
            pos = np.flatnonzero(x >= threshold) if pos is None else pos[x[pos] >= threshold]
        return pos

    def _nucleus(self, x: np.ndarray, pos: np.ndarray | None) -> np.ndarray:
        """The most likely of `pos` (None: all) whose preceding mass is < top_p (ties at the cut kept)."""
        universe = x if pos is None else x[pos]
        top = universe.max()
        total = float(np.exp(universe - top).sum(dtype=np.float64))
        values = universe  # a subset that surely holds the nucleus: only it gets sorted
        for m in (16, 64, 256):
            if m * BLOCK > len(universe):
                break
            head = universe[_head(universe, m)]
            if np.exp(head - top).sum(dtype=np.float64) >= self.params.top_p * total:
                values = head
                break
        desc = np.sort(values)[::-1]
        mass = np.exp(desc.astype(np.float64) - top) / total
        cut = desc[np.count_nonzero(np.cumsum(mass) - mass < self.params.top_p) - 1]
        keep = np.flatnonzero(universe >= cut)
        return keep if pos is None else pos[keep]

    def _draw(self, x: np.ndarray, token_ids: np.ndarray | None) -> int:
        """One uniform draw, inverse CDF over the candidates in ascending token-id order: a position."""
        pos, weights = self._weights(x, token_ids)
        i = _inverse_cdf(weights, self._rng.random())
        return i if pos is None else int(pos[i])

    def _weights(self, x: np.ndarray, token_ids: np.ndarray | None) -> tuple[np.ndarray | None, np.ndarray]:
        """The candidates of the tempered logits `x` (after top-k, top-p, min-p) in ascending token-id order:
        their positions (None: all of x, in order) and unnormalised probabilities. x is scratch: worked on
        in place (page faults cost more than math)."""
        pos = self._candidates(x)
        if token_ids is not None:  # canonical order, so that a top-k row draws like the full row
            pos = np.argsort(token_ids) if pos is None else pos[np.argsort(token_ids[pos])]
        elif pos is not None:
            pos = np.sort(pos)
        v = x if pos is None else x[pos]
        v -= v.max()
        return pos, np.exp(v, out=v)

    def _finish(self, pos: int, raw: np.ndarray, token_ids: np.ndarray | None) -> Sampled:
        token = pos if token_ids is None else int(token_ids[pos])
        self.num_generated += 1
        if self.guide is not None:
            self.guide.advance(token)
        if self._use_counts:
            self._counts[token] = self._counts.get(token, 0) + 1
        if self._use_rep and token not in self._seen:
            self._seen.add(token)
            self._seen_arr = None
        if self.params.logprobs is None:
            return Sampled(token)
        return scored(raw, pos, self.params.logprobs, token_ids)


def scored(raw: np.ndarray, pos: int, k: int, token_ids: np.ndarray | None = None) -> Sampled:
    """The token at `pos` of the raw logits `raw` with its logprob and the k most likely (log_softmax of `raw`;
    `token_ids[i]` is the token of raw[i], None: i itself)."""
    m = float(raw.max())
    lse = m + math.log(float(np.exp(raw - m).sum(dtype=np.float64)))
    top: list[tuple[int, float]] = []
    k = min(k, raw.shape[0])
    if k > 0:
        best = _head(raw, k)
        ids = best if token_ids is None else token_ids[best]
        top = sorted(((int(t), float(raw[b]) - lse) for t, b in zip(ids, best)), key=lambda e: (-e[1], e[0]))[:k]
    token = pos if token_ids is None else int(token_ids[pos])
    return Sampled(token, float(raw[pos]) - lse, top)


def _head(x: np.ndarray, m: int) -> np.ndarray:
    """Positions of every value >= a bound that at least `m` values reach: the top m, and a few more.

    The bound is the m-th largest of the block maxima (m distinct blocks reach it), which costs far
    less than partitioning the whole row."""
    n = x.shape[0]
    if m >= n:
        return np.arange(n)
    starts = np.arange(0, n, BLOCK)
    if m <= len(starts):
        block_max = np.maximum.reduceat(x, starts)
        bound = np.partition(block_max, len(starts) - m)[len(starts) - m]
    else:
        bound = np.partition(x, n - m)[n - m]
    return np.flatnonzero(x >= bound)


def _inverse_cdf(weights: np.ndarray, u: float) -> int:
    """The index i with cdf[i-1] <= u * total < cdf[i], by blocks (a float64 cumsum over V is slow)."""
    starts = np.arange(0, len(weights), BLOCK)
    block_cdf = np.cumsum(np.add.reduceat(weights, starts, dtype=np.float64))
    t = u * block_cdf[-1]
    b = min(int(np.searchsorted(block_cdf, t, side="right")), len(starts) - 1)
    inner = np.cumsum(weights[starts[b] : starts[b] + BLOCK], dtype=np.float64)
    t -= block_cdf[b - 1] if b else 0.0
    i = int(starts[b]) + min(int(np.searchsorted(inner, t, side="right")), len(inner) - 1)
    if weights[i] == 0:  # rounding at a block's top end: the nearest token with any mass
        nonzero = np.flatnonzero(weights[: i + 1])
        i = int(nonzero[-1]) if nonzero.size else int(np.flatnonzero(weights)[0])
    return i


def _finder(token_ids: np.ndarray) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """find(ids) -> (positions in `token_ids` of those ids present, mask of the ids present)."""
    order = np.argsort(token_ids)
    sorted_ids = token_ids[order]

    def find(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        at = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
        hit = sorted_ids[at] == ids
        return order[at[hit]], hit

    return find
