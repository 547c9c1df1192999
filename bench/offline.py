"""`python -m bench.offline`: prefill and decode speed straight through the compiled program (no HTTP).

    python -m bench.offline [--gguf M.gguf] [--dtype float32] [--dtype float16|bfloat16|w8a8|gguf] \\
        [--prefill-lens 128,512] [--decode-batches 1,4,16] [--decode-prompt-len 32] [--decode-steps 64] \\
        [--repeats 3] [--compare-llama-cpp] [--json out.json]
    python -m bench.offline --program OUT_DIR ...    # an existing export (model*.vmfb, model.irpa, config.json)

Default model: the embedded SmolLM2-135M-Instruct GGUF, exported + compiled once per `--dtype` through
export.artifacts (content-hash cached). What is measured, per program, with `serve.core.runner.Runner`:
  prefill    one prompt of each `--prefill-lens` length at batch 1 (random token ids), in calls of at most
             `--prefill-chunk` tokens as an idle server prefills it (serve.core.scheduler IDLE_PREFILL_CHUNK):
             tok/s = prompt tokens / time of the calls
  decode     at each `--decode-batches` size B: B sequences, each with its own pages, after a prefill of a
             `--decode-prompt-len` prompt; `--decode-steps` decode calls are timed (full logits back to
             the host each step, as the server gets them): tok/s = B x steps / time, and ms per step
Warm-up calls go first; each figure is the median of `--repeats` timings (time.perf_counter).
Roofline: this machine's read bandwidth is measured alongside (bench/membw.py); weight bytes are the
parameter tensors one decode step reads (the IRPA's tensors; an untied token embedding table is only
gathered from, so it is left out); "GB/s achieved" = weight bytes x batch-1 decode tok/s, and the
roofline ratio = achieved / measured bandwidth.
`--compare-llama-cpp` adds llama.cpp (llama-cpp-python, installed on demand: bench/llama_cpp.py) on the
same GGUF converted to each measured precision (for w8a8: Q8_0; for gguf: the file as it is), same
prompts, same threads, in the same run.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from serve.core.scheduler import IDLE_PREFILL_CHUNK

from . import membw
from .report import print_table, write_json
from .timing import SHORT, EngineRun, Plan, Timing, roofline, time_it, weight_bytes_read

# w8a8: f32 activations, export --quantization w8a8; gguf: the GGUF's quantizations kept (export --weights auto)
DTYPES = ("float32", "float16", "bfloat16", "w8a8", "gguf")


# ---------------------------------------------------------------- our program


@dataclass
class Program:
    dir: Path
    vmfb: Path
    parameters: list[Path]
    config: Path


def find_program(folder: Path) -> Program:
    folder = Path(folder)
    vmfbs = [folder / n for n in ("model.vmfb", "model_llvm-cpu.vmfb", "model_cpu.vmfb") if (folder / n).is_file()]
    vmfbs = vmfbs or sorted(folder.glob("*.vmfb"))
    if not vmfbs or not (folder / "config.json").is_file() or not (folder / "model.irpa").is_file():
        raise SystemExit(
            f"{folder}: expected a VMFB, model.irpa and config.json (an export's --output-dir "
            "with the compiled program next to it)"
        )
    from models.abi import ModelABI

    abi = ModelABI.load(folder / "config.json")
    return Program(
        folder, vmfbs[0], [folder / n for n in abi.parameter_files or ["model.irpa"]], folder / "config.json"
    )


def build_program(gguf: Path, dtype: str, plan: Plan, stride: int, extra: list[str]) -> Program:
    from export.artifacts import build
    from export.paged_llm import parse_args
    from models.default_model import export_args

    pages = max(512, plan.pages_needed(stride) + 1)
    dtype_args = export_args("none" if dtype == "float32" else dtype)
    default = parse_args(["--gguf-file", str(gguf), "--output-dir", "-"])  # only its defaults
    if (
        dtype in ("float32", "w8a8", "gguf")
        and not extra
        and stride == default.block_seq_stride
        and pages <= default.device_block_count
        and set(plan.decode_batches) <= set(default.bs_decode)
    ):
        # The plan fits the exporter's defaults: the very program `python -m serve` builds (and caches).
        args = dtype_args
    else:
        args = [
            *dtype_args,
            "--bs-prefill",
            ",".join(str(b) for b in default.bs_prefill),
            "--bs-decode",
            ",".join(str(b) for b in sorted(set(plan.decode_batches) | {1})),
            "--block-seq-stride",
            str(stride),
            "--device-block-count",
            str(pages),
            *extra,
        ]
    art = build(gguf, args)
    return Program(art.dir, art.vmfb, art.parameters, art.config)


def irpa_weight_bytes(irpa: Path) -> int:
    """Bytes of the parameter tensors a decode step reads (an untied embedding table is only gathered)."""
    from models.weights import read_irpa_meta

    _, _, meta = read_irpa_meta(irpa)
    sizes = {
        name: int(np.prod(info["shape"]))
        * np.dtype("uint16" if info["dtype"] == "bfloat16" else info["dtype"]).itemsize
        for name, info in meta["tensors"].items()
    }
    return weight_bytes_read(sizes)


def measure_program(prog: Program, plan: Plan, log: Callable[[str], None]) -> EngineRun:
    from models.abi import ModelABI
    from serve.core.runner import Runner

    abi = ModelABI.load(prog.config)
    stride = abi.block_seq_stride
    have = abi.paged_kv_cache.device_block_count - 1
    if plan.pages_needed(stride) > have:
        raise SystemExit(
            f"{prog.dir}: the program holds {have} KV pages, the plan needs "
            f"{plan.pages_needed(stride)}; fewer/shorter measurements or re-export with a larger "
            "--device-block-count"
        )
    missing = [b for b in plan.decode_batches if b not in abi.decode_batch_sizes]
    if missing or 1 not in abi.prefill_batch_sizes:
        raise SystemExit(
            f"{prog.dir}: decode batch sizes {missing} (or prefill batch 1) not exported; "
            f"it has prefill {abi.prefill_batch_sizes}, decode {abi.decode_batch_sizes}"
        )
    runner = Runner(prog.vmfb, prog.parameters, abi)
    timings = _time_runner(runner, abi, plan, log)
    del runner  # (its device memory goes before the next program's)
    gc.collect()
    dtype = abi.quantization if abi.quantization != "none" else abi.activation_dtype
    return EngineRun(
        "aotllm",
        dtype,
        irpa_weight_bytes(prog.parameters[0]),
        timings,
        str(prog.dir),
        {"vmfb": str(prog.vmfb), "vocab_size": abi.vocab_size},
    )


def _time_runner(runner, abi, plan: Plan, log: Callable[[str], None]) -> list[Timing]:
    """The plan's prefill and decode timings of one loaded program."""
    stride = abi.block_seq_stride
    data = plan.prompts(abi.vocab_size)
    timings = []

    def pages(first: int, count: int) -> np.ndarray:
        return np.arange(first, first + count, dtype=np.int64)

    for n in plan.prefill_lens:
        page_ids = pages(1, math.ceil(n / stride))[None]
        ends = list(range(plan.prefill_chunk, n, plan.prefill_chunk)) + [n]

        def prefill(n: int = n, ends: list[int] = ends, page_ids: np.ndarray = page_ids) -> None:
            for begin, end in zip([0] + ends, ends):  # (the pages so far, as the server's page table has them)
                runner.prefill(
                    data["prefill"][n][None, begin:end],
                    np.array([begin]),
                    np.array([end]),
                    page_ids[:, : math.ceil(end / stride)],
                )

        sec, reps = time_it(prefill, plan.repeats, plan.warmup)
        timings.append(Timing("prefill", n, sec, n, 1, reps))
        log(f"  prefill {n:4d} tokens: {1000 * sec:8.1f} ms  {n / sec:8.1f} tok/s")

    p, steps = plan.decode_prompt_len, plan.decode_steps
    per_seq = math.ceil((p + steps) / stride)
    padded = math.ceil(p / stride) * stride
    for b in plan.decode_batches:
        page_ids = pages(1, b * per_seq).reshape(b, per_seq)
        for s in range(b):  # each sequence's prompt, one prefill call each (batch 1)
            tokens = np.zeros((1, padded), np.int64)
            tokens[0, :p] = data["decode_prompts"][s]
            runner.prefill(tokens, np.zeros(1, np.int64), np.array([p], np.int64), page_ids[s : s + 1])
        step_tokens = data["decode_tokens"][:, :b]

        def run(b: int = b, step_tokens: np.ndarray = step_tokens, page_ids: np.ndarray = page_ids) -> None:
            for k in range(steps):  # position p + k: the same positions again on every repeat
                runner.decode(step_tokens[k], np.full(b, p + k + 1, np.int64), page_ids)

        sec, reps = time_it(run, plan.repeats, plan.warmup)
        timings.append(Timing("decode", b, sec, b * steps, steps, reps))
        log(f"  decode bs{b:<3d}: {1000 * sec / steps:8.2f} ms/step  {b * steps / sec:8.1f} tok/s")
    return timings


