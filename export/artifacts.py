"""Exported + compiled artifacts cached under ~/.cache/aotllm/artifacts, keyed by content hash.

Torch-free: the export runs as a subprocess (`python -m export.paged_llm`), so a server that builds the
embedded default model on first use never imports torch itself.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from compile import CompileRequest, compile_mlir
from models.abi import ModelABI
from models.cache import cache_dir, cache_lock

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Artifacts:
    dir: Path

    @property
    def vmfb(self) -> Path:
        return self.dir / "model_llvm-cpu.vmfb"

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


def _hash_path(h, path: Path) -> None:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
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


def build(gguf: Path, export_args: list[str] | None = None) -> Artifacts:
    """Export (if not cached) and compile for llvm-cpu (compile has its own content cache). Another process
    building the same artifacts meanwhile is waited for, not raced."""
    export_args = list(export_args or [])
    out = cache_dir() / "artifacts" / artifact_key(Path(gguf), export_args)
    with cache_lock(out):
        return _build(Artifacts(out), gguf, export_args)


def _build(art: Artifacts, gguf: Path, export_args: list[str]) -> Artifacts:
    out = art.dir
    if not (out / ".complete").is_file():
        t0 = time.perf_counter()
        print(f"[aotllm] exporting {gguf} -> {out}", file=sys.stderr, flush=True)
        cmd = [
            sys.executable,
            "-m",
            "export.paged_llm",
            "--gguf-file",
            str(gguf),
            "--output-dir",
            str(out),
            *export_args,
        ]
        result = subprocess.run(cmd, cwd=ROOT)
        if result.returncode != 0:
            raise RuntimeError(f"export failed (exit {result.returncode}); command: {' '.join(cmd)}")
        (out / ".complete").write_text(f"{time.perf_counter() - t0:.1f} s\n")
    if not art.vmfb.is_file():
        devices = ModelABI.load(art.config).tensor_parallelism_size
        compile_mlir(CompileRequest(out / "model.mlir", devices=devices), art.vmfb)
    return art


if __name__ == "__main__":
    # python -m export.artifacts: export + compile the embedded default model into the cache.
    from models.default_model import smollm2_gguf

    art = build(smollm2_gguf())
    print(f"vmfb:       {art.vmfb}\nparameters: {art.irpa}\nconfig:     {art.config}\ntokenizer:  {art.dir}")
