"""Build a VMFB from an exported MLIR with iree-compile: good flags per target, cached by content hash."""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

TARGETS = ("llvm-cpu", "hip", "cuda")
DEFAULT_ARCH = {"llvm-cpu": "host", "hip": "gfx942", "cuda": "sm_80"}
# IREE 3.13 has no sm_90/sm_100 target: sm_80 PTX runs on Hopper and Blackwell.
CUDA_ARCH_FALLBACK = {"sm_90": "sm_80", "sm_90a": "sm_80", "sm_100": "sm_80", "sm_120": "sm_80"}


class CompileError(RuntimeError):
    pass


@dataclass
class CompileRequest:
    mlir: Path
    target: str = "llvm-cpu"
    arch: str | None = None
    devices: int = 1
    extra_flags: list[str] = field(default_factory=list)

    def flags(self) -> list[str]:
        if self.target not in TARGETS:
            raise CompileError(f"unknown target {self.target!r}; choose one of {', '.join(TARGETS)}")
        if self.devices < 1:
            raise CompileError("--devices must be >= 1")
        arch = self.arch or DEFAULT_ARCH[self.target]
        device = {"llvm-cpu": "local", "hip": "hip", "cuda": "cuda"}[self.target]
        if self.devices == 1:
            flags = [f"--iree-hal-target-device={device}"]
        else:
            flags = [f"--iree-hal-target-device={device}[{i}]" for i in range(self.devices)]
        if self.target == "llvm-cpu":
            flags += [
                "--iree-hal-local-target-device-backends=llvm-cpu",
                f"--iree-llvmcpu-target-cpu={arch}",
                "--iree-llvmcpu-enable-ukernels=all",
            ]
            # Data tiling (packed matmul layouts for the ukernels). With several devices it fails to
            # compile ("set_encoding expects N dynamic encoding dimensions"): single-device programs only.
            # (It miscompiled a 16-bit KV-cache scatter: 16-bit caches are int32 words, models/llama.py.)
            if self.devices == 1:
                flags.append("--iree-opt-data-tiling")
        elif self.target == "hip":
            flags += [f"--iree-rocm-target={arch}"]
        else:
            if arch in CUDA_ARCH_FALLBACK:
                print(
                    f"[compile] IREE 3.13 has no {arch} target; using {CUDA_ARCH_FALLBACK[arch]} PTX "
                    "(it runs on newer GPUs)",
                    file=sys.stderr,
                )
                arch = CUDA_ARCH_FALLBACK[arch]
            flags += [f"--iree-cuda-target={arch}"]
        return flags + list(self.extra_flags)


def iree_compile_path() -> str:
    local = Path(sys.executable).parent / "iree-compile"
    if local.exists():
        return str(local)
    found = shutil.which("iree-compile")
    if not found:
        raise CompileError("iree-compile not found; hint: pip install iree-base-compiler==3.13.0")
    return found


def command(req: CompileRequest, output: Path) -> list[str]:
    return [iree_compile_path(), str(req.mlir), *req.flags(), "-o", str(output)]


def cache_key(req: CompileRequest) -> str:
    from iree.compiler import version as iree_version

    h = hashlib.sha256()
    with open(req.mlir, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    h.update("\0".join(req.flags()).encode())
    h.update(getattr(iree_version, "VERSION", "").encode())
    return h.hexdigest()[:32]


def _links_cpu_kernels(mlir: Path) -> bool:
    """Whether the module links hand-written x86-64 objects (models.paged_attention, models.amx)."""
    marker = b'"embedded-elf-x86_64"'
    with open(mlir, "rb") as f:
        tail = b""
        while chunk := f.read(1 << 22):
            if marker in tail + chunk:
                return True
            tail = chunk[-len(marker) :]
    return False


def vmfb_cache_dir() -> Path:
    from models.cache import cache_dir

    root = cache_dir() / "vmfb"
    root.mkdir(exist_ok=True)
    return root


def compile_mlir(req: CompileRequest, output: Path, use_cache: bool = True) -> Path:
    """Compile (or fetch from the cache) and place the VMFB at `output`."""
    if not Path(req.mlir).is_file():
        raise CompileError(f"{req.mlir}: no such MLIR file; hint: run python -m export.paged_llm first")
    if req.target != "llvm-cpu" and _links_cpu_kernels(Path(req.mlir)):
        raise CompileError(
            f"{req.mlir} links x86-64 CPU kernels (exported with --cpu-attention, --cpu-matmul or --amx), which "
            f"cannot run on {req.target}; hint: export again without those options for a GPU"
        )
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    cached = vmfb_cache_dir() / f"{cache_key(req)}.vmfb"
    if use_cache and cached.is_file():
        print(f"[compile] cache hit {cached.name}", file=sys.stderr)
    else:
        tmp = cached.with_suffix(f".{os.getpid()}.part")
        cmd = command(req, tmp)
        t0 = time.perf_counter()
        result = _run_with_heartbeat(cmd, f"iree-compile {req.target} ({req.arch or DEFAULT_ARCH[req.target]})")
        if result.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise CompileError(
                f"iree-compile failed for target {req.target}:\n{result.stderr.strip()[-4000:]}\n"
                f"hint: reproduce with: {shlex.join(command(req, output))}"
            )
        tmp.replace(cached)
        print(f"[compile] {req.target}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    if output.resolve() != cached.resolve():
        tmp_out = output.with_suffix(".vmfb.part")
        shutil.copyfile(cached, tmp_out)
        tmp_out.replace(output)
    return output


def _run_with_heartbeat(cmd: list[str], label: str) -> subprocess.CompletedProcess:
    """iree-compile prints nothing while it works: show elapsed time so long compiles look alive."""
    from tqdm import tqdm

    done = threading.Event()

    def beat():
        every = 1.0 if sys.stderr.isatty() else 15.0
        with tqdm(desc=label, bar_format="{desc}: {elapsed}", file=sys.stderr, mininterval=every) as bar:
            while not done.wait(1.0):
                bar.update(1)

    t = threading.Thread(target=beat, daemon=True)
    t.start()
    try:
        return subprocess.run(cmd, capture_output=True, text=True)
    finally:
        done.set()
        t.join()
