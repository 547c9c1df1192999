"""python -m export.paged_llm: Llama GGUF / HF folder / IRPA -> MLIR (prefill_bs{N}, decode_bs{N}) + IRPA + config.json.

Weights are external parameters (`#stream.parameter.named<"model"::NAME>`), so the MLIR and the VMFB
stay small and the server loads the weights from the IRPA written here.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.export import Dim

from export import parameters
from models import amx, cpu, paged_attention, qmatmul
from models.abi import QUANTIZATIONS, ModelABI, PagedKVCache
from models.config import ModelError
from models.llama import DTYPES, PagedLlama
from models.weights import ModelWeights, load_weights, write_irpa

MODULE_NAME = "module"


def _int_list(s: str) -> list[int]:
    try:
        out = sorted({int(x) for x in s.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of integers, got {s!r}") from None
    if not out or out[0] < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be positive integers, got {s!r}")
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m export.paged_llm", description=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--gguf-file", type=Path)
    src.add_argument("--hf-dir", type=Path, help="folder with config.json + model.safetensors[.index.json]")
    src.add_argument("--irpa-file", type=Path, help="an IRPA written by this tool")
    p.add_argument("--output-dir", type=Path, help="writes model.mlir, config.json, model.irpa, tokenizer files")
    p.add_argument("--output-mlir", type=Path)
    p.add_argument("--output-config", type=Path)
    p.add_argument("--output-irpa", type=Path)
    p.add_argument("--bs-prefill", type=_int_list, default=[1, 4])
    p.add_argument("--bs-decode", type=_int_list, default=[1, 4, 8, 16])
    p.add_argument("--block-seq-stride", type=int, default=16)
    p.add_argument(
        "--device-block-count",
        type=int,
        default=512,
        help="KV pages the program holds (page 0 is padding); the server may use fewer",
    )
    p.add_argument(
        "--weights",
        choices=["auto", "float32", "bfloat16", "float16", "w8a8"],
        default="auto",
        help="auto: a GGUF's quantized matrices stay in their quantization (models.qlinear; Q8_0, Q4_0, "
        "Q4_1, Q5_x, Q4_K, Q5_K kept, Q6_K and other K-quants as 8 bits), everything else float32; an "
        "F16 / BF16 GGUF serves in bfloat16; "
        "float32 / bfloat16 / float16: every weight dequantized to that type (the activation dtype); "
        "w8a8: as --quantization w8a8",
    )
    p.add_argument(
        "--cpu-matmul",
        nargs="?",
        const="host",
        choices=["host", *qmatmul.ISAS],
        help="the kept quantized matmuls run as a hand-written x86-64 kernel (models.qmatmul; built with gcc) "
        "for AVX-512 VNNI or AVX2 (alone: the best this CPU has); without it they are dequantized in the "
        "graph (any target, slower); llvm-cpu only",
    )
    p.add_argument(
        "--activation-dtype", choices=sorted(DTYPES), default=None, help="default: float32 (--weights auto: see there)"
    )
    p.add_argument("--kv-cache-dtype", choices=sorted(DTYPES), default=None, help="default: activation dtype")
    p.add_argument(
        "--quantization",
        choices=QUANTIZATIONS,
        default="none",
        help="w8a8: int8 weights and per-token int8 activations (models.quant), calibrated here on "
        "a built-in text; f32 activations only, tensor parallelism 1",
    )
    p.add_argument(
        "--amx",
        action="store_true",
        help="with --quantization w8a8: the int8 matmuls run as Intel AMX tile kernels (models.amx; built "
        "with gcc); the program then runs only on x86-64 CPUs with AMX-INT8 (Sapphire Rapids and later)",
    )
    p.add_argument(
        "--cpu-attention",
        nargs="?",
        const="host",
        choices=["host", *paged_attention.ISAS],
        help="attention over the paged cache runs as a hand-written x86-64 kernel that reads each page once "
        "(models.paged_attention; built with gcc) for AVX2 or AVX-512 (alone: the best this CPU has); much "
        "faster at long contexts; llvm-cpu only",
    )
    p.add_argument(
        "--static-batch",
        "--static-decode",
        dest="static_decode",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="trace each decode batch size, and prefill at batch 1, with a static batch (fast "
        "one-token steps and one-prompt prefills; one more trace and compile each); --no-static-batch: "
        "everything shares one dynamic trace",
    )
    p.add_argument("--top-k", type=int, default=None, help="decode returns on-device top-k (1: argmax)")
    p.add_argument("--max-seq-len", type=int, default=None, help="default: the model's context length")
    p.add_argument(
        "--tensor-parallelism-size",
        type=int,
        default=None,
        help="N devices (default: the --irpa-file's sharding, else 1); unsharded weights are sharded "
        "here as `python -m sharding` does",
    )
    args = p.parse_args(argv)
    if not args.output_dir and not (args.output_mlir and args.output_config and args.output_irpa):
        p.error("give --output-dir, or all of --output-mlir, --output-config and --output-irpa")
    if args.output_dir:
        args.output_mlir = args.output_mlir or args.output_dir / "model.mlir"
        args.output_config = args.output_config or args.output_dir / "config.json"
        args.output_irpa = args.output_irpa or args.output_dir / "model.irpa"
    if args.block_seq_stride < 1 or args.device_block_count < 2:
        p.error("--block-seq-stride must be >= 1 and --device-block-count >= 2 (page 0 is padding)")
    if args.top_k is not None and args.top_k < 1:
        p.error("--top-k must be >= 1")
    if args.weights in ("float32", "bfloat16", "float16"):
        if args.activation_dtype not in (None, args.weights):
            p.error(f"--weights {args.weights} computes in {args.weights}: drop --activation-dtype")
        args.activation_dtype = args.weights
    if args.weights == "w8a8":
        args.quantization = "w8a8"
    if args.quantization == "w8a8" and args.weights not in ("auto", "w8a8"):
        p.error(f"--quantization w8a8 and --weights {args.weights} disagree")
    if args.cpu_matmul == "host":
        args.cpu_matmul = cpu.matmul_isa()
        if args.cpu_matmul is None:
            p.error("--cpu-matmul needs an x86-64 CPU with AVX2, FMA and F16C (or name the ISA to build for)")
    if args.cpu_attention == "host":
        args.cpu_attention = cpu.attention_isa()
        if args.cpu_attention is None:
            p.error("--cpu-attention needs an x86-64 CPU with AVX2, FMA and F16C (or name the ISA to build for)")
    return args


class _Stage:
    """Prints one line per pipeline stage with its wall time."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        print(f"[export] {self.name} ...", file=sys.stderr, flush=True)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # (KiB on Linux)
            print(
                f"[export] {self.name}: {time.perf_counter() - self.t0:.1f} s (peak memory so far {peak:.2f} GiB)",
                file=sys.stderr,
                flush=True,
            )


