"""Tensor parallelism: sharding/, the N-device export (models/tp.py), N local-task devices through the server."""

import shutil
import subprocess
import sys

import httpx
import numpy as np
import pytest
import torch

from compile import CompileRequest, compile_mlir
from export import paged_llm
from models.abi import ModelABI
from models.config import LlamaConfig, ModelError
from models.llama import PagedLlama
from models.tp import check_tp
from models.weights import load_weights, rank_paths
from serve.core.runner import Runner
from sharding import shard_tensors
from tests.eager import padded
from tests.server_util import ServerThread, tiny_config
from tests.tiny import Variant, hf_model, write_gguf

STRIDE = 8
ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def export_tp(source_flag, source, out, tp, *extra):
    assert (
        paged_llm.main(
            [
                source_flag,
                str(source),
                "--output-dir",
                str(out),
                "--bs-prefill",
                "1,2",
                "--bs-decode",
                "1,4",
                "--block-seq-stride",
                str(STRIDE),
                "--device-block-count",
                "64",
                *(["--tensor-parallelism-size", str(tp)] if tp else []),
                *extra,
            ]
        )
        == 0
    )
    return out


@pytest.fixture(scope="module")
def mha(tiny_models):
    return tiny_models["mha"][2]  # 4 heads, 4 KV heads


