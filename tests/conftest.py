import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.tiny import VARIANTS, hf_model, save_hf, write_gguf  # noqa: E402


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
