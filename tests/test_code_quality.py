"""The repository's static checks, run with the suite: layer contracts and no import cycles (import-linter,
contracts in pyproject.toml), lint and format (ruff), and types on the torch-free serving path (mypy)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.mark.parametrize(
    "cmd",
    [["lint-imports"], ["ruff", "check", "."], ["ruff", "format", "--check", "."], ["mypy"]],
    ids=["import-linter", "ruff-check", "ruff-format", "mypy"],
)
def test_static_check_passes(cmd):
    out = subprocess.run([str(BIN / cmd[0]), *cmd[1:]], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