def export_forward(model: PagedLlama, static_decode: Sequence[int] = (), static_prefill: Sequence[int] = ()):
    """Trace `PagedLlama.forward` as `forward`, every dimension dynamic but the page size (weights
    external), as `forward_decode_bs{B}` for each B in `static_decode`: batch B and one token static,
    only the page-table width and the page count dynamic, and as `forward_prefill_bs{B}` for each B in
    `static_prefill`: batch B static, the chunk length dynamic.

    Why static traces: with a dynamic batch IREE's data tiling lays the weight matmuls out for a general row count
    (8-row tiles with AVX2) instead of a matrix-vector product, and a one-token decode step pays for it
    (README "Export and compile by hand"). The same holds
    for prefill's output head, which reads one row per sequence: with a dynamic batch it computes a 16-row
    tile for a one-prompt prefill, so batch 1 gets a static trace of its own (the time to first token).
    Other prefill batch sizes and embed share the dynamic trace; each static trace costs one more trace
    and compile.
    `entry_points` adds the public prefill_bs{N} / decode_bs{N} functions around them. The traced
    functions are pure (they return the new cache); the entry points store it in the module's global.
    With tp > 1 each rank's parameters are placed on its device (`stream.affinity`), the rest on device 0.
    """
    from iree.turbine import aot

    _turbine_custom_op_compat()
    if model.tp > 1:
        for name, param in model.named_parameters():
            rank = int(name.split(".")[1]) if name.startswith("rank.") else 0
            aot.DeviceTensorTrait(rank).set(param)
    aot.externalize_module_parameters(model, external_scope="model")
    fxb = aot.FxProgramsBuilder(model)
    i64 = torch.int64
    batch, seq, cols = Dim("batch", min=1, max=1024), Dim("seq", min=1, max=1 << 16), Dim("cols", min=1, max=1 << 14)
    caches = model.allocate_cache(4)
    caches = caches if isinstance(caches, list) else [caches]
    pages = Dim("pages", min=2)
    cache_dims = ({0: pages},) * len(caches)
    dynamic = (
        {0: batch, 1: seq},
        {0: batch},
        {0: batch},
        {0: batch, 1: cols},
        cache_dims,
    )  # every dimension but the page size

    def _forward(m, tokens, start_positions, seq_lens, page_ids, *caches):
        return m.forward(tokens, start_positions, seq_lens, page_ids, *caches)

    def _mixed(m, dec_tokens, dec_seq_lens, dec_page_ids, tokens, start_positions, seq_lens, page_ids, *caches):
        return m.forward_mixed(
            dec_tokens, dec_seq_lens, dec_page_ids, tokens, start_positions, seq_lens, page_ids, *caches
        )

    def _score(m, tokens, start_positions, seq_lens, page_ids, *caches):
        return m.forward_score(tokens, start_positions, seq_lens, page_ids, *caches)

    def args(b: int, s: int):
        return (
            torch.zeros(b, s, dtype=i64),
            torch.zeros(b, dtype=i64),
            torch.ones(b, dtype=i64),
            torch.ones(b, 3, dtype=i64),
            *caches,
        )

    # No decomposition pass: it would re-trace the whole program, and torch-mlir lowers the remaining
    # aten ops itself. (export_program traces right away: it must run inside.)
    with aot.decompositions.extend_aot_decompositions(from_current=False):
        fxb.export_program(
            _forward,
            name="forward",
            args=args(2, 3),
            strict=False,
            dynamic_shapes=dynamic,
        )
        for b in static_decode:
            fxb.export_program(
                _forward,
                name=f"forward_decode_bs{b}",
                args=args(b, 1),
                strict=False,
                dynamic_shapes=(None, None, None, {1: cols}, cache_dims),
            )
        # The mixed step (decode rows and one prefill chunk in one call) and all-position scoring: one dynamic
        # trace each. The chunk's batch is static 1: the projections run over the rows of both groups flattened
        # into one dimension, and splitting a dynamic dimension into two (batch x chunk length) back, IREE
        # 3.13's torch lowering assumed the batch to be 1 (a runtime shape assertion). (Example sizes all
        # differ: equal example sizes would be traced as one symbol.)
        dbatch, dcols = Dim("dbatch", min=1, max=1024), Dim("dcols", min=1, max=1 << 14)
        fxb.export_program(
            _mixed,
            name="forward_mixed",
            args=(torch.zeros(5, 1, dtype=i64), torch.ones(5, dtype=i64), torch.ones(5, 4, dtype=i64), *args(1, 3)),
            strict=False,
            dynamic_shapes=(
                {0: dbatch},
                {0: dbatch},
                {0: dbatch, 1: dcols},
                {1: seq},
                None,
                None,
                {1: cols},
                cache_dims,
            ),
        )
        fxb.export_program(
            _score,
            name="forward_score",
            args=args(2, 3),
            strict=False,
            dynamic_shapes=dynamic,
        )
        for b in static_prefill:
            fxb.export_program(
                _forward,
                name=f"forward_prefill_bs{b}",
                args=args(b, 3),
                strict=False,
                dynamic_shapes=({1: seq}, None, None, {1: cols}, cache_dims),
            )
        return aot.export(fxb)


