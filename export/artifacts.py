"""Exported + compiled artifacts cached under ~/.cache/aotllm/artifacts, keyed by content hash.

Torch-free: the export runs as a subprocess (`python -m export.paged_llm`), so a server that builds the
embedded default model on first use never imports torch itself.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from compile import CompileRequest, compile_mlir
from models.abi import ModelABI
from models.cache import cache_dir, cache_lock

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Artifacts:
    dir: Path
    target: str = "llvm-cpu"

    @property
    def vmfb(self) -> Path:
        return self.dir / f"model_{self.target}.vmfb"

    @property
    def irpa(self) -> Path:
        return self.dir / "model.irpa"

    @property
    def config(self) -> Path:
        return self.dir / "config.json"

    @property
    def parameters(self) -> list[Path]:
        """model.irpa, and with tensor parallelism its rank files."""
        return [self.dir / name for name in ModelABI.load(self.config).parameter_files] or [self.irpa]


# (stage, fraction done or None) -> None: what a build is doing, for the server's /health
Report = Callable[[str, "float | None"], None]
SAMPLE = 8 << 20  # a big file's identity: its size, mtime and first and last 8 MiB


def _hash_path(h, path: Path) -> None:
    """Content hash of a file or folder. A file over 256 MiB is named by its size, modification time and
    first and last 8 MiB (reading all of a multi-GB GGUF would add a minute to every start)."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(f.name.encode())
        st = f.stat()
        with open(f, "rb") as fh:
            if st.st_size > 32 * SAMPLE:
                h.update(f"{st.st_size} {st.st_mtime_ns}".encode())
                h.update(fh.read(SAMPLE))
                fh.seek(st.st_size - SAMPLE)
                h.update(fh.read(SAMPLE))
                continue
            while chunk := fh.read(1 << 22):
                h.update(chunk)


def artifact_key(source: Path, export_args: list[str]) -> str:
    """Content hash of the model source, the export options and the exporter's own code."""
    h = hashlib.sha256()
    _hash_path(h, Path(source))
    h.update(json.dumps(export_args).encode())
    for folder in ("models", "export"):
        for src in sorted((ROOT / folder).glob("*.py")):
            h.update(src.name.encode())
            h.update(src.read_bytes())
    return h.hexdigest()[:24]


def source_flag(source: Path) -> str:
    """The exporter's flag for a model source: a folder is a Hugging Face one, an .irpa file an archive."""
    source = Path(source)
    if source.is_dir():
        return "--hf-dir"
    return "--irpa-file" if source.suffix == ".irpa" else "--gguf-file"


def build(
    source: Path,
    export_args: list[str] | None = None,
    target: str = "llvm-cpu",
    arch: str | None = None,
    report: Report | None = None,
) -> Artifacts:
    """Export (if not cached) and compile for `target` (compile has its own content cache). Another process
    building the same artifacts meanwhile is waited for, not raced."""
    export_args = list(export_args or [])
    out = cache_dir() / "artifacts" / artifact_key(Path(source), export_args)
    with cache_lock(out):
        return _build(Artifacts(out, target), Path(source), export_args, arch, report or (lambda stage, done: None))


_PROGRESS = re.compile(r"\((\d+)%\)")


def _build(art: Artifacts, source: Path, export_args: list[str], arch: str | None, report: Report) -> Artifacts:
    out = art.dir
    if not (out / ".complete").is_file():
        t0 = time.perf_counter()
        print(f"[aotllm] exporting {source} -> {out}", file=sys.stderr, flush=True)
        report("exporting", 0.0)
        cmd = [sys.executable, "-m", "export.paged_llm", source_flag(source), str(source), "--output-dir", str(out)]
        cmd += export_args
        # The exporter's stage lines go on to our stderr and, as stage and fraction, to `report`.
        proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True, bufsize=1)
        assert proc.stderr is not None
        for line in proc.stderr:
            sys.stderr.write(line)
            text = line[len("[export] ") :].strip()
            if line.startswith("[export] ") and text.endswith("..."):
                report(f"exporting: {text.rstrip(' .')}", None)
            elif line.startswith("[export] parameters:") and (m := _PROGRESS.search(line)):
                report("exporting: writing parameters", int(m.group(1)) / 100)
        if proc.wait() != 0:
            raise RuntimeError(f"export failed (exit {proc.returncode}); command: {' '.join(cmd)}")
        (out / ".complete").write_text(f"{time.perf_counter() - t0:.1f} s\n")
    if not art.vmfb.is_file():
        report(f"compiling for {art.target}", None)
        devices = ModelABI.load(art.config).tensor_parallelism_size
        compile_mlir(CompileRequest(out / "model.mlir", art.target, arch, devices=devices), art.vmfb)
    return art


if __name__ == "__main__":
    # python -m export.artifacts: export + compile the embedded default model into the cache.
    from models.default_model import smollm2_gguf

    art = build(smollm2_gguf())
    print(f"vmfb:       {art.vmfb}\nparameters: {art.irpa}\nconfig:     {art.config}\ntokenizer:  {art.dir}")
