"""models/paged_attention.py + export --cpu-attention: the hand-written attention equals the graph attention.

Two levels: the C kernel called directly (built as a shared library) against the op's torch reference,
over page sizes, head dims, cache types, query tiles and context splits; then whole programs exported with
--cpu-attention for every tiny variant against the eager model (graph attention), f32 to 1e-5.
"""

import ctypes
import shutil

import numpy as np
import pytest
import torch

from compile import CompileError, CompileRequest, compile_mlir
from export import paged_llm
from models import cpu, paged_attention
from models.abi import ModelABI
from models.llama import DTYPES, PagedLlama
from models.weights import load_weights
from serve.core.runner import Runner
from tests.eager import program_vs_eager
from tests.tiny import Variant, hf_model, write_gguf

HOST_ISA = cpu.attention_isa()
pytestmark = pytest.mark.skipif(
    not (shutil.which("gcc") and HOST_ISA), reason="needs gcc and an x86-64 CPU with AVX2, FMA and F16C"
)
# every ISA this host runs (AVX-512 hosts test the AVX2 build too)
ISAS = [isa for isa in paged_attention.ISAS if cpu.supports([paged_attention.ISAS[isa]])]


def _kernel(q, cache, pages, last, kv_heads, stride, kind, isa, tile, splits) -> np.ndarray:
    """Every workgroup of the C kernel, one after another (as IREE's workers would run them)."""
    B, S, H, D = q.shape
    lib = ctypes.CDLL(str(paged_attention.build(D, kind, isa, shared=True)))
    fn = getattr(lib, paged_attention.symbol(D, kind))
    out = np.full((B, splits, S, H, D + 2), np.nan, np.float32)  # (every element must be written)
    arrays = [np.ascontiguousarray(a.numpy()) for a in (q, cache, pages, last)] + [out]
    args = []
    for a in arrays:
        ptr = a.ctypes.data_as(ctypes.c_void_p)
        args += [ptr, ptr, ctypes.c_size_t(0), ctypes.c_size_t(a.size), ctypes.c_size_t(1)]
    for wg in range(B * kv_heads * -(-S // tile) * splits):
        fn(*args, *(ctypes.c_size_t(x) for x in (S, pages.shape[1], H, kv_heads, stride, tile, splits, wg)))
    return out


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(
    "B,S,H,KV,D,stride,P,kind,tile,splits",
    [
        (2, 5, 4, 2, 16, 8, 4, 0, 16, 1),  # a prefill chunk, GQA
        (2, 1, 4, 1, 32, 4, 9, 0, 8, 3),  # MQA decode, context split three ways, pages of 4
        (3, 1, 9, 3, 64, 16, 8, 1, 10, 4),  # SmolLM2's heads, bfloat16 cache
        (1, 20, 4, 4, 16, 8, 4, 2, 8, 1),  # MHA, float16 cache, three query tiles
        (2, 7, 8, 2, 128, 32, 3, 1, 4, 2),  # head_dim 128, pages of 32 (two key tiles a page)
        (1, 3, 2, 2, 8, 2, 12, 0, 1, 8),  # more splits than pages hold keys
        (2, 9, 8, 1, 64, 16, 5, 2, 4, 2),  # MQA, 8 query heads: many rows (keys transposed)
        (1, 40, 4, 2, 32, 4, 12, 1, 16, 1),  # 32 rows of a query tile, key tiles across pages of 4
    ],
)
def test_kernel_equals_reference(B, S, H, KV, D, stride, P, kind, tile, splits, isa):
    g = torch.Generator().manual_seed(B * S + D)
    N = 2 * (P * B + 4)
    dtype = {v: k for k, v in paged_attention.KINDS.items()}[kind]
    values = torch.randn(N, stride * KV * D, generator=g).to(dtype)
    cache = values if kind == 0 else values.view(torch.int32)
    pages = 2 * torch.randperm(N // 2, generator=g)[: B * P].view(B, P)  # scattered, each its K then V row
    q = torch.randn(B, S, H, D, generator=g)
    last = torch.randint(-1, P * stride, (B, S), generator=g)
    last[0, 0] = -1  # a query that sees nothing (a padding row)
    got = torch.from_numpy(_kernel(q, cache, pages, last, KV, stride, kind, isa, tile, splits))
    want = paged_attention.paged_attention(q, cache, pages, last, KV, stride, kind, 0, tile, splits)
    out, ref = paged_attention.combine(got), paged_attention.combine(want)
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max() <= 1e-5 * max(1.0, float(ref.abs().max()))
    assert out[0, 0].abs().max() == 0  # nothing visible: zeros, not NaN


STRIDE = 4  # small pages: short contexts cross many of them


def _export(gguf, out, *extra):
    argv = ["--gguf-file", str(gguf), "--output-dir", str(out), "--bs-prefill", "1,2", "--bs-decode", "1,4"]
    assert paged_llm.main([*argv, "--block-seq-stride", str(STRIDE), "--cpu-attention", *extra]) == 0
    compile_mlir(CompileRequest(out / "model.mlir"), out / "model.vmfb")
    abi = ModelABI.load(out / "config.json")
    assert abi.cpu_features == [paged_attention.ISAS[HOST_ISA]]
    runner = Runner(out / "model.vmfb", [out / "model.irpa"], abi, page_count=40)
    model = PagedLlama.from_weights(
        load_weights(gguf_file=gguf), STRIDE, torch.float32, DTYPES[abi.paged_kv_cache.kv_cache_dtype]
    )
    return runner, model, model.allocate_cache(40)


def _same(runner, model, cache, tol):
    """The program (kernel) and the eager model (graph attention) agree (tests.eager.program_vs_eager)."""
    pages = (torch.randperm(39, generator=torch.Generator().manual_seed(4)) + 1).view(3, 13)[:2].numpy()
    worst, _ = program_vs_eager(runner, model, cache, [21, 38], pages, split=16, steps=4)
    assert worst <= tol


@pytest.mark.parametrize("variant", ["mha", "gqa", "mqa", "head_dim", "llama31"])
def test_program_equals_graph_attention(tiny_models, tmp_path, variant):
    _same(*_export(tiny_models[variant][2], tmp_path), 1e-5)


def test_head_dim_128_program(tmp_path):
    """head_dim 128 (Llama-3.1-8B's): the kernel's largest tiles run on IREE's worker threads' stacks."""
    v = Variant("hd128", heads=4, kv_heads=2, hidden=256, head_dim=128, intermediate=128)
    gguf = write_gguf(hf_model(v), tmp_path / "hd128.gguf")
    _same(*_export(gguf, tmp_path / "out"), 1e-5)


@pytest.mark.parametrize("variant,kv", [("gqa", "bfloat16"), ("mqa", "float16")])
def test_16_bit_cache(tiny_models, tmp_path, variant, kv):
    """The kernel widens the stored 16-bit values as the graph's gathers do: the same logits."""
    _same(*_export(tiny_models[variant][2], tmp_path, "--kv-cache-dtype", kv), 1e-4)


def test_gpu_compile_of_a_cpu_kernel_program_says_why(tiny_models, tmp_path):
    out = tmp_path / "p"
    argv = ["--gguf-file", str(tiny_models["gqa"][2]), "--output-dir", str(out), "--cpu-attention"]
    assert paged_llm.main(argv) == 0
    with pytest.raises(CompileError, match="--cpu-attention"):
        compile_mlir(CompileRequest(out / "model.mlir", "hip", "gfx942"), out / "model_hip.vmfb")
