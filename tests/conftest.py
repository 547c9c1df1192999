import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.prebuild import SMOLLM2_BUILDS  # noqa: E402
from tests.tiny import VARIANTS, hf_model, save_hf, write_gguf  # noqa: E402

_prebuild: subprocess.Popen | None = None


def _smollm2_build_used(item) -> int:
    """Index in SMOLLM2_BUILDS of the last real-model program the test uses; -1 for none."""
    names = getattr(item, "fixturenames", ())
    return max((i for i, name in enumerate(SMOLLM2_BUILDS) if f"smollm2_{name}_artifacts" in names), default=-1)


def pytest_collection_modifyitems(session, config, items):
    """Tests of the real-model programs last, in the order the background builds them: the fast tests
    run while the programs build."""
    items.sort(key=_smollm2_build_used)


def pytest_collection_finish(session):
    """Start building the SmolLM2 programs the selected tests use (tests/prebuild.py) in the background."""
    global _prebuild
    used = {f for item in session.items for f in getattr(item, "fixturenames", ())}
    needed = [name for name in SMOLLM2_BUILDS if f"smollm2_{name}_artifacts" in used]
    if needed and not session.config.option.collectonly:
        from models.cache import cache_dir
        from models.default_model import smollm2_gguf

        smollm2_gguf()  # (fetched here, once, before two processes want it)
        with open(cache_dir() / "test-prebuild.log", "w") as log:
            _prebuild = subprocess.Popen(
                [sys.executable, "-m", "tests.prebuild", *needed],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )


def pytest_sessionfinish(session):
    if _prebuild is not None and _prebuild.poll() is None:  # (a run stopped early: -x, Ctrl-C)
        os.killpg(_prebuild.pid, signal.SIGTERM)
        _prebuild.wait()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_models(tiny_dir):
    """name -> (HF model, HF folder, GGUF path) for each tiny variant."""
    out = {}
    for v in VARIANTS:
        model = hf_model(v)
        out[v.name] = (model, save_hf(model, tiny_dir / v.name), write_gguf(model, tiny_dir / f"{v.name}.gguf"))
    return out


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from models.default_model import smollm2_gguf

    return smollm2_gguf()


SMOL_PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="session")
def smollm2_reference(smollm2_path):
    """(prompt ids, HF transformers' greedy 32 tokens on the dequantised GGUF, in f32)."""
    import torch
    import transformers

    from models.gguf_tokenizer import tokenizer_from_gguf

    tok, _ = tokenizer_from_gguf(smollm2_path)
    ids = tok.encode(SMOL_PROMPT, add_special_tokens=False).ids
    model = transformers.LlamaForCausalLM.from_pretrained(
        smollm2_path.parent, gguf_file=smollm2_path.name, dtype=torch.float32
    )
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
    return ids, out[0, len(ids) :].tolist(), tok


def _smollm2_build(name):
    @pytest.fixture(scope="session", name=f"smollm2_{name}_artifacts")
    def fixture(smollm2_path):
        from export.artifacts import build

        return build(smollm2_path, SMOLLM2_BUILDS[name])  # (waits for the background build if it is on it)

    return fixture


smollm2_f32_artifacts, smollm2_w8a8_artifacts, smollm2_tp3_artifacts, smollm2_gguf_artifacts = map(
    _smollm2_build, SMOLLM2_BUILDS
)


@pytest.fixture(scope="session")
def served_tiny(tiny_models, tmp_path_factory) -> Path:
    """The tiny llama31 model, exported and compiled once for every server test module."""
    from tests.server_util import export_served_tiny

    return export_served_tiny(tiny_models["llama31"][2], tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="module")
def tiny_program(served_tiny) -> Path:
    return served_tiny


@pytest.fixture(scope="module")
def server(tiny_program):
    """A server over the tiny program for one test module (test_server.py has its own)."""
    from tests.server_util import ServerThread, tiny_config

    s = ServerThread(tiny_config(tiny_program, max_queue=64))
    yield s
    s.stop()
