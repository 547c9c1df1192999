"""The exporter holds one tensor (slab) at a time, not the model (export.parameters)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _random_q8_gguf(path: Path, hidden: int, inter: int, layers: int, vocab: int) -> int:
    """A Llama GGUF of random Q8_0 blocks (no tokenizer); returns its parameter count."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    heads = hidden // 64
    for add, v in [
        (w.add_block_count, layers),
        (w.add_context_length, 4096),
        (w.add_embedding_length, hidden),
        (w.add_feed_forward_length, inter),
        (w.add_head_count, heads),
        (w.add_head_count_kv, heads),
        (w.add_rope_dimension_count, 64),
        (w.add_layer_norm_rms_eps, 1e-5),
        (w.add_vocab_size, vocab),
    ]:
        add(v)
    count = 0

    def q8(rows: int, cols: int) -> np.ndarray:
        b = rng.integers(-127, 128, (rows, cols // 32, 34), dtype=np.int8).view(np.uint8)
        b[..., :2] = np.frombuffer(np.float16(0.001).tobytes(), np.uint8)
        return b.reshape(rows, -1)

    def matrix(name: str, rows: int, cols: int) -> None:
        nonlocal count
        w.add_tensor(name, q8(rows, cols), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        count += rows * cols

    matrix("token_embd.weight", vocab, hidden)
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        for p in ("attn_q", "attn_k", "attn_v", "attn_output"):
            matrix(f"blk.{i}.{p}.weight", hidden, hidden)
        matrix(f"blk.{i}.ffn_gate.weight", inter, hidden)
        matrix(f"blk.{i}.ffn_up.weight", inter, hidden)
        matrix(f"blk.{i}.ffn_down.weight", hidden, inter)
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    matrix("output.weight", vocab, hidden)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return count


def _export_peak_gib(gguf_path: Path, out: Path, *extra: str) -> float:
    """The exporter's own peak resident memory (its last stage line), exported in a fresh process."""
    cmd = [sys.executable, "-m", "export.paged_llm", "--gguf-file", str(gguf_path), "--output-dir", str(out)]
    r = subprocess.run(
        [*cmd, "--bs-prefill", "1", "--bs-decode", "1", *extra], cwd=ROOT, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return float(re.findall(r"peak memory so far ([\d.]+) GiB", r.stderr)[-1])


@pytest.mark.parametrize("weights", ["float32", "auto"])
def test_export_memory_does_not_grow_with_the_model(tmp_path, weights):
    """A model of 190 M parameters (0.76 GB as float32) exports with about the memory of a tiny one: it
    would take at least the model's float32 size more if the exporter held it (as it did before)."""
    small = _random_q8_gguf(tmp_path / "small.gguf", 256, 512, 1, 256)
    big = _random_q8_gguf(tmp_path / "big.gguf", 1024, 4096, 10, 16384)
    assert small < 2e6 and big > 1.9e8
    base = _export_peak_gib(tmp_path / "small.gguf", tmp_path / "s", "--weights", weights)
    peak = _export_peak_gib(tmp_path / "big.gguf", tmp_path / "b", "--weights", weights)
    whole = big * 4 / 2**30
    assert peak - base < 0.5 * whole, (peak, base, whole)