def _turbine_custom_op_compat() -> None:
    """iree-turbine 3.9's custom-op expansion (models.page_gather, the device transfers of tensor
    parallelism) calls `Type.isinstance(x)`, which the MLIR bindings of iree-base-compiler 3.13 no longer
    have; the bindings downcast types themselves, so Python's isinstance is the same test."""
    import iree.compiler.ir as ir

    for name in dir(ir):
        cls = getattr(ir, name)
        if isinstance(cls, type) and name[:1].isupper() and not hasattr(cls, "isinstance"):
            try:
                cls.isinstance = staticmethod(lambda v, cls=cls: isinstance(v, cls))
            except (TypeError, AttributeError):  # (immutable builtins)
                pass


_TRACED_RE = re.compile(r"^(\s*)func\.func @(forward\w*)\((.*)\) -> \((.*)\) (attributes .*)?\{$", re.M)


@dataclass
class _Traced:
    """One traced forward's signature: its argument and result types (the KV caches last in both)."""

    name: str
    args: list[str]
    results: list[str]


# Each entry point's parameters in its own order: (name, index of the traced function's argument it feeds).
# decode takes shortfin's order, seq_lens before start_positions.
_PREFILL_PARAMS = [("tokens", 0), ("start_positions", 1), ("seq_lens", 2), ("page_ids", 3)]
_DECODE_PARAMS = [("tokens", 0), ("seq_lens", 2), ("start_positions", 1), ("page_ids", 3)]
_MIXED_PARAMS = [
    ("dec_tokens", 0),
    ("dec_seq_lens", 1),
    ("dec_page_ids", 2),
    ("tokens", 3),
    ("start_positions", 4),
    ("seq_lens", 5),
    ("page_ids", 6),
]


