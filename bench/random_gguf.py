"""A random-weight GGUF of a real Llama shape: speed and memory where the weights exceed the CPU's caches,
without downloading a model.

    python -m bench.random_gguf --shape llama-3.2-1b --type Q8_0 -o llama-3.2-1b-q8_0.gguf

The tokenizer is the embedded SmolLM2's (a GPT-2-style BPE of 49152 tokens), padded with reserved
control tokens to the shape's vocabulary so that llama.cpp and our exporter both load the file. Weights are
N(0, 0.02) (norms 1 +- 0.1), written one tensor at a time; Q8_0 / Q4_0 are quantised by the gguf package,
Q4_K blocks are random but valid (the package cannot quantise K-quants).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from models.config import llama3_rope_factors


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int = 128256
    tied: bool = True
    rope_theta: float = 500000.0
    rope_factor: float = 32.0  # llama3 rope scaling (low 1, high 4, original context 8192)
    context: int = 131072

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


SHAPES = {
    "llama-3.2-1b": Shape(hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8),
    "llama-3.2-3b": Shape(hidden=3072, intermediate=8192, layers=28, heads=24, kv_heads=8),
    "llama-3.1-8b": Shape(
        hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, tied=False, rope_factor=8.0
    ),
}
TYPES = ("F16", "Q8_0", "Q4_0", "Q4_K")


def rope_freq_factors(s: Shape) -> np.ndarray:
    """llama.cpp's `rope_freqs` for llama3 scaling (low 1, high 4, original context 8192)."""
    scaling = {"factor": s.rope_factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    return np.array(llama3_rope_factors(s.head_dim, s.rope_theta, scaling), dtype=np.float32)


def _copy_tokenizer(w: gguf.GGUFWriter, source: Path, vocab: int) -> None:
    r = gguf.GGUFReader(source)

    def field(name):
        f = r.fields[name]
        return [f.parts[i] for i in f.data]

    tokens = [bytes(p).decode("utf-8") for p in field("tokenizer.ggml.tokens")]
    types = [int(p[0]) for p in field("tokenizer.ggml.token_type")]
    merges = [bytes(p).decode("utf-8") for p in field("tokenizer.ggml.merges")]
    pad = vocab - len(tokens)
    if pad < 0:
        raise SystemExit(f"the tokenizer has {len(tokens)} tokens, more than the shape's vocabulary {vocab}")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(bytes(r.fields["tokenizer.ggml.pre"].parts[-1]).decode())
    w.add_token_list(tokens + [f"<|reserved_{i}|>" for i in range(pad)])
    w.add_token_types(types + [int(gguf.TokenType.CONTROL)] * pad)
    w.add_token_merges(merges)
    for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id)):
        f = r.fields.get(f"tokenizer.ggml.{key}_token_id")
        if f is not None:
            add(int(f.parts[-1][0]))
    w.add_add_bos_token(False)


# Bytes of one block of each K-quant and the offsets of its f16 scale fields (llama.cpp's block layouts).
_K_BLOCK = {
    "Q2_K": (84, (80, 82)),
    "Q3_K": (110, (108,)),
    "Q4_K": (144, (0, 2)),
    "Q5_K": (176, (0, 2)),
    "Q6_K": (210, (208,)),
}


def random_kquant(rows: int, cols: int, qtype: str, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Random but valid K-quant blocks, every block scale `scale` (the gguf package can dequantise
    K-quants, not quantise them)."""
    size, scale_offsets = _K_BLOCK[qtype]
    blocks = rng.integers(0, 256, size=(rows, cols // 256, size), dtype=np.uint8)
    for off in scale_offsets:
        blocks[:, :, off : off + 2] = np.frombuffer(np.float16(scale).tobytes(), np.uint8)
    return blocks.reshape(rows, -1)


def _tensors(s: Shape):
    """(name, shape [rows, cols] as numpy lays it out, is_matrix) in GGUF order."""
    yield "token_embd.weight", (s.vocab, s.hidden), True
    for i in range(s.layers):
        q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
        yield f"blk.{i}.attn_norm.weight", (s.hidden,), False
        yield f"blk.{i}.attn_q.weight", (q, s.hidden), True
        yield f"blk.{i}.attn_k.weight", (kv, s.hidden), True
        yield f"blk.{i}.attn_v.weight", (kv, s.hidden), True
        yield f"blk.{i}.attn_output.weight", (s.hidden, q), True
        yield f"blk.{i}.ffn_norm.weight", (s.hidden,), False
        yield f"blk.{i}.ffn_gate.weight", (s.intermediate, s.hidden), True
        yield f"blk.{i}.ffn_up.weight", (s.intermediate, s.hidden), True
        yield f"blk.{i}.ffn_down.weight", (s.hidden, s.intermediate), True
    yield "output_norm.weight", (s.hidden,), False
    if not s.tied:
        yield "output.weight", (s.vocab, s.hidden), True


def write(shape: str, qtype: str, out: Path, tokenizer_gguf: Path, seed: int = 0) -> Path:
    s = SHAPES[shape]
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name(f"random {shape} {qtype}")
    w.add_block_count(s.layers)
    w.add_context_length(s.context)
    w.add_embedding_length(s.hidden)
    w.add_feed_forward_length(s.intermediate)
    w.add_head_count(s.heads)
    w.add_head_count_kv(s.kv_heads)
    w.add_rope_dimension_count(s.head_dim)
    w.add_rope_freq_base(s.rope_theta)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(s.vocab)
    _copy_tokenizer(w, tokenizer_gguf, s.vocab)
    w.add_tensor("rope_freqs.weight", rope_freq_factors(s))
    t0 = time.perf_counter()
    specs = list(_tensors(s))
    for i, (name, dims, matrix) in enumerate(specs):
        if not matrix:
            w.add_tensor(name, (1 + 0.1 * rng.standard_normal(dims)).astype(np.float32))
        elif qtype == "Q4_K":
            w.add_tensor(name, random_kquant(*dims, qtype, rng, 0.0005), raw_dtype=gguf.GGMLQuantizationType.Q4_K)
        else:
            arr = (0.02 * rng.standard_normal(dims, dtype=np.float32)).astype(np.float32)
            if qtype == "F16":
                w.add_tensor(name, arr.astype(np.float16))
            else:
                qt = gguf.GGMLQuantizationType[qtype]
                w.add_tensor(name, gguf.quants.quantize(arr, qt), raw_dtype=qt)
        took = time.perf_counter() - t0
        print(f"\r[random_gguf] {i + 1}/{len(specs)} tensors, {took:.0f} s", end="", file=sys.stderr)
    print(file=sys.stderr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=True)
    w.close()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.random_gguf", description=__doc__)
    p.add_argument("--shape", choices=sorted(SHAPES), required=True)
    p.add_argument("--type", choices=TYPES, default="Q8_0")
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from models.default_model import smollm2_gguf

    write(args.shape, args.type, args.output, smollm2_gguf(), args.seed)
    print(f"[random_gguf] wrote {args.output} ({args.output.stat().st_size / 2**30:.2f} GiB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
