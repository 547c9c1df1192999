"""`python -m bench.serving`: the online serving benchmark, `vllm bench serve` / `sglang.bench_serving` style.

    python -m bench.serving --url http://127.0.0.1:8000 --backend generate|openai|triton \\
        --num-prompts 100 [--concurrency 8] [--request-rate 4] --input-len 512[,1024,...] --output-len 128 \\
        [--workload synthetic|grounded|chat | --prompts-file prompts.jsonl] [--ignore-eos] [--temperature 0] \\
        [--json out.json]
    python -m bench.serving --compare ours.json llama-cpp.json shortfin.json    # one table of several runs

Workloads (bench/prompts.py): synthetic (random words, the default), grounded (copy a source file given in
the prompt: the output is in the input) and chat (open questions: it is not). `--input-len 32,1024` draws
each request's length from the list (seeded by --seed: both runs of a comparison get the same sequence).

Requests are streamed (SSE) and greedy (`--temperature`). They are sent all at once (the default, `--request-rate inf`)
or as a Poisson process of rate R (exponential gaps of mean 1/R, seeded); `--concurrency C` caps the
requests in flight (a request waiting for a slot is not yet timed). One warm-up request goes first,
outside the measurement; if it fails the run stops there (a wrong URL, backend or model). Later
failures (HTTP errors, 503 when the queue is full, broken streams) are counted and reported.
Definitions: bench/backends.py (per request) and bench/serving_metrics.py (summary).

Token counts: output tokens are the server's when it reports them (OpenAI usage, /generate's meta_info,
Triton log-probabilities, shortfin's one event per token), else the output text re-tokenized (with
`--tokenizer`, else the server's POST /tokenize), else the chunks counted; prompt tokens likewise (the
server's count includes BOS where the server adds one). The JSON says which counts were used.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import sys
import time
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
from tqdm import tqdm

from .backends import BACKENDS, Backend, RequestResult, send
from .prompts import (
    WORKLOADS,
    Prompt,
    describe_lengths,
    file_prompts,
    json_schemas,
    length_mix,
    parse_lengths,
    synthetic_prompts,
    workload_prompts,
)
from .report import format_cell, print_table, write_json
from .serving_metrics import TABLE_ROWS, Summary, summarize, tpot
from .tokens import TokenCounter, find_counter


@dataclass
class RunConfig:
    url: str
    backend: str
    label: str
    model: str | None
    num_prompts: int
    concurrency: int | None  # None: no cap
    request_rate: float | None  # requests/s; None: all at once ("inf")
    input_len: list[int]  # each request's prompt length is drawn from these (one: every request's)
    output_len: int
    prompts_file: str | None
    ignore_eos: bool
    seed: int
    warmup: int
    tokenizer: str | None
    json_schemas: int = 0  # > 0: each request's output constrained to one of this many generated schemas
    workload: str = "synthetic"  # bench/prompts.py WORKLOADS (unused with prompts_file)
    temperature: float = 0.0  # 0: greedy


@dataclass
class BenchResult:
    date: str
    config: RunConfig
    summary: Summary
    requests: list[RequestResult]


class BenchError(Exception):
    """The run could not start (unreachable server, failed warm-up, no prompts)."""


def _client(timeout_s: float) -> httpx.AsyncClient:
    """A fresh connection per request, as vLLM's benchmark opens a session per request: a pooled
    keep-alive connection the server has closed meanwhile failed a request against llama-server."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout_s, connect=30.0),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=0),
    )


def input_lengths(cfg: RunConfig) -> list[int]:
    """Each request's prompt length (tokens), drawn from cfg.input_len, seeded."""
    return length_mix(cfg.input_len, cfg.num_prompts, cfg.seed)


def describe_inputs(cfg: RunConfig, prompts: list[Prompt]) -> str:
    """The summary's input lengths: those asked for ("32 x32, 1024 x32"), or the prompts' own (file, chat)."""
    if not cfg.prompts_file and cfg.workload != "chat":
        return describe_lengths(input_lengths(cfg))
    counts = [p.tokens for p in prompts if p.tokens is not None]
    return f"{min(counts)}-{max(counts)} ({'file' if cfg.prompts_file else cfg.workload})" if counts else "-"


async def _prompts(cfg: RunConfig, counter: TokenCounter | None) -> list[Prompt]:
    if cfg.prompts_file:
        return await file_prompts(cfg.prompts_file, cfg.num_prompts, counter)
    return await workload_prompts(cfg.workload, input_lengths(cfg), cfg.seed, counter)


