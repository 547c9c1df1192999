"""Kept GGUF quantizations (models.gguf_quant, models.qlinear) and their x86 kernel (models.qmatmul)."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize

from compile import CompileError, CompileRequest, compile_mlir
from export import paged_llm
from models import cpu, gguf_quant, qmatmul
from models.abi import ModelABI
from models.ckernel import compiler
from models.llama import PagedLlama
from models.qlinear import QLinear, quantize_rows, reference_matmul
from models.qlinear import dequantize as dequantize_kept
from models.weights import read_irpa, read_irpa_meta
from serve.core.runner import Runner
from tests.eager import program_vs_eager
from tests.tiny import VARIANTS, Variant, hf_model, rewrite_gguf, write_gguf

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
    fmt = gguf_quant.kept_format(qtype)
    assert u.dtype == np.uint8 and u.max() < (16 if fmt.startswith("q4") else 256)
    d16, m16 = d.astype(np.float16).astype(np.float32), m.astype(np.float16).astype(np.float32)
    got = d16[:, None] * u - m16[:, None]
    span = np.abs(ref).max(axis=1, keepdims=True) + 1e-12
    err = (np.abs(got - ref) / span).max()
    assert err < (2e-3 if gguf_quant.exact(qtype) else 6e-3), err
    if qtype in (T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1):  # float16 scales of float16 scales: exact
        np.testing.assert_array_equal(got, ref)
    # and through the packed layout the model reads
    w, s = gguf_quant.convert(blocks, qtype, rows, cols)
    bits, symmetric = gguf_quant.FORMATS[fmt]
    assert w.nbytes == rows * cols * bits // 8 and s.size == rows * cols // 32 * (1 if symmetric else 2)
    if symmetric:
        np.testing.assert_array_equal(m16, d16 * (1 << (bits - 1)))
    kept = dequantize_kept(torch.from_numpy(w), torch.from_numpy(s), fmt).numpy()
    np.testing.assert_array_equal(kept, got.reshape(rows, cols))


def test_unknown_type_is_an_error():
    with pytest.raises(NotImplementedError):
        gguf_quant.groups(np.zeros((1, GGML_QUANT_SIZES[T.Q8_1][1]), np.uint8), T.Q8_1)


def _random_kept(fmt: str, N: int, K: int, rng) -> tuple[torch.Tensor, torch.Tensor]:
    bits, symmetric = gguf_quant.FORMATS[fmt]
    u = rng.integers(0, 1 << bits, (N, K)).astype(np.uint8)
    d = rng.uniform(0.001, 0.02, (N, K // 32)).astype(np.float32)
    m = d * (1 << (bits - 1)) if symmetric else rng.uniform(-0.1, 0.1, (N, K // 32)).astype(np.float32)
    return tuple(torch.from_numpy(t) for t in gguf_quant.pack(u, d, m, fmt))


@pytest.mark.parametrize("fmt", list(gguf_quant.FORMATS))
def test_lookup_reads_rows_of_the_packed_table(fmt):
    N, K = 64, 96
    lin = QLinear(K, N, fmt)
    lin.weight.data, lin.scales.data = _random_kept(fmt, N, K, np.random.default_rng(len(fmt)))
    ids = torch.tensor([[0, 17, 63], [5, 5, 40]])
    full = dequantize_kept(lin.weight, lin.scales, fmt)
    torch.testing.assert_close(lin.lookup(ids), full[ids], rtol=0, atol=0)


def _call_kernel(isa, fmt, q, a, w, s, N):
    lib = ctypes.CDLL(str(qmatmul.build(fmt, isa, shared=True)))
    fn = getattr(lib, qmatmul.symbol(fmt, isa))
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
@pytest.mark.parametrize("fmt", list(gguf_quant.FORMATS))
@pytest.mark.parametrize("shape", [(1, 16, 32), (7, 48, 96), (13, 512, 1024), (64, 32, 64)])
def test_kernel_matches_its_reference(isa, fmt, shape):
    """Every workgroup of the kernel, called directly, against the torch arithmetic it implements; that in
    turn against the float product of the dequantized weight (the activations' int8 rounding)."""
    M, N, K = shape
    w, s = _random_kept(fmt, N, K, np.random.default_rng(M * N + len(fmt)))
    x = torch.randn(M, K)
    if K > 32:
        x[0, :32] = 0  # a group of zeros
    q, a = quantize_rows(x)
    want = reference_matmul(q, a, w, s, fmt)
    got = _call_kernel(isa, fmt, q, a, w, s, N)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    exact = x @ dequantize_kept(w, s, fmt).t()
    assert float((want - exact).norm() / exact.norm()) < 0.02


# ---------------------------------------------------------------- programs

PROJ = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
KQUANT = Variant("kquant", heads=4, kv_heads=2, hidden=256, intermediate=512, tied=True)


def _quantized(variant: Variant, path, types: dict[str, str]):
    return write_gguf(hf_model(variant), path, types)


def _program(gguf, out, *extra):
    argv = ["--gguf-file", str(gguf), "--output-dir", str(out), "--bs-prefill", "1,2", "--bs-decode", "1,4"]
    assert paged_llm.main([*argv, "--block-seq-stride", "4", *extra]) == 0
    compile_mlir(CompileRequest(out / "model.mlir"), out / "model.vmfb")
    abi = ModelABI.load(out / "config.json")
    runner = Runner(out / "model.vmfb", [out / "model.irpa"], abi, page_count=40)
    model = PagedLlama.from_parameters(read_irpa(out / "model.irpa"), 4)
    return abi, runner, model


CASES = [  # (variant, types, exported with --cpu-matmul)
    ("mha", {p: "Q8_0" for p in PROJ} | {"token_embd.weight": "Q8_0", "output.weight": "Q8_0"}, True),
    ("gqa", {p: "Q4_0" for p in PROJ} | {"output.weight": "Q4_0"}, True),
    ("gqa", {p: "Q4_1" for p in PROJ} | {"token_embd.weight": "Q4_1"}, False),  # dequantized in the graph
    ("mqa", {p: "Q4_1" for p in PROJ} | {"token_embd.weight": "Q8_0"}, True),  # tied: the kept table is the head
    ("head_dim", {p: "Q5_0" for p in PROJ}, True),  # hidden 48: the matrices it cannot tile stay float
    ("llama31", {p: "Q5_1" for p in PROJ}, True),
    (
        "kquant",
        {
            "attn_q": "Q4_K",
            "attn_k": "Q4_K",
            "attn_v": "Q6_K",
            "attn_output": "Q4_K",
            "ffn_gate": "Q4_K",
            "ffn_up": "Q5_K",
            "ffn_down": "Q6_K",
            "token_embd.weight": "Q6_K",
        },
        True,
    ),  # a Q4_K_M mix
]


@pytest.mark.parametrize("variant,types,kernel", CASES, ids=[f"{c[0]}-{list(c[1].values())[0]}" for c in CASES])
def test_program_equals_eager_model(tmp_path, variant, types, kernel):
    """The compiled program (kernel or graph dequantization) and the eager model over the same kept
    parameters (models.qlinear's arithmetic) agree within 1e-3 of the logits' scale, through a ragged
    chunked prefill, decode at batch 4 with padding rows, and decode at batch 1 (tests.eager)."""
    if kernel and (not HOST_ISAS or compiler() is None):
        pytest.skip("the kernel needs gcc and an x86-64 CPU with AVX2")
    v = KQUANT if variant == "kquant" else next(x for x in VARIANTS if x.name == variant)
    gguf = _quantized(v, tmp_path / f"{variant}.gguf", types)
    extra = ["--cpu-matmul", HOST_ISAS[0]] if kernel else []
    abi, runner, model = _program(gguf, tmp_path / "out", *extra)
    assert abi.quantization == "gguf"
    assert (qmatmul.ISAS[HOST_ISAS[0]] in abi.cpu_features) == kernel if HOST_ISAS else True
    if kernel:
        qmatmul.enable(model, HOST_ISAS[0])
        with pytest.raises(CompileError, match="--cpu-matmul"):
            compile_mlir(CompileRequest(tmp_path / "out" / "model.mlir", "hip", "gfx942"), tmp_path / "h.vmfb")
    elif variant == "gqa":  # dequantized in the graph: the program a GPU gets compiles for one
        compile_mlir(CompileRequest(tmp_path / "out" / "model.mlir", "hip", "gfx942"), tmp_path / "h.vmfb")
    # the kept bytes: every quantized matrix that tiles is int8 [N, K * bits / 8] with float16 scales
    meta = read_irpa_meta(tmp_path / "out" / "model.irpa")[2]["tensors"]
    kept = [n for n in meta if n.endswith(".scales")]
    assert kept and all(meta[n.replace(".scales", ".weight")]["dtype"] == "int8" for n in kept)
    assert all(meta[n]["dtype"] == "float16" for n in kept)
    if variant == "head_dim":
        assert meta["blk.0.attn_q.weight"]["dtype"] == "float32"  # [128, 48]: no tiling of 48 columns
    pages = np.array([[3, 7, 1, 12, 5, 9, 14], [2, 8, 4, 11, 6, 10, 13]])
    worst, scale = program_vs_eager(runner, model, model.allocate_cache(40), [9, 23], pages, split=8, steps=3)
    assert worst <= 1e-3 * scale, (worst, scale)


def test_kept_quantization_is_not_sharded(tiny_models, tmp_path):
    gguf = _quantized(VARIANTS[1], tmp_path / "q.gguf", {p: "Q8_0" for p in PROJ})
    argv = ["--gguf-file", str(gguf), "--output-dir", str(tmp_path / "o"), "--tensor-parallelism-size", "2"]
    assert paged_llm.main(argv) == 2
    assert paged_llm.main([*argv, "--weights", "float32"]) == 0


def test_a_type_without_kept_format_names_the_tensor(tmp_path, capsys):
    """A quantized tensor of a type that can neither be kept nor read (Q8_1, an intermediate llama.cpp never
    writes to files) is an error naming the tensor and the type, not a crash or a float blow-up."""
    import gguf as g

    src = _quantized(VARIANTS[1], tmp_path / "q.gguf", {p: "Q8_0" for p in PROJ})

    def replace(i, t, rows, cols):
        if t.name != "blk.1.ffn_up.weight":
            return None
        return np.zeros((rows, cols // 32 * 40), np.uint8), g.GGMLQuantizationType.Q8_1

    rewrite_gguf(src, tmp_path / "bad.gguf", replace)
    assert paged_llm.main(["--gguf-file", str(tmp_path / "bad.gguf"), "--output-dir", str(tmp_path / "o")]) == 2
    assert "'blk.1.ffn_up.weight' uses Q8_1" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_kept_q4_1_greedy(smollm2_gguf_artifacts, smollm2_reference, capsys):
    """SmolLM2's own Q4_1 file kept as q4m: the program's greedy tokens equal the eager model's over the same
    parameters and arithmetic, but for a flip at a near-tie (its margin printed: float differences of 1e-6
    between the compiled and the eager graph round an activation to the next int8 step now and then, so
    the two drift apart by up to about 1 % of a logit over 32 tokens); and how many agree with float32
    transformers on the dequantized file (the int8 activations' effect) is printed."""
    from tests.eager import compiled_greedy, greedy

    art = smollm2_gguf_artifacts
    abi = ModelABI.load(art.config)
    assert abi.quantization == "gguf"
    ids, ref, _ = smollm2_reference
    pages = np.array([[7, 3, 9, 1, 12]])
    runner = Runner(art.vmfb, art.parameters, abi, page_count=16)
    ours = compiled_greedy(runner, ids, 32, pages)
    model = PagedLlama.from_parameters(read_irpa(art.irpa), abi.block_seq_stride)
    isa = next((isa for isa, feature in qmatmul.ISAS.items() if feature in abi.cpu_features), None)
    if isa:  # (the program's kernel: the eager model does its arithmetic)
        qmatmul.enable(model, isa)
    eager = greedy(model, ids, 32, page_ids=pages[0].tolist())
    same = next((i for i, (a, b) in enumerate(zip(ours, eager)) if a != b), len(ours))
    if same < len(ours):  # a near-tie: the eager model's top two logits at that step
        step = greedy_logits(model, ids + eager[:same], pages[0].tolist())
        top2 = torch.topk(step, 2).values
        margin = float(top2[0] - top2[1]) / float(top2[0].abs())
        with capsys.disabled():
            print(f"\n[smollm2 q4_1 kept] program and eager differ at token {same}: margin {margin:.2e} of the top")
        assert margin < 2e-2
    with capsys.disabled():
        agree = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), len(ref))
        print(f"\n[smollm2 q4_1 kept] greedy tokens equal to float32 transformers: the first {agree} of {len(ref)}")
    assert agree >= 24  # (measured: all 32 on an AVX-512 host)


def greedy_logits(model, tokens, pages):
    cache = model.allocate_cache(max(pages) + 1)
    s = model.block_seq_stride
    padded = tokens + [0] * (-len(tokens) % s)
    with torch.no_grad():
        return model.prefill(
            torch.tensor([padded]), torch.tensor([0]), torch.tensor([len(tokens)]), torch.tensor([pages]), cache
        )[0]


@pytest.mark.parametrize("qtype,want", [("F16", "bfloat16"), (None, "float32"), ("Q8_0", "float32")])
def test_auto_serves_a_16_bit_gguf_in_bfloat16(tmp_path, qtype, want):
    """--weights auto: an F16 GGUF's program computes in bfloat16 (twice float32's speed on the 1B shape:
    docs/benchmarks.md), an F32 one in float32, a quantized one in float32 around its kept matrices."""
    types = {p: qtype for p in PROJ} | {"token_embd.weight": qtype} if qtype else {}
    gguf = _quantized(VARIANTS[1], tmp_path / "m.gguf", types)
    assert paged_llm.main(["--gguf-file", str(gguf), "--output-dir", str(tmp_path / "o"), "--bs-decode", "1"]) == 0
    abi = ModelABI.load(tmp_path / "o" / "config.json")
    assert abi.activation_dtype == want
    assert abi.quantization == ("gguf" if qtype == "Q8_0" else "none")
    dtypes = {info["dtype"] for info in read_irpa_meta(tmp_path / "o" / "model.irpa")[2]["tensors"].values()}
    assert ("bfloat16" in dtypes) == (want == "bfloat16")
