"""Kept GGUF quantizations (models.gguf_quant, models.qlinear) and their x86 kernel (models.qmatmul)."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize

from models import cpu, gguf_quant, qmatmul
from models.ckernel import compiler
from models.qlinear import QLinear, dequantize as dequantize_kept, quantize_rows, reference_matmul

TYPES = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K, T.Q3_K]
HOST_ISAS = [isa for isa, feature in qmatmul.ISAS.items() if cpu.supports([feature])]
needs_gcc = pytest.mark.skipif(compiler() is None, reason="the kernel is built with gcc")


def random_blocks(qtype, rows: int, cols: int, rng) -> np.ndarray:
    """Random but valid blocks: random bytes with every float16 field a small positive scale."""
    block, size = GGML_QUANT_SIZES[qtype]
    b = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    f16 = {T.Q6_K: [208], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q3_K: [108]}.get(qtype)
    if f16 is None:
        f16 = [0, 2] if qtype in (T.Q4_1, T.Q5_1) else [0]
    for off in f16:
        vals = rng.uniform(0.001, 0.05, b.shape[0]).astype(np.float16)
        b[:, off : off + 2] = vals.view(np.uint8).reshape(-1, 2)
    return b


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_kept_groups_match_gguf_dequantization(qtype):
    """d * u - m of the kept groups equals the gguf package's dequantization: exactly (but for float16
    scales) for the types kept as they are, within a 1/254 of each group's range for the requantized ones."""
    rng = np.random.default_rng(int(qtype))
    rows, cols = 16, 512
    blocks = random_blocks(qtype, rows, cols, rng)
    ref = dequantize(blocks, qtype).reshape(-1, 32)
    u, d, m = gguf_quant.groups(blocks, qtype)
    assert u.dtype == np.uint8 and u.max() < (16 if gguf_quant.kept_bits(qtype) == 4 else 256)
    d16, m16 = d.astype(np.float16).astype(np.float32), m.astype(np.float16).astype(np.float32)
    got = d16[:, None] * u - m16[:, None]
    span = np.abs(ref).max(axis=1, keepdims=True) + 1e-12
    err = (np.abs(got - ref) / span).max()
    assert err < (2e-3 if gguf_quant.exact(qtype) else 6e-3), err
    if qtype in (T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1):  # float16 scales of float16 scales: exact
        np.testing.assert_array_equal(got, ref)
    # and through the packed layout the model reads
    w, s, bits = gguf_quant.convert(blocks, qtype, rows, cols)
    assert w.nbytes == rows * cols * bits // 8
    np.testing.assert_array_equal(dequantize_kept(torch.from_numpy(w), torch.from_numpy(s), bits).numpy(), got.reshape(rows, cols))


def test_unknown_type_is_an_error():
    with pytest.raises(NotImplementedError):
        gguf_quant.groups(np.zeros((1, GGML_QUANT_SIZES[T.Q8_1][1]), np.uint8), T.Q8_1)


@pytest.mark.parametrize("bits", [8, 4])
def test_lookup_reads_rows_of_the_packed_table(bits):
    rng = np.random.default_rng(bits)
    N, K = 64, 96
    u = rng.integers(0, 1 << bits, (N, K)).astype(np.uint8)
    d, m = rng.uniform(0.01, 0.1, (2, N, K // 32)).astype(np.float32)
    w, s = gguf_quant.pack(u, d, m, bits)
    lin = QLinear(K, N, bits)
    lin.weight.data, lin.scales.data = torch.from_numpy(w), torch.from_numpy(s)
    ids = torch.tensor([[0, 17, 63], [5, 5, 40]])
    full = dequantize_kept(lin.weight, lin.scales, bits)
    torch.testing.assert_close(lin.lookup(ids), full[ids], rtol=0, atol=0)


def _call_kernel(isa, bits, q, a, w, s, N):
    lib = ctypes.CDLL(str(qmatmul.build(bits, isa, shared=True)))
    fn = getattr(lib, qmatmul.symbol(bits, isa))
    M, K = q.shape
    y = np.zeros((M, N), np.float32)
    arrays = [np.ascontiguousarray(t) for t in (q.numpy(), a.numpy(), w.numpy(), s.numpy().view(np.uint16))]

    def memref(arr):  # MLIR's memref<?xT> calling convention: base, aligned, offset, size, stride
        p = ctypes.c_void_p(arr.ctypes.data)
        return [p, p, ctypes.c_size_t(0), ctypes.c_size_t(arr.size), ctypes.c_size_t(1)]

    per = qmatmul.per_workgroup(N)
    sizes = [ctypes.c_size_t(v) for v in (M, N, K, per)]
    for wg in range(-(-(N // 16) // per)):
        fn(*[x for arr in arrays + [y] for x in memref(arr)], *sizes, ctypes.c_size_t(wg))
    return y


@needs_gcc
@pytest.mark.skipif(not HOST_ISAS, reason="the kernel needs an x86-64 CPU with AVX2")
@pytest.mark.parametrize("isa", HOST_ISAS)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape", [(1, 16, 32), (7, 48, 96), (13, 512, 1024), (64, 32, 64)])
def test_kernel_matches_its_reference(isa, bits, shape):
    """Every workgroup of the kernel, called directly, against the torch arithmetic it implements; that in
    turn against the float product of the dequantized weight (the activations' int8 rounding)."""
    M, N, K = shape
    rng = np.random.default_rng(M * N + bits)
    u = rng.integers(0, 1 << bits, (N, K)).astype(np.uint8)
    d = rng.uniform(0.001, 0.02, (N, K // 32)).astype(np.float32)
    m = d * (1 << (bits - 1))  # centred, as Q8_0 / Q4_0 are
    w, s = (torch.from_numpy(t) for t in gguf_quant.pack(u, d, m, bits))
    x = torch.randn(M, K)
    if K > 32:
        x[0, :32] = 0  # a group of zeros
    q, a = quantize_rows(x)
    want = reference_matmul(q, a, w, s, bits)
    got = _call_kernel(isa, bits, q, a, w, s, N)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    exact = x @ dequantize_kept(w, s, bits).t()
    assert float((want - exact).norm() / exact.norm()) < 0.02
