"""Build the SmolLM2 programs the slow tests use, in a background process while the fast tests run.

Export is single-threaded and the suite's own work mostly is too, so on a 2-core machine the real-model
builds (minutes each) overlap the tiny-model tests instead of following them. `export.artifacts.build`
locks each artifact folder: a test that asks for one still being built waits for it; one that fails here
is simply built again (with its error shown) by the test that needs it.
    python -m tests.prebuild f32 w8a8 tp3
"""

import sys

from export.artifacts import build
from models.default_model import export_args, smollm2_gguf

# name -> export arguments; tests/conftest.py serves each as the session fixture smollm2_{name}_artifacts
SMOLLM2_BUILDS = {
    "f32": export_args(),  # the same artifacts `python -m serve` builds for its default model
    "w8a8": [*export_args("w8a8"), "--bs-prefill", "1", "--bs-decode", "1"],  # the server's, fewer batch sizes
    "tp3": [*export_args(), "--tensor-parallelism-size", "3", "--bs-prefill", "1", "--bs-decode", "1"],
    "gguf": [*export_args("gguf"), "--bs-prefill", "1", "--bs-decode", "1"],  # its Q4_1 kept (models.qlinear)
}

if __name__ == "__main__":
    gguf = smollm2_gguf()
    for name in sys.argv[1:]:
        build(gguf, SMOLLM2_BUILDS[name])