async def _timed(
    client: httpx.AsyncClient, backend: Backend, cfg: RunConfig, prompts: list[Prompt], progress: bool
) -> tuple[list[RequestResult], float]:
    rng = random.Random(cfg.seed)
    slots = asyncio.Semaphore(cfg.concurrency) if cfg.concurrency else None
    schemas = json_schemas(cfg.json_schemas, cfg.seed)
    bar = tqdm(total=len(prompts), disable=not progress, unit="req", desc=cfg.label, file=sys.stderr)

    async def one(i: int, t0: float) -> RequestResult:
        async with slots or contextlib.nullcontext():
            schema = schemas[i % len(schemas)] if schemas else None
            r = await send(client, backend, i, prompts[i].text, cfg.output_len, cfg.ignore_eos, t0, schema)
        bar.update(1)
        return r

    t0 = time.perf_counter()
    tasks = []
    for i in range(len(prompts)):
        tasks.append(asyncio.create_task(one(i, t0)))
        if cfg.request_rate is not None and i + 1 < len(prompts):
            await asyncio.sleep(rng.expovariate(cfg.request_rate))
    results = list(await asyncio.gather(*tasks))
    duration = time.perf_counter() - t0
    bar.close()
    return results, duration


async def _count_tokens(results: list[RequestResult], prompts: list[Prompt], counter: TokenCounter | None) -> None:
    """After the run (the server is idle by then): fill the counts the server did not report."""
    for r in results:
        if r.prompt_tokens is None and prompts[r.index].tokens is not None:
            r.prompt_tokens, r.prompt_tokens_from = prompts[r.index].tokens, counter.name if counter else ""
        if not r.success:
            continue
        if r.output_tokens is None and counter is not None:
            with contextlib.suppress(httpx.HTTPError):  # the server went away: count the chunks
                r.output_tokens, r.output_tokens_from = len(await counter.encode(r.text)), counter.name
        if r.output_tokens is None:
            r.output_tokens, r.output_tokens_from = r.chunks, "chunks"
        r.tpot_s = tpot(r)


async def run(cfg: RunConfig, timeout_s: float = 6 * 3600, progress: bool = True) -> BenchResult:
    async with _client(timeout_s) as client:
        backend: Backend = BACKENDS[cfg.backend](cfg.url, cfg.model, cfg.temperature)
        try:
            await backend.prepare(client)
            counter = await find_counter(client, cfg.url, cfg.tokenizer)
            prompts = await _prompts(cfg, counter)
            # the warm-up prompt is none of the measured ones: it must not put them in the prefix cache (random
            # words of the longest length, cut to it by the counter: uncut, a word is a token or more)
            warm = (await synthetic_prompts(1, max(cfg.input_len), f"{cfg.seed}-warmup", counter))[0].text
        except httpx.HTTPError as e:
            raise BenchError(f"{cfg.url}: {type(e).__name__}: {e}") from e
        except (OSError, ValueError, KeyError) as e:
            raise BenchError(str(e)) from e
        # (constrained: a schema none of the measured requests uses, so that theirs still compile in the run)
        warm_schema = json_schemas(1, f"{cfg.seed}-warmup")[0] if cfg.json_schemas else None
        for _ in range(cfg.warmup):
            r = await send(client, backend, -1, warm, cfg.output_len, cfg.ignore_eos, time.perf_counter(), warm_schema)
            if not r.success:
                raise BenchError(f"the warm-up request failed ({backend.url()}): {r.error}")
        date = datetime.now(timezone.utc).isoformat(timespec="seconds")
        results, duration = await _timed(client, backend, cfg, prompts, progress)
        await _count_tokens(results, prompts, counter)
    summary = summarize(results, duration)
    summary.workload, summary.input_lens = "file" if cfg.prompts_file else cfg.workload, describe_inputs(cfg, prompts)
    return BenchResult(date=date, config=cfg, summary=summary, requests=results)


def table_rows(runs: list[tuple[str, Summary]]) -> list[dict[str, Any]]:
    """The printed table: one row per metric, one column per run."""
    rows = [{"metric": label, **{name: getattr(s, key) for name, s in runs}} for label, key in TABLE_ROWS]
    if any(s.errors for _, s in runs):
        rows.append(
            {
                "metric": "Errors",
                **{name: ", ".join(f"{k} x{v}" for k, v in s.errors.items()) or "-" for name, s in runs},
            }
        )
    return rows


def print_runs(runs: list[tuple[str, Summary]], title: str = "Serving benchmark") -> None:
    print_table(table_rows(runs), ["metric", *[name for name, _ in runs]], title=title)


def load_run(path: str | Path) -> tuple[str, Summary]:
    d = json.loads(Path(path).read_text())
    known = {f.name for f in fields(Summary)}
    summary = Summary(**{k: v for k, v in d["summary"].items() if k in known})
    return d["config"].get("label") or Path(path).stem, summary


