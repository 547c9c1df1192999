"""`python -m serve` with no model arguments serves SmolLM2 (exported and compiled on first use)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from models.cache import cache_lock
from tests.conftest import SMOL_PROMPT
from tests.server_util import free_port

ROOT = Path(__file__).resolve().parents[1]
# `python -m serve`, which writes the names in its sys.modules to the file named by $MODULES_FILE at exit
SERVE_RECORDING_MODULES = (
    "import atexit, json, os, runpy, sys\n"
    "def record():\n"
    "    with open(os.environ['MODULES_FILE'], 'w') as f:\n"
    "        json.dump(sorted(sys.modules), f)\n"
    "atexit.register(record)\n"
    "runpy.run_module('serve', run_name='__main__', alter_sys=True)\n"
)
# what the serving process must never load (the exporter runs in a subprocess of its own)
NOT_SERVING = ("torch", "iree.turbine", "transformers", "export.paged_llm", "sharding", "models.llama")


def _health(url: str) -> httpx.Response | None:
    try:
        return httpx.get(f"{url}/health", timeout=5)
    except httpx.TransportError:
        return None


@pytest.fixture(scope="module")
def default_server(smollm2_f32_artifacts, tmp_path_factory):
    """The server, started while this process holds the lock of the default program's cache folder, as
    a first start's build would: /health must say 503 (with the reason) until the lock is released."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    modules = tmp_path_factory.mktemp("serve") / "modules.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MODULES_FILE": str(modules)}
    cmd = [sys.executable, "-c", SERVE_RECORDING_MODULES, "--port", str(port), "--log-level", "warning"]
    loading: list[httpx.Response] = []  # every answer while the build cannot finish
    with cache_lock(smollm2_f32_artifacts.dir):
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
        deadline = time.time() + 120
        while not (loading and "exporting" in loading[-1].text):
            assert proc.poll() is None, "the server exited"
            assert time.time() < deadline, f"the server did not say it builds: {[r.text for r in loading]}"
            if (r := _health(url)) is not None:
                loading.append(r)
            time.sleep(0.1)
    deadline = time.time() + 600
    while (r := _health(url)) is None or r.status_code != 200:
        assert proc.poll() is None, "the server exited"
        assert time.time() < deadline, "the server did not become healthy"
        time.sleep(0.2)
    yield url, proc, modules, loading
    proc.terminate()
    proc.wait(timeout=30)


@pytest.mark.slow
def test_health_is_503_while_the_default_model_builds(default_server):
    loading = default_server[3]
    assert all(r.status_code == 503 and r.headers["retry-after"] for r in loading)
    assert loading[-1].json()["error"] == "exporting and compiling the default model (first start only)"


@pytest.mark.slow
def test_default_server_greedy_equals_hf(default_server, smollm2_reference):
    url = default_server[0]
    ids, ref, tok = smollm2_reference
    r = httpx.post(
        f"{url}/generate",
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
        f"{url}/generate",
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
def test_serving_process_never_loaded_torch(default_server):
    url, proc, modules, _ = default_server
    payload = {"text": SMOL_PROMPT, "sampling_params": {"max_completion_tokens": 4}}
    assert httpx.post(f"{url}/generate", json=payload, timeout=120).status_code == 200
    # Ctrl-C: uvicorn shuts down, then re-raises SIGINT as KeyboardInterrupt, and the process's atexit
    # hook writes its module list (a SIGTERM, re-raised, would end the process before atexit)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)
    loaded = json.loads(modules.read_text())
    assert "serve.frontends.app" in loaded and "iree.runtime" in loaded  # (the list is the server's)
    assert [m for m in loaded if m.startswith(NOT_SERVING)] == []