def entry_points(mlir: str, prefill_bs: list[int], decode_bs: list[int], top_k: int | None, pages: int) -> str:
    """Add the public entry points (the ABI in models/abi.py) around the traced functions: prefill_bs{N} /
    decode_bs{N} / embed_bs{N} around `forward` (or `forward_prefill_bs{N}` / `forward_decode_bs{N}` where
    traced; embed_bs{N} is prefill returning every position's hidden states instead of the logits), and
    `mixed` / `score` around `forward_mixed` / `forward_score` where traced.

    The KV cache lives in the module, a mutable global of `pages` pages: each entry point loads it, calls
    the traced function and stores the new cache. IREE updates a global in place; a cache passed as a
    mutable argument is copied in and out on every call (O(pool size)).
    Entry points around `forward` keep its dynamic signature (static-shape wrappers around a dynamic
    trace, once inlined, trip IREE's scatter verifier: static shapes need their own trace).
    """
    traced, ind = {}, None
    for m in _TRACED_RE.finditer(mlir):
        ind = m.group(1)
        args = [a.split(": ", 1)[1] for a in re.split(r", (?=%arg)", m.group(3))]
        results = [t.strip() for t in re.split(r", (?=!torch)", m.group(4))]
        traced[m.group(2)] = _Traced(m.group(2), args, results)
    if "forward" not in traced:
        raise RuntimeError("traced module has no @forward function")
    # one KV-cache slab per device, each device's the same shape: what `forward` returns after logits, hidden
    tp = len(traced["forward"].results) - 2
    t_vcache = traced["forward"].results[2]
    elems, dtype = re.fullmatch(r"!torch\.vtensor<\[\?,(\d+)\],(\w+)>", t_vcache).groups()
    dtype = dtype.removeprefix("s")  # torch's si32 is the builtin i32 (a packed 16-bit cache)
    zero = "0" if dtype.startswith("i") else "0.0"
    t_global, t_dyn = f"tensor<{pages}x{elems}x{dtype}>", f"tensor<?x{elems}x{dtype}>"
    cache_args = ", ".join(f"%c{r}" for r in range(tp))

    def body(name: str, fn: _Traced, params: list[tuple[str, int]], result: int) -> list[str]:
        n_in, n_out = len(fn.args) - tp, len(fn.results) - tp
        call_types = f"({', '.join(fn.args)}) -> ({', '.join(fn.results)})"
        ret_types, tail = fn.results[result], [f"{ind}  return %r#{result} : {fn.results[result]}"]
        if name.startswith("decode") and top_k:
            rows = re.match(r"!torch\.vtensor<\[(\?|\d+),", fn.results[0]).group(1)
            ret_types = f"!torch.vtensor<[{rows},{top_k}],f32>, !torch.vtensor<[{rows},{top_k}],si64>"
            tail = [
                f"{ind}  %k = torch.constant.int {top_k}",
                f"{ind}  %dim = torch.constant.int -1",
                f"{ind}  %true = torch.constant.bool true",
                f"{ind}  %v, %i = torch.aten.topk %r#0, %k, %dim, %true, %true : {fn.results[0]}, !torch.int, "
                f"!torch.int, !torch.bool, !torch.bool -> {ret_types}",
                f"{ind}  return %v, %i : {ret_types}",
            ]
        signature = ", ".join(f"%{p}: {fn.args[i]}" for p, i in params)
        lines = [f"{ind}func.func @{name}({signature}) -> ({ret_types}) {{"]
        for r in range(tp):
            lines += [
                f"{ind}  %g{r} = util.global.load @{_cache_global(r)} : {t_global}",
                f"{ind}  %gd{r} = tensor.cast %g{r} : {t_global} to {t_dyn}",
                f"{ind}  %c{r} = torch_c.from_builtin_tensor %gd{r} : {t_dyn} -> {t_vcache}",
            ]
        inputs = ", ".join(f"%{p}" for p, _ in sorted(params, key=lambda p: p[1]))
        assert len(params) == n_in
        lines.append(f"{ind}  %r:{n_out + tp} = func.call @{fn.name}({inputs}, {cache_args}) : {call_types}")
        for r in range(tp):
            lines += [
                f"{ind}  %n{r} = torch_c.to_builtin_tensor %r#{n_out + r} : {t_vcache} -> {t_dyn}",
                f"{ind}  %ns{r} = tensor.cast %n{r} : {t_dyn} to {t_global}",
                f"{ind}  util.global.store %ns{r}, @{_cache_global(r)} : {t_global}",
            ]
        return lines + tail + [f"{ind}}}"]

    out = []
    for r in range(tp):  # rank r's slab lives on device r
        affinity = f" {{stream.affinity = #hal.device.promise<@__device_{r}>}}" if tp > 1 else ""
        out += [
            f"{ind}util.global private mutable @{_cache_global(r)}{affinity} = dense<{zero}> : {t_global}",
            f"{ind}func.func @read_{_cache_global(r)}() -> {t_global} {{",  # tests and debugging: a copy
            f"{ind}  %g = util.global.load @{_cache_global(r)} : {t_global}",
            f"{ind}  return %g : {t_global}",
            f"{ind}}}",
        ]
    for bs in prefill_bs:
        out += body(f"prefill_bs{bs}", traced.get(f"forward_prefill_bs{bs}", traced["forward"]), _PREFILL_PARAMS, 0)
        out += body(f"embed_bs{bs}", traced["forward"], _PREFILL_PARAMS, 1)
    for bs in decode_bs:
        out += body(f"decode_bs{bs}", traced.get(f"forward_decode_bs{bs}", traced["forward"]), _DECODE_PARAMS, 0)
    if "forward_mixed" in traced:
        out += body("mixed", traced["forward_mixed"], _MIXED_PARAMS, 0)
    if "forward_score" in traced:
        out += body("score", traced["forward_score"], _PREFILL_PARAMS, 0)
    for name in traced:
        mlir = re.sub(rf"func\.func @{name}\(", f"func.func private @{name}(", mlir, count=1)
    end = [x.start() for x in re.finditer(r"^}$", mlir, re.M)][-1]  # the module's closing brace
    return mlir[:end] + "\n".join(out) + "\n" + mlir[end:]