def _lengths(spec: str) -> list[int]:
    try:
        return parse_lengths(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.serving",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    p.add_argument(
        "--backend",
        choices=sorted(BACKENDS),
        default="generate",
        help="generate: /generate (ours, shortfin); openai: /v1/completions (ours, llama.cpp, vLLM); "
        "triton: /v2/models/M/generate_stream (ours, TensorRT-LLM)",
    )
    p.add_argument(
        "--model",
        help="openai: the model name (default: the first of GET /v1/models); triton: the model (default: ensemble)",
    )
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument(
        "--concurrency",
        "--max-concurrency",
        type=int,
        default=None,
        help="at most this many requests in flight (default: no cap)",
    )
    p.add_argument(
        "--request-rate", type=float, default=math.inf, help="requests/s, Poisson arrivals (default: inf, all at once)"
    )
    p.add_argument(
        "--input-len",
        type=_lengths,
        default=[512],
        help="prompts' length in tokens (synthetic, grounded), or a comma-separated list to draw each request's "
        "from (32,1024; seeded, every listed length alike often)",
    )
    p.add_argument(
        "--workload",
        choices=WORKLOADS,
        default="synthetic",
        help="synthetic: random words; grounded: copy a source file given in the prompt (the output is in the "
        "input); chat: open questions in a User/Assistant exchange (their own lengths)",
    )
    p.add_argument("--output-len", type=int, default=128, help="max tokens to generate per request")
    p.add_argument("--prompts-file", help='JSON lines with "prompt", or one prompt per line (cycled to --num-prompts)')
    p.add_argument("--ignore-eos", action="store_true", help="generate --output-len tokens whatever the model says")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    p.add_argument(
        "--json-schemas",
        type=int,
        default=0,
        metavar="N",
        help="constrain each request's output to one of N generated JSON schemas, in the API's own field "
        "(structured output; default 0: unconstrained)",
    )
    p.add_argument(
        "--tokenizer",
        help="tokenizer.json (or its folder) for token counts the server does not give "
        "(default: the server's POST /tokenize when it has one)",
    )
    p.add_argument("--seed", type=int, default=0, help="seeds the prompts, their lengths' order and the arrival times")
    p.add_argument("--warmup", type=int, default=1, help="untimed requests first (0: none)")
    p.add_argument("--timeout", type=float, default=6 * 3600, help="seconds per request")
    p.add_argument("--label", help="this run's name in tables (default: backend and host)")
    p.add_argument("--json", help="write the results here (summary and per-request records)")
    p.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    p.add_argument("--compare", nargs="+", metavar="JSON", help="print one table of earlier runs' JSON files and exit")
    args = p.parse_args(argv)
    if args.compare is None:
        if args.num_prompts < 1 or args.output_len < 1:
            p.error("--num-prompts and --output-len must be positive")
        if args.prompts_file and args.workload != "synthetic":
            p.error("--prompts-file and --workload: one or the other")
        if args.temperature < 0:
            p.error("--temperature must be 0 (greedy) or more")
        if args.concurrency is not None and args.concurrency < 1:
            p.error("--concurrency must be positive")
        if not args.request_rate > 0:
            p.error("--request-rate must be positive (inf: all at once)")
    return args


def config_from(args: argparse.Namespace) -> RunConfig:
    return RunConfig(
        url=args.url.rstrip("/"),
        backend=args.backend,
        label=args.label or f"{args.backend} {urlparse(args.url).netloc or args.url}",
        model=args.model,
        num_prompts=args.num_prompts,
        concurrency=args.concurrency,
        request_rate=None if math.isinf(args.request_rate) else args.request_rate,
        input_len=args.input_len,
        output_len=args.output_len,
        prompts_file=args.prompts_file,
        ignore_eos=args.ignore_eos,
        seed=args.seed,
        warmup=args.warmup,
        tokenizer=args.tokenizer,
        json_schemas=args.json_schemas,
        workload=args.workload,
        temperature=args.temperature,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.compare:
        print_runs([load_run(path) for path in args.compare], title="Serving benchmarks")
        return 0
    cfg = config_from(args)
    rate = "inf" if cfg.request_rate is None else format_cell(cfg.request_rate)
    print(
        f"{cfg.backend} at {cfg.url}: {cfg.num_prompts} prompts, request rate {rate}/s, "
        f"concurrency {cfg.concurrency or 'uncapped'}, "
        + (f"prompts from {cfg.prompts_file}" if cfg.prompts_file else f"{cfg.workload} prompts")
        + ("" if cfg.prompts_file or cfg.workload == "chat" else f" of {describe_lengths(input_lengths(cfg))} tokens")
        + f", output {cfg.output_len} tokens{' (EOS ignored)' if cfg.ignore_eos else ''}"
        + (f", temperature {format_cell(cfg.temperature)}" if cfg.temperature else ", greedy"),
        file=sys.stderr,
    )
    try:
        result = asyncio.run(run(cfg, args.timeout, progress=not args.disable_tqdm))
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print_runs([(cfg.label, result.summary)])
    if args.json:
        write_json(args.json, result)
    return 0 if result.summary.completed else 1


if __name__ == "__main__":
    sys.exit(main())
