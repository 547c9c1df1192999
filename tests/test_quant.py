"""models/quant.py + export --quantization w8a8: int8 weights and activations, compiled == eager."""

import numpy as np
import pytest
import torch

from compile import CompileRequest, compile_mlir
from export import paged_llm
from models.abi import ModelABI
from models.default_model import export_args
from models.llama import PagedLlama
from models.quant import Int8Linear, quantize_linear, random_calibration_ids
from models.weights import load_weights
from serve.core.runner import Runner
from tests.eager import compiled_greedy, greedy, padded
from tests.test_export import STRIDE, export_and_compile


def test_int8_linear_matches_float_with_outlier_channels():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=g) * 0.05
    x = torch.randn(5, 96, generator=g)
    x[:, 7] *= 40  # an outlier channel, as LLM activations have: smoothing moves it into the weight
    lin = Int8Linear(96, 64)
    lin.load_state_dict(quantize_linear(w, x.abs().amax(0)))
    want = x @ w.T
    rel = (lin(x) - want).norm() / want.norm()
    assert rel < 0.02
    plain = Int8Linear(96, 64)  # no smoothing: the outlier sets every row's step
    plain.load_state_dict(quantize_linear(w, torch.ones(96), alpha=0.0) | {"input_scale": torch.ones(96)})
    assert rel < (plain(x) - want).norm() / want.norm()


@pytest.fixture(scope="module")
def w8a8_program(tiny_models, tmp_path_factory):
    gguf = tiny_models["mqa"][2]  # tied embeddings: the head gets its own int8 copy
    return export_and_compile(gguf, tmp_path_factory.mktemp("w8a8"), "--quantization", "w8a8"), gguf


def test_w8a8_compiled_matches_eager_and_tracks_float(w8a8_program):
    out, gguf = w8a8_program
    abi = ModelABI.load(out / "config.json")
    assert abi.quantization == "w8a8"
    runner = Runner(out / "model.vmfb", [out / "model.irpa"], abi, page_count=16)
    f32 = PagedLlama.from_weights(load_weights(gguf_file=gguf), STRIDE)
    q = f32.quantize_w8a8(random_calibration_ids(128))  # what the export did (the tiny GGUF has no tokenizer)

    prompt = list(range(3, 22))
    pages = np.array([[4, 9, 2, 11]])
    got = runner.prefill(np.array([padded(prompt, STRIDE)]), np.zeros(1), np.array([len(prompt)]), pages)
    with torch.no_grad():
        args = (
            torch.tensor([padded(prompt, STRIDE)]),
            torch.zeros(1, dtype=torch.long),
            torch.tensor([len(prompt)]),
            torch.tensor(pages),
        )
        want = q.prefill(*args, q.allocate_cache(16)).numpy()
        ref = f32.prefill(*args, f32.allocate_cache(16)).numpy()
    # compiled == eager up to an activation landing on the other side of a rounding boundary
    assert np.abs(got - want).max() <= 2e-3 * np.abs(want).max()
    cos = float((got * ref).sum() / np.linalg.norm(got) / np.linalg.norm(ref))
    assert cos > 0.99, cos

    step = runner.decode(np.array([5]), np.array([len(prompt) + 1]), pages).logits
    with torch.no_grad():
        cache = q.allocate_cache(16)
        q.prefill(*args, cache)
        want = q.decode(torch.tensor([[5]]), torch.tensor([len(prompt) + 1]), torch.tensor(pages), cache).numpy()
    assert np.abs(step - want).max() <= 2e-3 * np.abs(want).max()
    assert greedy(q, prompt, 8) == compiled_greedy(runner, prompt, 8, pages)


def test_w8a8_as_served_batches_match_eager(tiny_models, tmp_path):
    """The server's W8A8 build (models.default_model.export_args: a bfloat16 KV cache as int32 words): a
    ragged batch-2 prefill and batch-4 decode steps equal the eager model (the dynamic-batch prefill's
    scatter is where IREE 3.13 went wrong once: README findings)."""
    gguf = tiny_models["gqa"][2]
    out = export_and_compile(gguf, tmp_path, *export_args("w8a8"))
    abi = ModelABI.load(out / "config.json")
    runner = Runner(out / "model.vmfb", [out / "model.irpa"], abi, page_count=16)
    f32 = PagedLlama.from_weights(load_weights(gguf_file=gguf), STRIDE, torch.float32, torch.bfloat16)
    q = f32.quantize_w8a8(random_calibration_ids(128))
    cache = q.allocate_cache(16)
    assert runner.read_cache().dtype == np.int32 and cache.dtype == torch.int32
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (13, 22)]
    pages = np.array([[5, 9, 2, 0], [11, 3, 7, 14]])
    args = (
        np.array([p + [0] * (24 - len(p)) for p in prompts]),
        np.zeros(2, np.int64),
        np.array([len(p) for p in prompts]),
        pages,
    )
    got = runner.prefill(*args)
    with torch.no_grad():
        want = q.prefill(*(torch.tensor(a) for a in args), cache).numpy()
    # (up to an activation landing on the other side of a rounding boundary)
    assert np.abs(got - want).max() <= 2e-3 * np.abs(want).max()
    dpages = np.array([pages[0], [0] * 4, pages[1], [0] * 4])
    for step in range(3):
        toks, lens = np.array([5 + step, 0, 17 + step, 0]), np.array([14 + step, 0, 23 + step, 0])
        got = runner.decode(toks, lens, dpages).logits[[0, 2]]
        with torch.no_grad():
            want = q.decode(torch.tensor(toks).view(-1, 1), torch.tensor(lens), torch.tensor(dpages), cache)
        want = want[[0, 2]].numpy()
        assert np.abs(got - want).max() <= 2e-3 * np.abs(want).max()
        assert (got.argmax(-1) == want.argmax(-1)).all()


@pytest.mark.parametrize("target,arch", [("hip", "gfx942"), ("cuda", "sm_80")])
def test_w8a8_gpu_targets_compile(w8a8_program, target, arch):
    out, _ = w8a8_program
    vmfb = compile_mlir(CompileRequest(out / "model.mlir", target, arch), out / f"model_{target}.vmfb")
    assert vmfb.stat().st_size > 10_000


def test_w8a8_refusals(tiny_models, w8a8_program, tmp_path, capsys):
    gguf = tiny_models["gqa"][2]
    for extra in (["--activation-dtype", "float16"], ["--tensor-parallelism-size", "2"]):
        assert (
            paged_llm.main(
                ["--gguf-file", str(gguf), "--output-dir", str(tmp_path / "x"), "--quantization", "w8a8", *extra]
            )
            == 2
        )
        assert "w8a8 needs --activation-dtype float32 and tensor parallelism 1" in capsys.readouterr().err
    out, _ = w8a8_program  # its IRPA is int8: re-exporting it would read int8 as floats
    assert paged_llm.main(["--irpa-file", str(out / "model.irpa"), "--output-dir", str(tmp_path / "y")]) == 2
    assert "holds w8a8-quantized weights" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_w8a8_answers(smollm2_w8a8_artifacts, smollm2_reference):
    """The real model in W8A8 through export -> compile -> runtime still answers the question."""
    ids, ref, tok = smollm2_reference
    art = smollm2_w8a8_artifacts
    abi = ModelABI.load(art.config)
    runner = Runner(art.vmfb, art.parameters, abi, page_count=32)
    out = compiled_greedy(runner, ids, 16, np.array([[9, 4, 17, 2, 30, 11]]))
    assert "Paris" in tok.decode(out), tok.decode(out)
