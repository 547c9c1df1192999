"""bench/soak.py (`python -m bench.soak`) against the tiny model's server with a small KV pool: every answer
checked, the pool drained at the end, preemptions on the way."""

import asyncio
import dataclasses
import json
import os
import random
import re

import pytest

from bench import soak
from bench.prompts import Prompt
from tests.server_util import ServerThread, tiny_config

# 19 usable pages of 8 positions: 152 tokens for every sequence at once. One request (at most 48 prompt
# tokens, ~50 more of the chat template's with the tiny model's char tokenizer, plus 40 new ones) fits
# alone; six clients' requests do not: preemptions.
KV_PAGES = 20
# Bounds: no byte for 20 s or a request over 60 s is an error, never a hang (pytest's timeout is the last resort).
SOAK = soak.SoakConfig(
    url=None,
    seconds=20,
    concurrency=6,
    disconnect_rate=0.2,
    prompts=16,
    min_input_len=4,
    max_input_len=48,
    max_output_len=40,
    stall_timeout=20.0,
    request_timeout=60.0,
    settle_timeout=15.0,
)
# the same load on the command line
LOAD_FLAGS = [
    f"--{name.replace('_', '-')}={getattr(SOAK, name)}"
    for name in ("prompts", "min_input_len", "max_input_len", "max_output_len", "stall_timeout", "request_timeout")
]


@pytest.fixture(scope="module")
def small_pool_server(tiny_program):
    s = ServerThread(tiny_config(tiny_program, kv_pages=KV_PAGES, max_queue=64))
    yield s
    s.stop()


@pytest.mark.timeout(240)
def test_soak_small_pool(small_pool_server):
    """~20 s of mixed requests (three routes, streamed or not, greedy or sampled, 20% left mid-answer)."""
    server = small_pool_server
    cfg = dataclasses.replace(SOAK, url=server.url)
    # (the server runs in this process: its memory is this process's)
    r = asyncio.run(soak.run(cfg, server.url, server_pid=os.getpid(), progress=False))
    assert r.errors == 0, r.error_samples
    assert r.sent == r.completed + r.disconnected + r.errors
    assert r.completed > 0 and r.disconnected > 0 and r.output_tokens > 0
    assert all(n > 0 for n in r.sent_by_route.values()) and 0 < r.streamed < r.sent
    assert r.preemptions is not None and r.preemptions > 0  # the pool ran dry
    assert r.kv_pages_total == KV_PAGES - 1 and r.kv_pages_peak is not None and 0 < r.kv_pages_peak <= KV_PAGES - 1
    assert r.kv_pages_used_end == 0 and r.requests_left_end == 0
    assert r.rss_start_bytes and r.rss_end_bytes and r.passed
    assert [s.used for s in server.engine.pool_stats()] == [0]


def test_cli_table_and_json(small_pool_server, tmp_path, capsys):
    out = tmp_path / "soak.json"
    argv = ["--url", small_pool_server.url, "--seconds", "3", "--concurrency", "2", "--quiet", "--json", str(out)]
    assert soak.main([*argv, *LOAD_FLAGS]) == 0
    table = capsys.readouterr().out
    assert "| Intended disconnects" in table and re.search(r"\| KV pages used at the end +\| +0 \|", table)
    d = json.loads(out.read_text())
    assert d["errors"] == 0 and d["kv_pages_used_end"] == 0 and d["config"]["seconds"] == 3
    assert d["sent"] == d["completed"] + d["disconnected"] and d["rss_start_bytes"] is None  # no pid, no metric


def test_errors_fail_the_run(tiny_program, tmp_path, capsys):
    """A server that refuses more than 4 tokens per request: the 400s are errors, and the exit status is 1."""
    s = ServerThread(tiny_config(tiny_program, kv_pages=KV_PAGES, max_tokens_per_request=4))
    try:
        argv = ["--url", s.url, "--seconds", "2", "--concurrency", "2", "--disconnect-rate", "0", "--quiet"]
        rc = soak.main([*argv, *LOAD_FLAGS, "--json", str(tmp_path / "r.json")])
    finally:
        s.stop()
    d = json.loads((tmp_path / "r.json").read_text())
    assert rc == 1 and d["errors"] > 0 and set(d["errors_by_kind"]) == {"HTTP 400"}
    assert d["kv_pages_used_end"] == 0 and "above this server's limit of 4" in d["error_samples"][0]
    assert "Error samples:" in capsys.readouterr().out


def test_same_seed_same_requests():
    cfg = soak.SoakConfig(url=None, seconds=1, concurrency=1, disconnect_rate=0.5, seed=7)
    bank = [Prompt(f"prompt {i}", None) for i in range(8)]

    def plans(seed: str) -> list[soak.RequestPlan]:
        rng = random.Random(seed)
        return [soak.draw(rng, cfg, bank) for _ in range(50)]

    a, b = plans("7-client-0"), plans("7-client-0")
    assert a == b and a != plans("7-client-1")
    assert {p.route for p in a} == set(soak.ROUTES) and {p.stream for p in a} == {True, False}
    assert any(p.disconnect for p in a) and not all(p.disconnect for p in a)
    assert all(1 <= p.max_tokens <= cfg.max_output_len for p in a)


def test_answer_checks():
    plan = soak.RequestPlan("/v1/completions", "x", 4, True, 0.0, 1, False, False, 1, 0.1)
    check = soak.StreamCheck(plan)
    check.event(json.dumps({"choices": [{"text": "a", "finish_reason": None}]}))
    check.event(json.dumps({"choices": [{"text": "", "finish_reason": "length"}]}))
    check.event(json.dumps({"choices": [], "usage": {"completion_tokens": 4}}))
    check.event("[DONE]")
    assert check.end() == 4
    with pytest.raises(soak.Malformed, match="without \\[DONE\\]"):
        soak.StreamCheck(plan).end()
    with pytest.raises(soak.Malformed, match="5 completion tokens"):
        soak.StreamCheck(plan).event(json.dumps({"choices": [], "usage": {"completion_tokens": 5}}))
    with pytest.raises(soak.StreamError, match="boom"):
        soak.StreamCheck(plan).event(json.dumps({"error": {"message": "boom"}}))
    whole = soak.RequestPlan("/generate", "x", 4, False, 0.0, 1, False, False, 1, 0.1)
    answer = {"responses": [{"prompt": "x", "responses": [{"text": "ab", "finish_reason": "stop", "token_ids": [1]}]}]}
    assert soak.check_answer(whole, answer) == 1
    answer["responses"][0]["responses"][0]["finish_reason"] = "cancelled"
    with pytest.raises(soak.Malformed, match="cancelled"):
        soak.check_answer(whole, answer)
