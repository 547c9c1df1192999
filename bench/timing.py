"""What bench.offline and bench.llama_cpp share: the plan of a run (what to time, with which token ids),
one timing, one engine's run of the plan, and the roofline over it.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from serve.core.scheduler import IDLE_PREFILL_CHUNK

SHORT = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "w8a8": "w8a8/q8_0"}


@dataclass
class Timing:
    """One measurement: `tokens` processed per call, median seconds per call over the repeats."""

    kind: str  # "prefill" | "decode"
    size: int  # prefill: prompt tokens; decode: batch size
    seconds: float
    tokens: int
    steps: int = 1
    repeats: list[float] = field(default_factory=list)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def ms(self) -> float:  # prefill: ms per call; decode: ms per step
        return 1000 * self.seconds / self.steps


@dataclass
class EngineRun:
    engine: str  # "aotllm" | "llama.cpp"
    dtype: str
    weight_bytes: int
    timings: list[Timing]
    source: str = ""
    notes: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{'ours' if self.engine == 'aotllm' else self.engine} {SHORT.get(self.dtype, self.dtype)}"

    def get(self, kind: str, size: int) -> Timing | None:
        return next((t for t in self.timings if t.kind == kind and t.size == size), None)

    def to_json(self, bandwidth_gb_s: float) -> dict:
        d = {
            "engine": self.engine,
            "dtype": self.dtype,
            "label": self.label,
            "source": self.source,
            "weight_bytes": self.weight_bytes,
            **self.notes,
            "prefill": [
                {"tokens": t.size, "ms": t.ms, "tok_s": t.tok_s, "repeats_s": t.repeats}
                for t in self.timings
                if t.kind == "prefill"
            ],
            "decode": [
                {"batch": t.size, "steps": t.steps, "ms_per_step": t.ms, "tok_s": t.tok_s, "repeats_s": t.repeats}
                for t in self.timings
                if t.kind == "decode"
            ],
        }
        d.update(roofline(self, bandwidth_gb_s))
        return d


def roofline(run: EngineRun, bandwidth_gb_s: float) -> dict:
    one = run.get("decode", 1)
    achieved = run.weight_bytes * one.tok_s / 1e9 if one else None
    return {
        "roofline_tok_s": bandwidth_gb_s * 1e9 / run.weight_bytes if run.weight_bytes else None,
        "gb_s_achieved": achieved,
        "roofline_ratio": achieved / bandwidth_gb_s if achieved is not None else None,
    }


def time_it(fn: Callable[[], object], repeats: int, warmup: int) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def random_tokens(rng: np.random.Generator, vocab: int, n: int) -> np.ndarray:
    """Ids away from the low (special) ids; the speed does not depend on which tokens they are."""
    return rng.integers(min(1000, vocab // 2), vocab, size=n, dtype=np.int64)


@dataclass
class Plan:
    prefill_lens: list[int]
    decode_batches: list[int]
    decode_prompt_len: int
    decode_steps: int
    repeats: int
    warmup: int
    seed: int = 0
    prefill_chunk: int = IDLE_PREFILL_CHUNK

    def pages_needed(self, stride: int) -> int:
        """Pages in use at once (page 0, the padding page, not counted): measurements reuse pages."""
        prefill = max([math.ceil(n / stride) for n in self.prefill_lens] or [0])
        decode = max(
            [b * math.ceil((self.decode_prompt_len + self.decode_steps) / stride) for b in self.decode_batches] or [0]
        )
        return max(prefill, decode)

    def prompts(self, vocab: int) -> dict:
        """The same token ids for every engine: prefill prompts, decode prompts (one per sequence) and the
        tokens fed at each decode step."""
        rng = np.random.default_rng(self.seed)
        most = max(self.decode_batches or [1])
        return {
            "prefill": {n: random_tokens(rng, vocab, n) for n in self.prefill_lens},
            "decode_prompts": random_tokens(rng, vocab, most * self.decode_prompt_len).reshape(most, -1),
            "decode_tokens": random_tokens(rng, vocab, most * self.decode_steps).reshape(self.decode_steps, most),
        }


def weight_bytes_read(sizes: dict[str, int]) -> int:
    total = sum(sizes.values())
    if "output.weight" in sizes and "token_embd.weight" in sizes:
        total -= sizes["token_embd.weight"]
    return total