@pytest.fixture(scope="module")
def programs(mha, tmp_path_factory):
    """The tiny MHA model at TP=1, 2 (exported from `python -m sharding`'s files) and 4, compiled."""
    from models.gguf_tokenizer import save_tokenizer
    from tests.tiny import char_tokenizer

    root = tmp_path_factory.mktemp("tp")
    out = {1: export_tp("--gguf-file", mha, root / "tp1", None), 4: export_tp("--gguf-file", mha, root / "tp4", 4)}
    shard = subprocess.run(
        [
            sys.executable,
            "-m",
            "sharding",
            "--gguf-file",
            str(mha),
            "--tensor-parallelism-size",
            "2",
            "--output-irpa",
            str(root / "sharded" / "model.irpa"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert shard.returncode == 0, shard.stderr
    save_tokenizer(*char_tokenizer(), root / "sharded")  # as sharding writes a GGUF's tokenizer there
    out[2] = export_tp("--irpa-file", root / "sharded" / "model.irpa", root / "tp2", None)
    assert ModelABI.load(out[2] / "config.json").tokenizer_files == ["tokenizer.json", "tokenizer_config.json"]
    for tp, folder in out.items():
        compile_mlir(CompileRequest(folder / "model.mlir", devices=tp), folder / "model.vmfb")
        save_tokenizer(*char_tokenizer(), folder)
    return out


def test_eager_sharded_equals_unsharded(mha):
    w = load_weights(gguf_file=mha)
    one = PagedLlama.from_weights(w, STRIDE)
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    args = (tokens, torch.zeros(2, dtype=torch.long), torch.tensor([16, 11]), torch.tensor([[1, 2], [3, 4]]))
    with torch.no_grad():
        want = one.prefill(*args, one.allocate_cache(5))
        for tp in (2, 4):
            model = PagedLlama.from_weights(shard_tensors(w, tp), STRIDE, tp=tp)
            assert torch.allclose(model.prefill(*args, model.allocate_cache(5)), want, atol=1e-5)


def test_heads_that_do_not_divide_say_why():
    smollm2_like = LlamaConfig(
        vocab_size=64, hidden_size=576, intermediate_size=1536, num_layers=1, num_heads=9, num_kv_heads=3, head_dim=64
    )
    check_tp(smollm2_like, 3)
    with pytest.raises(ModelError, match=r"must divide the model's attention heads 9, KV heads 3.*over \[1, 3\]"):
        check_tp(smollm2_like, 2)


def test_sharding_cli_errors_clearly(mha, tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "sharding",
            "--gguf-file",
            str(mha),
            "--tensor-parallelism-size",
            "3",
            "--output-irpa",
            str(tmp_path / "m.irpa"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "tensor parallelism 3 must divide" in r.stderr and "[1, 2, 4]" in r.stderr


def test_sharded_files_round_trip(programs, mha, tmp_path):
    folder = programs[2]
    abi = ModelABI.load(folder / "config.json")
    assert abi.tensor_parallelism_size == 2
    assert abi.parameter_files == ["model.irpa", "model.rank0.irpa", "model.rank1.irpa"]
    assert abi.paged_kv_cache.paged_kv_block_size_elements_per_device == [2 * 2 * STRIDE * 2 * 16] * 2
    w = load_weights(irpa_file=folder / "model.irpa")
    want = shard_tensors(load_weights(gguf_file=mha), 2)
    assert w.tp == 2 and w.tensors.keys() == want.tensors.keys()
    assert all(np.array_equal(w.tensors[k], want.tensors[k]) for k in want.tensors)
    shutil.copy(folder / "model.irpa", tmp_path / "model.irpa")
    shutil.copy(rank_paths(folder / "model.irpa", 2)[0], tmp_path)
    with pytest.raises(ModelError, match="model.rank1.irpa is missing"):
        load_weights(irpa_file=tmp_path / "model.irpa")


def _same_outputs(one: Runner, many: Runner, tol: float = 1e-5) -> None:
    """A ragged batch-2 prefill into pages 3 7 1 / 9 2 5, its embeddings, three batch-4 decode steps, a mixed step
    and a score give the same numbers on both runners, up to `tol` (16-page caches; the callers compare those)."""
    prompts = [list(range(5, 18)), list(range(40, 62))]
    pages = np.array([[3, 7, 1], [9, 2, 5]])
    toks = np.array([padded(p, STRIDE) + [0] * (24 - len(padded(p, STRIDE))) for p in prompts])
    args = (toks, np.zeros(2), np.array([len(p) for p in prompts]), pages)
    assert np.abs(many.prefill(*args) - one.prefill(*args)).max() <= tol
    assert np.abs(many.embed(*args) - one.embed(*args)).max() <= tol
    lens = np.array([14, 23, 0, 0])
    dpages = np.concatenate([pages, np.zeros((2, 3), np.int64)])
    for _ in range(3):
        got, want = many.decode(np.array([7, 8, 0, 0]), lens, dpages), one.decode(np.array([7, 8, 0, 0]), lens, dpages)
        assert np.abs(got.logits[:2] - want.logits[:2]).max() <= tol
        lens[:2] += 1
    # a mixed step (both decode rows and a new prompt into pages 11 12) and a two-position score
    new = (np.array([list(range(70, 79))]), np.zeros(1), np.array([9]), np.array([[11, 12]]))
    mixed = (np.array([7, 8]), lens[:2], pages, *new)
    assert np.abs(many.mixed(*mixed) - one.mixed(*mixed)).max() <= tol
    score = (np.array([[3, 4]]), lens[:1], lens[:1] + 2, pages[:1])
    assert np.abs(many.score(*score) - one.score(*score)).max() <= tol


@pytest.mark.parametrize("tp", [2, 4])
def test_compiled_tp_equals_tp1_logits_and_cache(programs, tp):
    def runner(t):
        abi = ModelABI.load(programs[t] / "config.json")
        return Runner(
            programs[t] / "model.vmfb",
            [programs[t] / f for f in abi.parameter_files],
            abi,
            16,
            device_ids=list(range(t)),
        )

    one, many = runner(1), runner(tp)
    _same_outputs(one, many)
    # each device's slab holds its KV heads of the unsharded cache: [page][layer][k|v][slot][head][dim]
    full = one.read_cache().reshape(16, 2, 2, STRIDE, 4, 16)
    for r in range(tp):
        slab = many.read_cache(r).reshape(16, 2, 2, STRIDE, 4 // tp, 16)
        heads = slice(r * 4 // tp, (r + 1) * 4 // tp)
        assert np.abs(slab[1:] - full[1:, :, :, :, heads]).max() <= 1e-5


def test_bfloat16_cache_on_two_devices_equals_one(mha, tmp_path):
    """A bfloat16 KV cache (int32 words of two values, models.llama PagedLlama.cache_dtype) split over two
    devices: each device's slab holds half the words of a row, the logits equal the one-device program's."""
    out = {}
    for tp in (1, 2):
        out[tp] = export_tp("--gguf-file", mha, tmp_path / f"tp{tp}", tp, "--kv-cache-dtype", "bfloat16")
        compile_mlir(CompileRequest(out[tp] / "model.mlir", devices=tp), out[tp] / "model.vmfb")
    abis = {t: ModelABI.load(out[t] / "config.json") for t in out}
    one, two = (
        Runner(
            out[t] / "model.vmfb", [out[t] / f for f in abis[t].parameter_files], abis[t], 16, device_ids=list(range(t))
        )
        for t in (1, 2)
    )
    # (up to a K/V value on a bfloat16 rounding boundary: the two programs sum in different orders)
    _same_outputs(one, two, tol=1e-4)

    def values(cache, heads):  # [page][layer][k|v][slot][head][dim] as floats
        return torch.from_numpy(cache).view(torch.bfloat16).float().numpy().reshape(16, 2, 2, STRIDE, heads, 16)

    assert one.read_cache().dtype == np.int32 and one.read_cache().shape == (16, 1024)
    full = values(one.read_cache(), 4)
    for r in range(2):
        assert two.read_cache(r).shape == (16, 512)
        # (a value on a rounding boundary may land one bfloat16 step apart)
        slab, want = values(two.read_cache(r), 2)[1:], full[1:, :, :, :, 2 * r : 2 * r + 2]
        assert np.allclose(slab, want, rtol=2**-7, atol=1e-6)


def test_server_on_n_devices_gives_the_same_tokens(programs):
    def serve(tp, ids):
        abi = ModelABI.load(programs[tp] / "config.json")
        return ServerThread(
            tiny_config(programs[tp], parameters=[programs[tp] / f for f in abi.parameter_files], device_ids=ids)
        )

    body = {
        "text": ["Hello there", "The quick brown fox jumps"],
        "sampling_params": {"max_completion_tokens": 12, "ignore_eos": True},
        "return_input_ids": True,
    }
    outs = {}
    for tp, ids in ((1, [0]), (2, [0, 1]), (4, [0, 1, 2, 3]), (2, [0, 1, 2, 3])):  # the last: 2 replicas of TP=2
        s = serve(tp, ids)
        try:
            r = httpx.post(f"{s.url}/generate", json=body, timeout=120)
            assert r.status_code == 200, r.text
            outs[(tp, len(ids))] = [x["responses"][0]["token_ids"] for x in r.json()["responses"]]
            assert len(s.engine.schedulers) == len(ids) // tp
        finally:
            s.stop()
    assert len({str(v) for v in outs.values()}) == 1, outs


def test_wrong_device_count_is_a_clear_error(programs):
    from serve.core.engine import Engine

    abi = ModelABI.load(programs[4] / "config.json")
    cfg = tiny_config(programs[4], parameters=[programs[4] / f for f in abi.parameter_files], device_ids=[0, 1])
    with pytest.raises(ValueError, match="groups of 4"):
        Engine(cfg)
    with pytest.raises(ValueError, match="needs the parameter files"):
        Engine(tiny_config(programs[4], device_ids=[0, 1, 2, 3]))


def test_sharded_mlir_compiles_for_hip_0_to_7(tmp_path):
    v = Variant("mha8", heads=8, kv_heads=8, intermediate=64)
    out = export_tp("--gguf-file", write_gguf(hf_model(v), tmp_path / "mha8.gguf"), tmp_path / "tp8", 8)
    vmfb = compile_mlir(CompileRequest(out / "model.mlir", target="hip", arch="gfx942", devices=8), tmp_path / "h.vmfb")
    assert vmfb.stat().st_size > 0


@pytest.mark.slow
def test_smollm2_tp3_equals_tp1(
    smollm2_path, smollm2_f32_artifacts, smollm2_tp3_artifacts, smollm2_reference, tmp_path
):
    ids, ref, _ = smollm2_reference
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "sharding",
            "--gguf-file",
            str(smollm2_path),
            "--tensor-parallelism-size",
            "2",
            "--output-irpa",
            str(tmp_path / "m.irpa"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "attention heads 9" in r.stderr  # 9 heads, 3 KV heads: N=2 cannot work
    art, one = smollm2_tp3_artifacts, smollm2_f32_artifacts
    body = {
        "input_ids": ids,
        "sampling_params": {"max_completion_tokens": 32, "ignore_eos": True},
        "return_input_ids": True,
    }
    tokens = {}
    for name, a, devices in (("tp1", one, [0]), ("tp3", art, [0, 1, 2])):
        s = ServerThread(tiny_config(a.dir, vmfb=a.vmfb, parameters=a.parameters, device_ids=devices))
        try:
            tokens[name] = httpx.post(f"{s.url}/generate", json=body, timeout=300).json()["responses"][0]["responses"][
                0
            ]["token_ids"]
            if name == "tp3":  # logits within f32 round-off of the unsharded program's
                runner = s.engine.schedulers[0].runner
                pages = np.array([list(range(1, 4))])
                toks = np.array([padded(ids, 16)])
                got = runner.prefill(toks, np.zeros(1), np.array([len(ids)]), pages)
                abi = ModelABI.load(one.config)
                want = Runner(one.vmfb, one.parameters, abi, 8, device_ids=[5]).prefill(
                    toks, np.zeros(1), np.array([len(ids)]), pages
                )
                assert np.abs(got - want).max() <= 1e-3 * max(1.0, np.abs(want).max())
        finally:
            s.stop()
    assert tokens["tp1"] == tokens["tp3"] == ref