def _cache_global(rank: int) -> str:
    return "kv_cache" if rank == 0 else f"kv_cache_{rank}"


def model_state(model: PagedLlama, weights: ModelWeights) -> ModelWeights:
    """The weights as the exported program names and types them."""
    import ml_dtypes

    tensors = {
        k: v.detach().contiguous().numpy()
        if v.dtype != torch.bfloat16
        else v.detach().contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        for k, v in model.state_dict().items()
    }
    return ModelWeights(weights.config, tensors, weights.source, model.tp)


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    source = args.gguf_file or args.hf_dir or args.irpa_file
    outputs = [args.output_mlir, args.output_config, args.output_irpa]
    stamp = args.output_config.with_name(".aotllm-export-key")
    key = None
    if source.exists():
        from export.artifacts import artifact_key

        key = artifact_key(source, [str(a) for a in (argv if argv is not None else sys.argv[1:])])
        if stamp.is_file() and stamp.read_text() == key and all(p.is_file() for p in outputs):
            print(f"[export] up to date: {args.output_mlir} (same inputs and options)", file=sys.stderr)
            return 0
    try:
        with _Stage("read the model's header"):
            weights = load_weights(args.gguf_file, args.hf_dir, args.irpa_file)
            tp = args.tensor_parallelism_size or weights.tp
            if weights.tp not in (1, tp):
                raise ModelError(
                    f"{weights.source} is sharded {weights.tp} ways, not {tp}; re-shard the "
                    "unsharded model with python -m sharding"
                )
            auto = args.weights == "auto" and args.quantization != "w8a8" and args.gguf_file
            kept = parameters.kept_formats(weights) if auto else {}
            if kept and tp > 1:
                raise ModelError(
                    "kept GGUF quantizations are not sharded: give --weights float32 (or bfloat16) with "
                    "--tensor-parallelism-size"
                )
            quantization = "gguf" if kept else args.quantization
            if args.activation_dtype is None:  # a 16-bit float GGUF serves in bfloat16 (2x float32's speed)
                sixteen = auto and not kept and parameters.float16_matrices(weights)
                args.activation_dtype = "bfloat16" if sixteen else "float32"
            dtype = DTYPES[args.activation_dtype]
            kv_dtype_name = args.kv_cache_dtype or args.activation_dtype
            kv_dtype = DTYPES[kv_dtype_name]
            if kept:
                again = parameters.requantized_types(weights, kept)
                print(
                    f"[export] {len(kept)} matrices kept quantized"
                    + (f" ({', '.join(sorted(again))} rescaled to 8 bits)" if again else ""),
                    file=sys.stderr,
                )
        args.output_mlir.parent.mkdir(parents=True, exist_ok=True)
        with _Stage(f"write parameters {args.output_irpa}" + (f" + {tp} rank files" if tp > 1 else "")):
            if quantization == "w8a8" or tp > 1:  # (the whole float model in memory: calibration, sharding)
                if tp > 1 and weights.tp == 1:
                    from sharding import shard_tensors

                    weights = shard_tensors(weights, tp)
                model = PagedLlama.from_weights(weights, args.block_seq_stride, dtype, kv_dtype, tp)
                if quantization == "w8a8":
                    model = quantize_w8a8(model, args)
                if args.amx:
                    enable_amx(model, args)
                if tp > 1:
                    from sharding import write_sharded

                    param_files = write_sharded(model_state(model, weights), args.output_irpa)
                else:
                    write_irpa(model_state(model, weights), args.output_irpa)
                    param_files = [args.output_irpa]
            else:  # one tensor at a time (export.parameters)
                with torch.device("meta"):
                    shapes = PagedLlama(weights.config, args.block_seq_stride, dtype, kv_dtype, 1, quantization, kept)
                parameters.write(weights, shapes, kept, args.output_irpa, gguf=args.gguf_file is not None)
                param_files = [args.output_irpa]
        with _Stage("trace"):  # shapes only: the weights are external parameters
            model = PagedLlama.uninitialized(
                weights.config, args.block_seq_stride, dtype, kv_dtype, tp, quantization, kept
            )
            if args.amx:
                enable_amx(model, args)
            try:
                if args.cpu_attention:
                    paged_attention.enable(model, args.cpu_attention)
                if args.cpu_matmul and kept:
                    qmatmul.enable(model, args.cpu_matmul)
            except (paged_attention.KernelError, qmatmul.KernelError) as e:
                raise ModelError(str(e)) from e
            output = export_forward(
                model,
                args.bs_decode if args.static_decode else [],
                [1] if args.static_decode and 1 in args.bs_prefill else [],
            )
        with _Stage("tokenizer"):
            tok_files, tok_info = write_tokenizer(args, args.output_config.parent)
        with _Stage(f"write {args.output_mlir} (prefill_bs{args.bs_prefill}, decode_bs{args.bs_decode})"):
            mlir = entry_points(
                str(output.mlir_module), args.bs_prefill, args.bs_decode, args.top_k, args.device_block_count
            )
            args.output_mlir.write_text(mlir)
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    c = weights.config
    abi = ModelABI(
        module_name=MODULE_NAME,
        module_abi_version=1,
        max_seq_len=args.max_seq_len or c.max_seq_len,
        attn_head_dim=c.head_dim,
        prefill_batch_sizes=args.bs_prefill,
        decode_batch_sizes=args.bs_decode,
        transformer_block_count=c.num_layers,
        has_prefill_position=True,
        logits_normalization="none",
        top_k=args.top_k,
        paged_kv_cache=PagedKVCache(
            attention_head_count_kv=c.num_kv_heads,
            block_seq_stride=args.block_seq_stride,
            device_block_count=args.device_block_count,
            kv_cache_dtype=kv_dtype_name,
            paged_kv_block_size_elements_per_device=[model.page_elems] * tp,
        ),
        vocab_size=c.vocab_size,
        activation_dtype=args.activation_dtype,
        quantization=quantization,
        cpu_features=sorted(
            ({amx.CPU_FEATURE} if args.amx else set())
            | ({paged_attention.ISAS[args.cpu_attention]} if args.cpu_attention else set())
            | ({qmatmul.ISAS[args.cpu_matmul]} if args.cpu_matmul and kept else set())
        ),
        attention_head_count=c.num_heads,
        hidden_size=c.hidden_size,
        has_embed=True,
        has_mixed=True,
        has_score=True,
        tensor_parallelism_size=tp,
        parameter_files=[p.name for p in param_files],
        bos_token_id=tok_info.bos_id if tok_info else None,
        eos_token_ids=sorted(set(tok_info.eot_ids)) if tok_info else [],
        add_bos_token=bool(tok_info and tok_info.add_bos),
        tokenizer_files=tok_files,
        source=str(weights.source),
    )
    abi.save(args.output_config)
    if key:
        stamp.write_text(key)
    print(
        f"[export] wrote {args.output_mlir}, {args.output_irpa}, {args.output_config} "
        f"in {time.perf_counter() - t_start:.1f} s",
        file=sys.stderr,
    )
    return 0


