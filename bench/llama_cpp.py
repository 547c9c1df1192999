"""llama.cpp's side of `python -m bench.offline --compare-llama-cpp`, through llama-cpp-python's C API.

llama-cpp-python is not a dependency of this project: `ensure_installed` builds it on first use into
~/.cache/aotllm/llama-cpp-python (`pip install --target`, CMAKE_ARGS=-DGGML_NATIVE=ON: a long source
build, once) and imports it from there.

Same precision on both sides: the GGUF (e.g. Q4_1) is re-typed by llama.cpp's own `llama_model_quantize`
(requantizing dequantizes, then converts) into an F32 / F16 / BF16 GGUF, cached next to it; norms stay
F32 as llama.cpp keeps them. The KV cache is the same type as the weights (llama.cpp's default would be
F16). Measured like ours (bench/offline.py), with the same token ids, `n_threads` = `n_threads_batch`:
prefill = one llama_decode of the whole prompt at batch 1 (n_batch = n_ubatch >= the prompt, logits of
the last position only), decode = B sequences (one context with n_seq_max = B) after a prefill of each
prompt, one llama_decode of B tokens per step with every sequence's logits, the decoded positions
removed again before each repeat. llama.cpp's other defaults stand (flash attention: auto), but on a CPU
with AMX int8 its extra buffer types (weight repacking) are off: there its AMX matmul segfaults on the first
Q8_0 prefill (llama.cpp issue 20824), as `llama-server --no-repack`.
"""

from __future__ import annotations

import ctypes
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from models.cpu import host_has_amx

from .timing import EngineRun, Plan, Timing, time_it, weight_bytes_read

PACKAGE = "llama-cpp-python==0.3.36"
FTYPES = {
    "float32": ("LLAMA_FTYPE_ALL_F32", "F32", 0),
    "float16": ("LLAMA_FTYPE_MOSTLY_F16", "F16", 1),
    "bfloat16": ("LLAMA_FTYPE_MOSTLY_BF16", "BF16", 30),
    "w8a8": ("LLAMA_FTYPE_MOSTLY_Q8_0", "Q8_0", 0),
    "gguf": (None, "as is", 1),  # the file's own quantization, llama.cpp's default float16 cache
}  # (ftype, name, ggml_type of the KV cache)
KV_NAMES = {0: "F32", 1: "F16", 30: "BF16"}

_log_callback = None  # keeps the ctypes callback alive


def install_dir() -> Path:
    from models.cache import cache_dir

    return cache_dir() / "llama-cpp-python"


def ensure_installed(log: Callable[[str], None] = print):
    """Import llama_cpp: the environment's own, else the one in install_dir(), building it there if needed."""
    try:
        import llama_cpp  # noqa: F401

        return _quiet(llama_cpp)
    except ImportError:
        pass
    target = install_dir()
    if not (target / "llama_cpp").is_dir():
        log(f"[bench] building {PACKAGE} into {target} (a source build: ~17 minutes on 2 cores) ...")
        env = dict(os.environ)
        env.setdefault("CMAKE_ARGS", "-DGGML_NATIVE=ON")
        env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--target", str(target), PACKAGE]
        result = subprocess.run(cmd, env=env)
        if result.returncode != 0:
            raise SystemExit(
                f"could not install {PACKAGE} (exit {result.returncode}); it needs a C++ compiler and "
                f"cmake; try: CMAKE_ARGS=-DGGML_NATIVE=ON {' '.join(cmd)}"
            )
    # appended, not prepended: the target's copies of numpy etc. must not shadow the environment's
    if str(target) not in sys.path:
        sys.path.append(str(target))
    import llama_cpp

    return _quiet(llama_cpp)


def _quiet(lib):
    """llama.cpp logs every load to stderr: keep warnings and errors only."""
    global _log_callback
    if _log_callback is None:

        def drop(level, text, user_data):
            if level in (2, 3) and text:  # GGML_LOG_LEVEL_WARN, _ERROR
                sys.stderr.write(text.decode(errors="replace"))

        _log_callback = lib.llama_log_callback(drop)
        lib.llama_log_set(_log_callback, ctypes.c_void_p())
        lib.llama_backend_init()
    return lib


def gguf_tensor_bytes(path: Path) -> tuple[dict[str, int], dict[str, int]]:
    """(bytes of each tensor, count of each tensor type) of a GGUF."""
    import gguf

    reader = gguf.GGUFReader(path)
    sizes, types = {}, {}
    for t in reader.tensors:
        sizes[t.name] = int(t.n_bytes)
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return sizes, types


