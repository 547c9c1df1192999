"""models/amx.py + export --amx: W8A8 matmuls on AMX tiles give the same logits as IREE's int8 matmul."""

import shutil

import numpy as np
import pytest
import torch

from export import paged_llm
from models import amx, cpu
from models.abi import ModelABI
from serve.core.runner import Runner
from tests.eager import padded
from tests.test_export import export_and_compile

needs_amx = pytest.mark.skipif(
    not (cpu.host_has_amx() and shutil.which("gcc")), reason="needs a CPU with AMX-INT8 and gcc"
)


def test_pack_is_a_permutation_and_the_eager_op_is_the_int_matmul():
    g = torch.Generator().manual_seed(0)
    w = torch.randint(-127, 128, (128, 192), generator=g, dtype=torch.int8)
    x = torch.randint(-127, 128, (5, 192), generator=g, dtype=torch.int8)
    packed = amx.pack(w)
    assert packed.shape == w.shape and not torch.equal(packed, w)
    assert torch.equal(amx.unpack(packed), w)
    # AMX's B tile for columns 0-15, k 0-63: row r holds (column n, k 4r..4r+3) at 4n..4n+3
    assert torch.equal(packed.flatten()[:1024].view(16, 16, 4), w[:16, :64].view(16, 16, 4).permute(1, 0, 2))
    assert torch.equal(amx.amx_int8_mm(x, packed), x.int() @ w.int().t())
    assert amx.fits(128, 192) and not amx.fits(96, 64) and not amx.fits(64, 96)


def test_require_names_what_is_missing():
    with pytest.raises(ValueError, match="does not know"):
        cpu.require(["no-such-feature"])
    cpu.require([])
    if not cpu.host_has_amx():
        with pytest.raises(ValueError, match="re-export without --amx"):
            cpu.require(["amx-int8"])


def test_amx_needs_w8a8(tiny_models, tmp_path, capsys):
    assert paged_llm.main(["--gguf-file", str(tiny_models["gqa"][2]), "--output-dir", str(tmp_path), "--amx"]) == 2
    assert "--quantization w8a8" in capsys.readouterr().err


@needs_amx
def test_amx_program_equals_the_int8_ukernel_program(tiny_models, tmp_path):
    """Integer products are exact, so the logits of the two programs agree to float rounding order; the
    tiny model's down projection (K = 96) does not tile and keeps IREE's matmul beside the AMX ones."""
    gguf = tiny_models["gqa"][2]
    runners = []
    for name, extra in (("ukernel", []), ("amx", ["--amx"])):
        out = export_and_compile(gguf, tmp_path / name, "--quantization", "w8a8", *extra)
        abi = ModelABI.load(out / "config.json")
        runners.append(Runner(out / "model.vmfb", [out / "model.irpa"], abi, page_count=16))
    assert runners[1].abi.cpu_features == ["amx-int8"] and runners[0].abi.cpu_features == []
    assert (tmp_path / "amx" / "model.mlir").read_text().count("@aotllm_amx_mm_s8(") >= 4

    prompts = [list(range(3, 22)), list(range(40, 45))]
    pages = np.array([[4, 9, 2, 11], [5, 6, 0, 0]])
    width = max(len(p) for p in prompts)
    tokens = np.array([padded(p, width) for p in prompts])
    lens = np.array([len(p) for p in prompts])
    got = [r.prefill(tokens, np.zeros(2), lens, pages) for r in runners]
    np.testing.assert_allclose(got[1], got[0], rtol=1e-5, atol=1e-5 * np.abs(got[0]).max())
    table = np.concatenate([pages, np.zeros((2, 4), np.int64)])  # decode batch 4: two padding slots
    for step in range(3):
        toks = np.array([7 + step, 30 + step, 0, 0])
        seq = np.concatenate([lens + step + 1, [0, 0]])
        got = [r.decode(toks, seq, table).logits[:2] for r in runners]
        np.testing.assert_allclose(got[1], got[0], rtol=1e-5, atol=1e-5 * np.abs(got[0]).max())


def _greedy_logits(runner: Runner, ids: list[int], steps: int, pages: np.ndarray) -> tuple[list[np.ndarray], list[int]]:
    """The logits of one prefill and `steps` greedy decode steps, and the tokens chosen from them."""
    s = runner.abi.block_seq_stride
    logits = [runner.prefill(np.array([padded(ids, s)]), np.array([0]), np.array([len(ids)]), pages)]
    tokens = [int(logits[-1][0].argmax())]
    for _ in range(steps):
        logits.append(runner.decode(np.array([tokens[-1]]), np.array([len(ids) + len(tokens)]), pages).logits)
        tokens.append(int(logits[-1][0].argmax()))
    return logits, tokens


@pytest.mark.slow
@needs_amx  # (a mark: the skip comes before anything below is exported, fetched or built)
def test_smollm2_amx_logits_are_bit_identical_to_the_vnni_programs():
    """README: on SmolLM2 the --amx program's logits equal the W8A8 program's without it (IREE's VNNI int8
    ukernel), bit for bit: every SmolLM2 matmul tiles (its widths are multiples of 64), both kernels return
    the same exact int32 sums, and the same ops scale them. The tests' chat prompt (16 tokens) and 40
    greedy decode steps, on scattered pages (the same program run twice gives identical logits: checked
    without AMX)."""
    from tokenizers import Tokenizer

    from export.artifacts import build
    from models.default_model import smollm2_gguf
    from tests.conftest import SMOL_PROMPT
    from tests.prebuild import SMOLLM2_BUILDS

    amx_args = SMOLLM2_BUILDS["w8a8"]  # with AMX-INT8 the server's W8A8 options include --amx: one build
    assert "--amx" in amx_args
    vnni_args = [a for a in amx_args if a != "--amx"]
    gguf, steps = smollm2_gguf(), 40
    runs = {}
    for name, args in (("vnni", vnni_args), ("amx", amx_args)):
        art = build(gguf, args)
        abi = ModelABI.load(art.config)
        assert abi.cpu_features == (["amx-int8"] if name == "amx" else [])
        if name == "amx":
            assert (art.dir / "model.mlir").read_text().count("@aotllm_amx_mm_s8(") >= 4
        runner = Runner(art.vmfb, art.parameters, abi, page_count=32)
        ids = Tokenizer.from_file(str(art.dir / "tokenizer.json")).encode(SMOL_PROMPT, add_special_tokens=False).ids
        n_pages = -(-(len(ids) + steps) // abi.block_seq_stride)
        assert n_pages <= 31
        pages = np.array([[(7 * i) % 31 + 1 for i in range(n_pages)]])  # distinct, out of order, in 1..31
        runs[name] = _greedy_logits(runner, ids, steps, pages)
    (amx_logits, amx_tokens), (vnni_logits, vnni_tokens) = runs["amx"], runs["vnni"]
    assert len(amx_logits) == len(vnni_logits) == steps + 1
    for step, (a, v) in enumerate(zip(amx_logits, vnni_logits)):
        assert a.shape == v.shape and np.isfinite(v).all()
        assert np.array_equal(a, v), f"step {step}: max |AMX - VNNI| = {np.abs(a - v).max():.3g}"
    assert amx_tokens == vnni_tokens