def enable_amx(model: PagedLlama, args) -> None:
    if args.quantization != "w8a8":
        raise ModelError("--amx runs the W8A8 int8 matmuls on AMX tiles: add --quantization w8a8")
    try:
        amx.object_path()  # gcc builds the kernel now, so a failure shows before the trace
        amx.enable(model)
    except amx.AmxError as e:
        raise ModelError(str(e)) from e


def quantize_w8a8(model: PagedLlama, args) -> PagedLlama:
    from models.gguf_tokenizer import tokenizer_near_weights
    from models.quant import CALIBRATION_TEXT, random_calibration_ids

    if model.tp > 1 or model.dtype != torch.float32:
        raise ModelError(
            "--quantization w8a8 needs --activation-dtype float32 and tensor parallelism 1 "
            f"(got {args.activation_dtype}, {model.tp} devices)"
        )
    found = tokenizer_near_weights(args.gguf_file, args.hf_dir, args.irpa_file)
    if found is not None:
        ids = found[0].encode(CALIBRATION_TEXT, add_special_tokens=False).ids
    else:
        print(
            "[export] w8a8: no tokenizer next to the weights; calibrating on 256 random token ids "
            "(less accurate than text)",
            file=sys.stderr,
        )
        ids = random_calibration_ids(model.config.vocab_size)
    with _Stage(f"w8a8: calibrate on {len(ids)} tokens, quantize"):
        return model.quantize_w8a8(ids)


def write_tokenizer(args, out_dir: Path):
    """Tokenizer files next to config.json: from the GGUF's vocabulary, the HF folder's or the IRPA's."""
    from models.gguf_tokenizer import save_tokenizer, tokenizer_near_weights

    found = tokenizer_near_weights(args.gguf_file, args.hf_dir, args.irpa_file)
    if found is None:
        print("[export] no tokenizer found next to the weights; the server will need --tokenizer", file=sys.stderr)
        return [], None
    save_tokenizer(*found, out_dir)
    return ["tokenizer.json", "tokenizer_config.json"], found[1]


if __name__ == "__main__":
    sys.exit(main())