def convert(lib, gguf_path: Path, dtype: str, log: Callable[[str], None] = print) -> Path:
    """`gguf_path` re-typed to `dtype` by llama.cpp's quantizer (cached next to the source)."""
    ftype_name, short, _ = FTYPES[dtype]
    src = Path(gguf_path)
    if ftype_name is None:
        return src
    out = src.with_name(f"{src.stem}.llama-cpp-{short}.gguf")
    if out.is_file() and out.stat().st_mtime >= src.stat().st_mtime:
        return out
    log(f"[bench] llama.cpp: writing {out.name} (requantized from {src.name})")
    params = lib.llama_model_quantize_default_params()
    params.ftype = getattr(lib, ftype_name)
    params.allow_requantize = True
    params.nthread = os.cpu_count() or 1
    tmp = out.with_suffix(".part")
    rc = lib.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise SystemExit(f"llama_model_quantize({src} -> {short}) failed ({rc})")
    tmp.replace(out)
    return out


class _Batch:
    def __init__(self, lib, capacity: int):
        self.lib, self.capacity = lib, capacity
        self.b = lib.llama_batch_init(capacity, 0, 1)

    def fill(self, tokens, positions, seqs, logits) -> _Batch:
        b = self.b
        b.n_tokens = len(tokens)
        for i, (t, p, s, want) in enumerate(zip(tokens, positions, seqs, logits)):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = int(t), int(p), 1, int(want)
            b.seq_id[i][0] = int(s)
        return self

    def free(self) -> None:
        self.lib.llama_batch_free(self.b)


def measure(
    lib, path: Path, dtype: str, plan: Plan, data: dict, threads: int, log: Callable[[str], None] = print
) -> EngineRun:
    sizes, types = gguf_tensor_bytes(path)
    mp = lib.llama_model_default_params()
    mp.n_gpu_layers = 0
    mp.use_extra_bufts = not host_has_amx()  # llama.cpp's AMX buffer type crashes here: see above
    model = lib.llama_model_load_from_file(str(path).encode(), mp)
    if not model:
        raise SystemExit(f"llama.cpp could not load {path}")
    kv_type = FTYPES[dtype][2]

    def context(n_ctx: int, n_batch: int, n_seq: int):
        cp = lib.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = n_ctx, n_batch, n_batch, n_seq
        cp.n_threads = cp.n_threads_batch = threads
        cp.type_k = cp.type_v = kv_type
        ctx = lib.llama_init_from_model(model, cp)
        if not ctx:
            raise SystemExit(f"llama.cpp could not create a context (n_ctx {n_ctx}, n_seq_max {n_seq})")
        return ctx

    def decode(ctx, batch: _Batch) -> None:
        rc = lib.llama_decode(ctx, batch.b)
        if rc != 0:
            raise SystemExit(f"llama_decode failed ({rc})")
        lib.llama_synchronize(ctx)

    timings = []
    if plan.prefill_lens:
        longest = max(plan.prefill_lens)
        ctx = context(_round_up(longest, 256), longest, 1)
        mem = lib.llama_get_memory(ctx)
        batch = _Batch(lib, longest)
        for n in plan.prefill_lens:
            toks = data["prefill"][n]

            def run(n: int = n, toks=toks) -> None:
                lib.llama_memory_clear(mem, True)
                decode(ctx, batch.fill(toks, range(n), [0] * n, [0] * (n - 1) + [1]))

            sec, reps = time_it(run, plan.repeats, plan.warmup)
            timings.append(Timing("prefill", n, sec, n, 1, reps))
            log(f"  prefill {n:4d} tokens: {1000 * sec:8.1f} ms  {n / sec:8.1f} tok/s")
        batch.free()
        lib.llama_free(ctx)

    p, steps = plan.decode_prompt_len, plan.decode_steps
    for b in plan.decode_batches:
        ctx = context(b * _round_up(p + steps, 256), max(p, b), b)
        mem = lib.llama_get_memory(ctx)
        batch = _Batch(lib, max(p, b))
        for s in range(b):
            decode(ctx, batch.fill(data["decode_prompts"][s], range(p), [s] * p, [0] * (p - 1) + [1]))
        step_tokens = data["decode_tokens"][:, :b]

        def run(b: int = b, ctx=ctx, mem=mem, batch: _Batch = batch, step_tokens=step_tokens) -> None:
            lib.llama_memory_seq_rm(mem, -1, p, -1)  # back to the prompts: the same positions every repeat
            for k in range(steps):
                decode(ctx, batch.fill(step_tokens[k], [p + k] * b, range(b), [1] * b))

        sec, reps = time_it(run, plan.repeats, plan.warmup)
        timings.append(Timing("decode", b, sec, b * steps, steps, reps))
        log(f"  decode bs{b:<3d}: {1000 * sec / steps:8.2f} ms/step  {b * steps / sec:8.1f} tok/s")
        batch.free()
        lib.llama_free(ctx)
    lib.llama_model_free(model)
    return EngineRun(
        "llama.cpp",
        dtype,
        weight_bytes_read(sizes),
        timings,
        str(path),
        {
            "tensor_types": types,
            "threads": threads,
            "kv_cache_type": KV_NAMES[FTYPES[dtype][2]],
            "llama_cpp_python": getattr(lib, "__version__", "?"),
        },
    )


def _round_up(n: int, m: int) -> int:
    return math.ceil(n / m) * m
