"""`python -m serve --gguf-file M.gguf`: one command builds (export + compile, through the cache) and serves
any model, with /health saying how far the build is; a restart reuses the build."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from models.abi import ModelABI
from models.gguf_tokenizer import save_tokenizer
from tests.server_util import free_port
from tests.tiny import VARIANTS, char_tokenizer, hf_model, write_gguf

ROOT = Path(__file__).resolve().parents[1]
PROJ = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]


def _serve(
    gguf: Path,
    tokenizer: Path,
    cache: Path,
    timeout: float = 600,
    cli: list[str] | None = None,
    log: Path | None = None,
) -> tuple[subprocess.Popen, str, list]:
    """Start the server and poll /health until 200; -> (process, url, every loading answer's JSON). `cli`:
    the model and its flags in another spelling (default: --gguf-file GGUF); `log`: stderr goes there."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "serve", *(cli or ["--gguf-file", str(gguf)]), "--tokenizer", str(tokenizer)]
    env = {**os.environ, "AOTLLM_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    stderr = open(log, "w") if log else None  # noqa: SIM115 - (the child keeps it)
    proc = subprocess.Popen([*cmd, "--port", str(port), "--log-level", "warning"], cwd=ROOT, env=env, stderr=stderr)
    seen, deadline = [], time.time() + timeout
    while True:
        assert proc.poll() is None, "the server exited"
        assert time.time() < deadline, f"not healthy in {timeout} s: {seen[-3:]}"
        try:
            r = httpx.get(f"{url}/health", timeout=5)
        except httpx.TransportError:
            time.sleep(0.1)
            continue
        if r.status_code == 200:
            return proc, url, seen
        assert r.status_code == 503 and r.headers["retry-after"]
        seen.append(r.json())
        time.sleep(0.05)


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def tiny_q8(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    gguf = write_gguf(hf_model(VARIANTS[1]), d / "tiny-q8.gguf", {p: "Q8_0" for p in PROJ})
    save_tokenizer(*char_tokenizer(), d / "tok")
    return gguf, d / "tok", d / "cache"


def test_one_command_builds_reports_and_reuses(tiny_q8):
    gguf, tok, cache = tiny_q8
    proc, url, loading = _serve(gguf, tok, cache)
    try:
        assert all(body["status"] == "loading" for body in loading)
        stages = [body["stage"] for body in loading]
        assert any(s.startswith("exporting") for s in stages) and "compiling for llvm-cpu" in stages
        progress = [b["progress"] for b in loading if b["stage"] == "exporting: writing parameters"]
        assert all(0 <= p <= 1 for p in progress)
        assert not any(str(cache) in s for s in stages)  # (no server paths to clients)
        r = httpx.post(
            f"{url}/v1/completions", json={"prompt": "hello", "max_tokens": 4, "ignore_eos": True}, timeout=60
        )  # (sampled: EOS may come)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "tiny-q8"
        assert r.json()["usage"]["completion_tokens"] == 4
    finally:
        _stop(proc)
    (built,) = [d for d in (cache / "artifacts").iterdir() if d.is_dir()]
    assert ModelABI.load(built / "config.json").quantization == "gguf"  # its Q8_0 matrices kept

    t0 = time.time()
    proc, url, loading = _serve(gguf, tok, cache, timeout=120)
    try:
        assert not any(b["stage"].startswith(("exporting", "compiling")) for b in loading), loading
        assert time.time() - t0 < 60
    finally:
        _stop(proc)


def test_a_llama_server_command_line(tiny_q8, tmp_path):
    """llama-server's flags with their meaning: the command line of a llama-server user's script, with the
    program's name swapped, serves the same way (the build is the cached one of the test above)."""
    gguf, tok, cache = tiny_q8
    flags = ["-m", str(gguf), "-c", "256", "-np", "2", "-n", "5", "--temp", "0", "--seed", "3", "-t", "1"]
    flags += ["--alias", "my-model", "--host", "127.0.0.1", "--jinja", "--embeddings", "--metrics", "-cb"]
    flags += ["--flash-attn", "on", "-ngl", "99", "--api-key", "sk-test-key", "--cors", "http://app.example"]
    proc, url, _ = _serve(gguf, tok, cache, timeout=120, cli=flags, log=tmp_path / "stderr.log")
    auth = {"Authorization": "Bearer sk-test-key"}
    try:
        props = httpx.get(f"{url}/props", headers=auth).json()
        assert props["default_generation_settings"]["n_ctx"] == 256 and props["total_slots"] == 2  # -c, -np
        assert httpx.get(f"{url}/v1/models", headers=auth).json()["data"][0]["id"] == "my-model"  # --alias
        assert httpx.get(f"{url}/v1/models").status_code == 401  # --api-key
        preflight = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST"}
        r = httpx.options(f"{url}/completion", headers=preflight)
        assert r.headers["access-control-allow-origin"] == "http://app.example"  # --cors
        first, again = (
            httpx.post(f"{url}/completion", json={"prompt": "hello", "ignore_eos": True}, headers=auth).json()
            for _ in range(2)
        )
        assert first["tokens_predicted"] == 5 and first["generation_settings"]["temperature"] == 0  # -n, --temp
        assert again["content"] == first["content"] and first["generation_settings"]["seed"] == 3  # --seed
        r = httpx.post(f"{url}/completion", json={"prompt": "x" * 300}, headers=auth)
        assert r.status_code == 400 and r.json()["error"]["n_ctx"] == 256  # -c
        r = httpx.post(
            f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}, headers=auth
        )
        assert r.json()["usage"]["completion_tokens"] == 5  # -n: the default cap of every route
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "ignore_eos": True}

        def text(extra: dict) -> str:
            r = httpx.post(f"{url}/v1/chat/completions", json={**chat, **extra}, headers=auth)
            return r.json()["choices"][0]["message"]["content"]

        assert text({}) == text({"temperature": 0})  # --temp 0 on the OpenAI routes too (OpenAI's default: 1)
        r = httpx.post(f"{url}/v1/responses", json={"input": "hi"}, headers=auth).json()
        assert r["usage"]["output_tokens"] <= 5  # -n on the Responses route (EOS may end it sooner)
        messages = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6}
        answers = [
            httpx.post(f"{url}/v1/messages", json={**messages, **extra}, headers=auth).json()["content"]
            for extra in ({}, {"temperature": 0})
        ]
        assert answers[0] == answers[1]  # --temp on Anthropic's route
        workers = [
            p for p in Path(f"/proc/{proc.pid}/task").iterdir() if (p / "comm").read_text().startswith("iree-worker")
        ]
        assert len(workers) == 1  # -t
    finally:
        _stop(proc)
    log = (tmp_path / "stderr.log").read_text()
    assert "-ngl / --n-gpu-layers" in log  # warned: not honoured as llama.cpp does


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--no-jinja"], "always rendered as Jinja"),
        (["--pooling", "cls"], "only mean and last"),
        (["-nocb"], "continuous batching"),
    ],
)
def test_llama_server_flags_we_cannot_honour_are_errors(flags, words):
    r = subprocess.run([sys.executable, "-m", "serve", *flags], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and words in r.stderr


def test_a_missing_model_file_is_a_flag_error(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "serve", "--gguf-file", str(tmp_path / "nope.gguf")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "no such file" in r.stderr
