"""The serving benchmark's summary, with `vllm bench serve`'s definitions (and its JSON key names):

- completed / failed requests; duration = first request sent -> last response done (the warm-up excluded)
- request throughput = completed / duration; output token throughput = output tokens / duration;
  total token throughput = (prompt + output tokens) / duration (completed requests only)
- TTFT, end-to-end latency (e2el): per request; TPOT = (latency - TTFT) / (output tokens - 1) per request
  with more than one output token; ITL: every gap between streamed chunks, all requests pooled
- mean, median and p99 of each (numpy's linear-interpolation percentile), in milliseconds
- concurrency = sum of latencies / duration: the mean number of requests in flight (SGLang's)
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from .backends import RequestResult

STATS = ("mean", "median", "p99")
LATENCIES = ("ttft", "tpot", "itl", "e2el")


@dataclass
class Summary:
    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    concurrency: float
    mean_ttft_ms: float | None
    median_ttft_ms: float | None
    p99_ttft_ms: float | None
    mean_tpot_ms: float | None
    median_tpot_ms: float | None
    p99_tpot_ms: float | None
    mean_itl_ms: float | None
    median_itl_ms: float | None
    p99_itl_ms: float | None
    mean_e2el_ms: float | None
    median_e2el_ms: float | None
    p99_e2el_ms: float | None
    output_tokens_from: str  # how output tokens were counted ("usage", "meta_info", ..., joined with "+")
    prompt_tokens_from: str  # "server", "tokenizer", "tokenize_endpoint", "unknown" (joined with "+")
    errors: dict[str, int] = field(default_factory=dict)  # error kind ("HTTP 503", "ReadTimeout", ...) -> count
    workload: str | None = None  # the prompts: "synthetic", "grounded", "chat" or "file" (bench.serving sets it)
    input_lens: str | None = None  # the prompt lengths asked for, "32 x32, 1024 x32" (file, chat: measured range)


def tpot(r: RequestResult) -> float | None:
    if r.output_tokens is None or r.output_tokens <= 1 or r.ttft_s is None or r.latency_s is None:
        return None
    return (r.latency_s - r.ttft_s) / (r.output_tokens - 1)


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return dict.fromkeys(STATS)
    ms = np.asarray(values, dtype=np.float64) * 1000.0
    return {"mean": float(np.mean(ms)), "median": float(np.median(ms)), "p99": float(np.percentile(ms, 99))}


def error_kind(error: str) -> str:
    return error.split(":", 1)[0].strip() or "error"


def _sources(values: list[str]) -> str:
    return "+".join(sorted(set(values))) or "-"


def summarize(results: list[RequestResult], duration_s: float) -> Summary:
    ok = [r for r in results if r.success]
    inputs = sum(r.prompt_tokens or 0 for r in ok)
    outputs = sum(r.output_tokens or 0 for r in ok)
    per_metric = {
        "ttft": [r.ttft_s for r in ok if r.ttft_s is not None],
        "tpot": [t for t in (tpot(r) for r in ok) if t is not None],
        "itl": [gap for r in ok for gap in r.itl_s],
        "e2el": [r.latency_s for r in ok if r.latency_s is not None],
    }
    latencies = {f"{s}_{m}_ms": v for m in LATENCIES for s, v in _stats(per_metric[m]).items()}
    d = duration_s if duration_s > 0 else float("nan")
    return Summary(
        completed=len(ok),
        failed=len(results) - len(ok),
        duration_s=duration_s,
        total_input_tokens=inputs,
        total_output_tokens=outputs,
        request_throughput=len(ok) / d,
        output_throughput=outputs / d,
        total_token_throughput=(inputs + outputs) / d,
        concurrency=sum(per_metric["e2el"]) / d,
        output_tokens_from=_sources([r.output_tokens_from for r in ok]),
        prompt_tokens_from=_sources([r.prompt_tokens_from or "unknown" for r in ok]),
        errors=dict(Counter(error_kind(r.error) for r in results if not r.success)),
        **latencies,
    )


# (label, Summary field) for the printed table, vllm bench serve's order and wording
TABLE_ROWS: list[tuple[str, str]] = [
    ("Successful requests", "completed"),
    ("Failed requests", "failed"),
    ("Benchmark duration (s)", "duration_s"),
    ("Total input tokens", "total_input_tokens"),
    ("Total generated tokens", "total_output_tokens"),
    ("Request throughput (req/s)", "request_throughput"),
    ("Output token throughput (tok/s)", "output_throughput"),
    ("Total token throughput (tok/s)", "total_token_throughput"),
    ("Mean concurrency", "concurrency"),
    *[
        (f"{s.capitalize() if s != 'p99' else 'P99'} {m.upper() if m != 'e2el' else 'E2E latency'} (ms)", f"{s}_{m}_ms")
        for m in LATENCIES
        for s in STATS
    ],
    ("Output tokens counted by", "output_tokens_from"),
    ("Prompt tokens counted by", "prompt_tokens_from"),
    ("Workload", "workload"),
    ("Input lengths (tokens)", "input_lens"),
]