# ---------------------------------------------------------------- machine and table


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": membw.cpu_count(),
        "machine": platform.machine(),
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["memory_gib"] = round(pages * size / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    try:
        from iree.runtime import version

        info["iree"] = version.VERSION
    except ImportError:
        pass
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    return info


def machine_line(m: dict) -> str:
    parts = [f"{m['cpu']}, {m['cores']} cores"]
    if "memory_gib" in m:
        parts.append(f"{m['memory_gib']} GiB")
    parts.append(m["system"])
    if "iree" in m:
        parts.append(f"IREE {m['iree']}")
    if m.get("llama_cpp_python"):
        parts.append(f"llama-cpp-python {m['llama_cpp_python']}")
    return "; ".join(parts)


THROUGHPUT = {"tok/s", "GB/s", "ratio"}


def table_rows(runs: list[EngineRun], plan: Plan, bandwidth_gb_s: float) -> tuple[list[dict], list]:
    """Rows: metrics; columns: each run, then ours / llama.cpp at the same dtype (throughput rows only)."""
    metrics: list[tuple[str, str, Callable[[EngineRun], float | None]]] = []
    for n in plan.prefill_lens:
        metrics.append((f"prefill {n} tokens (tok/s)", "tok/s", lambda r, n=n: _tok_s(r.get("prefill", n))))
    for b in plan.decode_batches:
        metrics.append((f"decode batch {b} (tok/s)", "tok/s", lambda r, b=b: _tok_s(r.get("decode", b))))
    for b in plan.decode_batches:
        metrics.append((f"decode batch {b} (ms/step)", "ms", lambda r, b=b: _ms(r.get("decode", b))))
    metrics += [
        ("weights read per step (MB)", "MB", lambda r: r.weight_bytes / 1e6),
        ("roofline, batch 1 (tok/s)", "tok/s*", lambda r: roofline(r, bandwidth_gb_s)["roofline_tok_s"]),
        ("GB/s achieved, batch 1", "GB/s", lambda r: roofline(r, bandwidth_gb_s)["gb_s_achieved"]),
        ("fraction of measured bandwidth", "ratio", lambda r: roofline(r, bandwidth_gb_s)["roofline_ratio"]),
    ]
    columns: list = [("metric", "metric")]
    for i, r in enumerate(runs):
        columns.append((f"c{i}", r.label))
    pairs = []
    for dt in dict.fromkeys(r.dtype for r in runs):
        ours = next((i for i, r in enumerate(runs) if r.engine == "aotllm" and r.dtype == dt), None)
        theirs = next((i for i, r in enumerate(runs) if r.engine == "llama.cpp" and r.dtype == dt), None)
        if ours is not None and theirs is not None:
            pairs.append((ours, theirs, f"ours/llama.cpp {SHORT.get(dt, dt)}"))
    for k, (_, _, header) in enumerate(pairs):
        columns.append((f"x{k}", header))
    rows = []
    for name, unit, fn in metrics:
        row: dict = {"metric": name}
        values = [fn(r) for r in runs]
        for i, v in enumerate(values):
            row[f"c{i}"] = v
        for k, (a, b, _) in enumerate(pairs):
            row[f"x{k}"] = values[a] / values[b] if unit in THROUGHPUT and values[a] and values[b] else None
        rows.append(row)
    return rows, columns


def _tok_s(t: Timing | None) -> float | None:
    return t.tok_s if t else None


def _ms(t: Timing | None) -> float | None:
    return t.ms if t else None


# ---------------------------------------------------------------- CLI


def _int_list(s: str) -> list[int]:
    try:
        out = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r}: expected comma-separated integers, e.g. 1,4,16") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"{s!r}: expected positive integers")
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.offline",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--gguf", type=Path, help="model (default: the embedded SmolLM2-135M-Instruct GGUF)")
    p.add_argument(
        "--program",
        type=Path,
        action="append",
        default=[],
        help="measure an existing export folder instead of building (repeatable)",
    )
    p.add_argument(
        "--dtype",
        action="append",
        choices=DTYPES,
        help="activation/weight dtype of the program to build (repeatable; default float32); w8a8 is "
        "compared with llama.cpp's Q8_0",
    )
    p.add_argument("--export-args", default="", help="extra export.paged_llm arguments for the built programs")
    p.add_argument("--prefill-lens", type=_int_list, default=[128, 512])
    p.add_argument(
        "--prefill-chunk",
        type=int,
        default=IDLE_PREFILL_CHUNK,
        help="tokens per prefill call of ours (llama.cpp takes each prompt in one call)",
    )
    p.add_argument("--decode-batches", type=_int_list, default=[1, 4, 16])
    p.add_argument("--decode-prompt-len", type=int, default=32, help="prompt tokens before the timed decode")
    p.add_argument("--decode-steps", type=int, default=64, help="decode steps per timing")
    p.add_argument("--repeats", type=int, default=3, help="timings per figure (the median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    p.add_argument("--block-seq-stride", type=int, default=16, help="page size of the built programs")
    p.add_argument("--seed", type=int, default=0, help="seeds the random prompt tokens")
    p.add_argument("--membw-mib", type=int, default=1024, help="array size of the bandwidth measurement")
    p.add_argument(
        "--compare-llama-cpp",
        action="store_true",
        help="also time llama.cpp (llama-cpp-python, installed on demand) on the same GGUF at each measured precision",
    )
    p.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: every core)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.program and args.dtype:
        p.error("--dtype builds programs from --gguf; give it or --program, not both")
    if min(args.repeats, args.decode_steps, args.decode_prompt_len, args.prefill_chunk) < 1 or args.warmup < 0:
        p.error("--repeats, --decode-steps, --decode-prompt-len and --prefill-chunk must be >= 1, --warmup >= 0")
    if args.compare_llama_cpp and args.program and not args.gguf:
        p.error("--compare-llama-cpp with --program needs --gguf (the model llama.cpp runs)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python -m bench.offline " + shlex.join(sys.argv[1:] if argv is None else argv)
    plan = Plan(
        args.prefill_lens,
        args.decode_batches,
        args.decode_prompt_len,
        args.decode_steps,
        args.repeats,
        args.warmup,
        args.seed,
        args.prefill_chunk,
    )

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    machine = machine_info()
    gguf = args.gguf
    if gguf is None and not args.program:
        from models.default_model import smollm2_gguf

        gguf = smollm2_gguf()
    programs: list[Program] = [find_program(d) for d in args.program]
    for dt in [] if args.program else (args.dtype or ["float32"]):
        log(f"[bench] building the {dt} program of {gguf} (cached after the first time)")
        programs.append(build_program(gguf, dt, plan, args.block_seq_stride, shlex.split(args.export_args)))

    log(f"[bench] memory bandwidth ({args.membw_mib} MiB, numpy)")
    bw = membw.measure(args.membw_mib)
    log(f"  read {bw.read_gb_s:.1f} GB/s ({bw.method}); " + ", ".join(f"{k} {v:.1f}" for k, v in bw.methods.items()))

    runs: list[EngineRun] = []
    for prog in programs:
        log(f"[bench] aotllm: {prog.vmfb}")
        runs.append(measure_program(prog, plan, log))

    if args.compare_llama_cpp:
        from . import llama_cpp

        lib = llama_cpp.ensure_installed(log)
        machine["llama_cpp_python"] = getattr(lib, "__version__", "?")
        threads = args.threads or membw.cpu_count()
        vocab = next(r.notes["vocab_size"] for r in runs if r.engine == "aotllm")
        data = plan.prompts(vocab)  # the very token ids our programs got
        for dt in dict.fromkeys(r.dtype for r in runs if r.engine == "aotllm"):
            path = llama_cpp.convert(lib, gguf, dt, log)
            log(f"[bench] llama.cpp {dt}: {path} ({threads} threads)")
            runs.append(llama_cpp.measure(lib, path, dt, plan, data, threads, log))

    # one more bandwidth reading after the runs: the roofline uses the better of the two
    bw_after = membw.measure(args.membw_mib)
    if bw_after.read_gb_s > bw.read_gb_s:
        bw = bw_after
    rows, columns = table_rows(runs, plan, bw.read_gb_s)
    title = (
        f"bench.offline: {Path(gguf).name if gguf else ', '.join(str(p.dir) for p in programs)}\n"
        f"machine: {machine_line(machine)}\n"
        f"memory bandwidth (numpy, {bw.method}, best of 2 x 5): {bw.read_gb_s:.1f} GB/s read\n"
        f"command: {command}"
    )
    print_table(rows, columns, title=title)
    if args.json:
        result = {
            "benchmark": "bench.offline",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": command,
            "machine": machine,
            "model": str(gguf) if gguf else None,
            "plan": {
                "prefill_lens": plan.prefill_lens,
                "decode_batches": plan.decode_batches,
                "decode_prompt_len": plan.decode_prompt_len,
                "decode_steps": plan.decode_steps,
                "repeats": plan.repeats,
                "warmup": plan.warmup,
                "seed": plan.seed,
                "prefill_chunk": plan.prefill_chunk,
            },
            "memory_bandwidth": {
                "read_gb_s": bw.read_gb_s,
                "method": bw.method,
                "size_mib": bw.size_mib,
                "threads": bw.threads,
                "methods_gb_s": bw.methods,
            },
            "runs": [r.to_json(bw.read_gb_s) for r in runs],
            "table": [{"metric": row["metric"], **{h: row[k] for k, h in columns[1:]}} for row in rows],
        }
        write_json(args.json, result)
        log(f"[bench] wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
