"""Host sampling time per token over a full-vocabulary row: serve's Sampler against a textbook sampler that
sorts the whole row (the same filters, one draw), as a ratio.

    python -m bench.sampling [--vocab 49152] [--rows 8] [--repeats 5]

The Sampler bounds top-k / top-p candidates by block maxima and draws by a two-level inverse CDF, so it
never sorts the vocabulary in the usual cases (tests/test_sampling.py checks that without a clock; the
time it saves is measured here). Rows are standard normal logits x 3, like the tests'; times are the best
of `repeats` passes over the rows, per token.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from serve.core.sampling import Sampler, SamplingParams

CASES = {
    "temperature 0.8": (SamplingParams(temperature=0.8), 0),
    "top-k 40, top-p 0.9, min-p 0.01, repetition 1.1 (500 prompt ids)": (
        SamplingParams(temperature=0.8, top_k=40, top_p=0.9, min_p=0.01, repetition_penalty=1.1),
        500,
    ),
    "top-k 50": (SamplingParams(temperature=1.0, top_k=50), 0),
    "top-p 0.8, temperature 0.7": (SamplingParams(temperature=0.7, top_p=0.8), 0),
}


def sorted_sample(logits: np.ndarray, params: SamplingParams, prompt_ids: np.ndarray, rng: np.random.Generator) -> int:
    """The baseline: repetition penalty, then one full descending sort of the row, top-k / top-p / min-p on
    the sorted values, one draw."""
    x = logits.astype(np.float32, copy=True)
    if params.repetition_penalty != 1.0 and len(prompt_ids):
        seen = x[prompt_ids]
        x[prompt_ids] = np.where(seen > 0, seen / params.repetition_penalty, seen * params.repetition_penalty)
    x /= np.float32(params.temperature)
    order = np.argsort(-x, kind="stable")  # the whole vocabulary
    v = x[order]
    keep = len(v)
    if 0 < params.top_k < keep:
        keep = params.top_k
    p = np.exp((v[:keep] - v[0]).astype(np.float64))
    p /= p.sum()
    if params.top_p < 1.0:
        keep = min(keep, int(np.count_nonzero(np.cumsum(p) - p < params.top_p)))
    if params.min_p > 0.0:
        keep = min(keep, int(np.count_nonzero(v[:keep] >= v[0] + math.log(params.min_p))))
    p = p[:keep] / p[:keep].sum()
    return int(order[min(int(np.searchsorted(np.cumsum(p), rng.random(), side="right")), keep - 1)])


def _per_token(fn, rows: np.ndarray, repeats: int) -> float:
    for row in rows[:2]:  # warm-up
        fn(row)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        for row in rows:
            fn(row)
        best = min(best, (time.perf_counter() - t0) / len(rows))
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.sampling", description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=49152, help="row width (default: SmolLM2's vocabulary)")
    ap.add_argument("--rows", type=int, default=8, help="distinct logit rows per pass")
    ap.add_argument("--repeats", type=int, default=5, help="passes; the best is reported")
    args = ap.parse_args(argv)
    rows = (np.random.default_rng(4).standard_normal((args.rows, args.vocab)) * 3).astype(np.float32)
    print(f"vocabulary {args.vocab}, {args.rows} rows, best of {args.repeats}; time per sampled token")
    print(f"{'case':<68} {'Sampler':>10} {'full sort':>10} {'ratio':>7}")
    for name, (params, n_prompt) in CASES.items():
        prompt = list(range(n_prompt))
        sampler = Sampler(params, prompt, seed=0)
        rng, prompt_arr = np.random.default_rng(0), np.array(prompt, np.int64)
        ours = _per_token(sampler.sample, rows, args.repeats)
        base = _per_token(
            lambda row, p=params, ids=prompt_arr, g=rng: sorted_sample(row, p, ids, g), rows, args.repeats
        )
        print(f"{name:<68} {ours * 1e6:>8.0f}us {base * 1e6:>8.0f}us {base / ours:>6.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
