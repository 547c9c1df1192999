"""Hand-written C kernels built with gcc into the artifact cache (models.amx, models.paged_attention).

Torch-free: the default model's options ask `compiler()` whether such kernels can be built here.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from .cache import cache_dir


def compiler() -> str | None:
    """The C compiler ($CC, default gcc), or None when it is not on PATH."""
    return shutil.which(os.environ.get("CC", "gcc"))


# Every kernel is linked into an IREE program, which has no libc: freestanding code, no calls GCC would add
# (memset / memcpy for loops), position independent, only the entry point visible.
FREESTANDING = [
    "-O3",
    "-ffreestanding",
    "-fno-tree-loop-distribute-patterns",
    "-fPIC",
    "-fno-stack-protector",
    "-fno-plt",
    "-fvisibility=hidden",
    "-ffunction-sections",
    "-fdata-sections",
]
HIDDEN = '__attribute__((visibility("hidden")))'  # the entry point's mark in a kernel's source


def build(
    source: str,
    flags: list[str],
    name: str,
    error: type[Exception],
    no_compiler: str,
    failed: str,
    shared: bool = False,
) -> Path:
    """`source` compiled with FREESTANDING + `flags` into ~/.cache/aotllm/kernels/`name`_<hash>.o (the object
    a program links) or, `shared`, .so (a library whose entry points, HIDDEN in the source, tests call
    directly), once per source and flags. No compiler raises `error(no_compiler)`; a failed build
    `error(failed)`, with the compiler's message in place of `{stderr}`."""
    flags = [*FREESTANDING, *flags, *(["-shared", "-fvisibility=default"] if shared else ["-c"])]
    source = source.replace(HIDDEN, "") if shared else source
    suffix = "so" if shared else "o"
    key = hashlib.sha256((source + " ".join(flags)).encode()).hexdigest()[:16]
    root = cache_dir() / "kernels"
    out = root / f"{name}_{key}.{suffix}"
    if out.is_file():
        return out
    cc = compiler()
    if cc is None:
        raise error(no_compiler)
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        src = Path(tmp) / f"{name}.c"
        src.write_text(source)
        r = subprocess.run([cc, *flags, str(src), "-o", str(Path(tmp) / "o")], capture_output=True, text=True)
        if r.returncode:
            raise error(failed.format(stderr=r.stderr.strip()[:2000]))
        os.replace(Path(tmp) / "o", out)
    return out
