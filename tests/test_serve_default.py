"""`python -m serve` with no model arguments serves SmolLM2 (exported and compiled on first use)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import SMOL_PROMPT
from tests.server_util import free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def default_server(smollm2_f32_artifacts):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "serve", "--port", str(port), "--log-level", "warning"],
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    saw_503 = False
    while True:
        assert proc.poll() is None, "the server exited"
        try:
            r = httpx.get(f"{url}/health", timeout=5)
            if r.status_code == 200:
                break
            saw_503 |= r.status_code == 503
        except httpx.TransportError:
            pass
        assert time.time() < deadline, "the server did not become healthy"
        time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.mark.slow
def test_default_server_is_torch_free_and_greedy_equals_hf(default_server, smollm2_reference):
    ids, ref, tok = smollm2_reference
    r = httpx.post(
        f"{default_server}/generate",
        timeout=120,
        json={
            "text": SMOL_PROMPT,
            "return_input_ids": True,
            "sampling_params": {"max_completion_tokens": 32, "temperature": 0, "ignore_eos": True},
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()["responses"][0]
    assert body["input_ids"] == ids
    out = body["responses"][0]
    assert out["token_ids"] == ref
    assert "Paris" in out["text"]
    chunks = []
    with httpx.stream(
        "POST",
        f"{default_server}/generate",
        timeout=120,
        json={
            "text": SMOL_PROMPT,
            "stream": True,
            "sampling_params": {"max_completion_tokens": 32, "ignore_eos": True},
        },
    ) as s:
        for line in s.iter_lines():
            if line.startswith("data: {"):
                chunks.append(json.loads(line[6:])["text"])
    assert "".join(chunks) == out["text"]


@pytest.mark.slow
def test_server_process_does_not_import_torch(smollm2_f32_artifacts):
    code = "import sys, serve.__main__, serve.engine, serve.api; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
