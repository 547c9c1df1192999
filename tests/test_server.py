"""serve/: /health and /generate over the real HTTP server, on a tiny compiled model."""

import asyncio
import json
import time

import httpx
import pytest

from models.llama import PagedLlama
from models.weights import load_weights
from serve.core.engine import EngineConfig
from tests.eager import greedy
from tests.server_util import ServerThread, overflow_queue, tiny_config
from tests.tiny import char_tokenizer

STRIDE = 8


@pytest.fixture(scope="module")
def tiny_program(served_tiny, tiny_models):
    return served_tiny, tiny_models["llama31"][2]


def _cfg(program, **kw) -> EngineConfig:
    return tiny_config(program[0], **kw)


@pytest.fixture(scope="module")
def server(tiny_program):
    s = ServerThread(_cfg(tiny_program, max_queue=128))
    yield s
    s.stop()


def gen(server, payload, timeout=60):
    return httpx.post(f"{server.url}/generate", json=payload, timeout=timeout)


def test_health(server):
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}


def test_greedy_matches_eager_model(server, tiny_program):
    tok, _ = char_tokenizer()
    prompt = "The quick brown fox"
    ids = tok.encode(prompt).ids
    r = gen(
        server,
        {
            "text": prompt,
            "sampling_params": {"max_completion_tokens": 12, "ignore_eos": True},
            "return_input_ids": True,
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()["responses"][0]
    assert body["prompt"] == prompt and body["input_ids"] == ids
    out = body["responses"][0]
    model = PagedLlama.from_weights(load_weights(gguf_file=tiny_program[1]), STRIDE)
    assert out["token_ids"] == greedy(model, ids, 12)
    assert out["text"] == tok.decode(out["token_ids"]) and out["finish_reason"] == "length"


def test_long_prompt_prefilled_in_chunks_matches_eager_model(tiny_program):
    # 316 prompt tokens alone on the server: chunks of IDLE_PREFILL_CHUNK (256), so 2 prefill steps
    s = ServerThread(_cfg(tiny_program, max_tokens_per_step=STRIDE))
    try:
        ids = char_tokenizer()[0].encode("A longer prompt, prefilled in chunks. " * 8).ids
        assert 256 < len(ids) < 400
        r = gen(
            s,
            {
                "input_ids": ids,
                "return_input_ids": True,
                "sampling_params": {"max_completion_tokens": 8, "ignore_eos": True},
            },
        )
        assert r.status_code == 200, r.text
        model = PagedLlama.from_weights(load_weights(gguf_file=tiny_program[1]), STRIDE)
        assert r.json()["responses"][0]["responses"][0]["token_ids"] == greedy(model, ids, 8)
        assert s.engine.schedulers[0].counters.steps == 2 + 7
    finally:
        s.stop()


def test_stream_concatenates_to_non_stream(server):
    payload = {"text": "Streaming test", "sampling_params": {"max_completion_tokens": 10, "ignore_eos": True}}
    full = gen(server, payload).json()["responses"][0]["responses"][0]["text"]
    chunks = []
    with httpx.stream("POST", f"{server.url}/generate", json={**payload, "stream": True}, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [x for x in r.iter_lines() if x]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        chunks.append(json.loads(line[len("data: ") :]))
    assert "".join(c["text"] for c in chunks) == full
    assert chunks[-1]["meta_info"]["finish_reason"] == "length"


async def _post_all(url, payloads):
    async with httpx.AsyncClient(timeout=120) as client:
        rs = await asyncio.gather(*(client.post(f"{url}/generate", json=p) for p in payloads))
    return [r.json()["responses"][0]["responses"][0] for r in rs]


def test_batching_changes_nothing(server):
    payloads = [
        {
            "text": f"prompt number {i} " + "x" * (i * 3),
            "return_input_ids": True,
            "sampling_params": {"max_completion_tokens": 4 + (i * 5) % 17, "ignore_eos": True},
        }
        for i in range(16)
    ]
    alone = [gen(server, p).json()["responses"][0]["responses"][0] for p in payloads]
    together = asyncio.run(_post_all(server.url, payloads))
    assert together == alone
    assert [len(a["token_ids"]) for a in alone] == [4 + (i * 5) % 17 for i in range(16)]


def test_seeded_sampling_is_batch_independent(server):
    p = {
        "text": "seeded",
        "sampling_params": {"max_completion_tokens": 8, "temperature": 1.0, "seed": 7, "ignore_eos": True},
    }
    alone = gen(server, p).json()["responses"][0]["responses"][0]["text"]
    others = [
        {"text": f"other {i}", "sampling_params": {"max_completion_tokens": 8, "temperature": 1.0}} for i in range(5)
    ]
    together = asyncio.run(_post_all(server.url, [p] + others))
    assert together[0]["text"] == alone


def test_prefix_cache_reuses_pages(server, tiny_program):
    prefix = "A long shared system prompt that spans several pages of the KV cache. " * 2
    eng = server.engine
    before = sum(s.prefix_hit_tokens for s in eng.pool_stats())
    p = {
        "text": prefix + "Question one?",
        "return_input_ids": True,
        "sampling_params": {"max_completion_tokens": 6, "ignore_eos": True},
    }
    first = gen(server, p).json()["responses"][0]["responses"][0]["text"]
    second = gen(server, p).json()["responses"][0]["responses"][0]["text"]
    other = gen(server, {**p, "text": prefix + "Another one?"}).json()["responses"][0]
    after = sum(s.prefix_hit_tokens for s in eng.pool_stats())
    assert second == first and other["responses"][0]["text"]
    assert after - before >= 2 * (len(prefix) // STRIDE - 1) * STRIDE
    # the answers over cached pages are those of an uncached run (the eager model, from an empty cache)
    model = PagedLlama.from_weights(load_weights(gguf_file=tiny_program[1]), STRIDE)
    ids = char_tokenizer()[0].encode(prefix + "Question one?").ids
    assert first == char_tokenizer()[0].decode(greedy(model, ids, 6))
    assert other["responses"][0]["token_ids"] == greedy(model, other["input_ids"], 6)


async def _burst(url, n):
    async def one(i):
        payload = {
            "text": f"burst {i}",
            "stream": True,
            "sampling_params": {"max_completion_tokens": 24, "ignore_eos": True},
        }
        async with httpx.AsyncClient(timeout=120) as client:
            async with client.stream("POST", f"{url}/generate", json=payload) as r:
                got = 0
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        got += 1
                        if i % 4 == 0 and got == 2:
                            return "disconnected"
                return "done"

    return await asyncio.gather(*(one(i) for i in range(n)))


def _wait_pool_idle(engine, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if all(s.used == 0 for s in engine.pool_stats()) and all(s.load == 0 for s in engine.schedulers):
            return True
        time.sleep(0.1)
    return False


def test_burst_with_disconnects_returns_every_page(server):
    results = asyncio.run(_burst(server.url, 64))
    assert results.count("disconnected") == 16 and results.count("done") == 48
    assert _wait_pool_idle(server.engine)
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_small_pool_completes_everything(tiny_program):
    s = ServerThread(_cfg(tiny_program, kv_pages=12, max_queue=64))
    try:
        payloads = [
            {
                "text": f"pool pressure {i} " * 2,
                "return_input_ids": True,
                "sampling_params": {"max_completion_tokens": 30, "ignore_eos": True},
            }
            for i in range(12)
        ]
        alone = gen(s, payloads[0]).json()["responses"][0]["responses"][0]
        results = asyncio.run(_post_all(s.url, payloads))
        assert all(r["finish_reason"] == "length" and len(r["token_ids"]) == 30 for r in results)
        assert results[0] == alone  # preemption and recompute change nothing
        assert sum(sc.counters.preemptions for sc in s.engine.schedulers) > 0
        assert _wait_pool_idle(s.engine)
    finally:
        s.stop()


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_kv_pressure_answers_every_request(tiny_program, prefix_caching):
    """Issue 28, hang 1: 8 requests of 100 characters and 400 tokens against a pool that holds about two of
    them. With prefix caching on, 1 of 8 used to be answered and the scheduler preempted forever."""
    s = ServerThread(_cfg(tiny_program, kv_pages=126, prefix_caching=prefix_caching))
    try:
        payloads = [
            {
                "text": f"{i:03d} " + "abcdefghij" * 9 + "xyzxyz",
                "return_input_ids": True,
                "sampling_params": {"max_completion_tokens": 400, "ignore_eos": True},
            }
            for i in range(8)
        ]
        results = asyncio.run(_post_all(s.url, payloads))
        assert [(r["finish_reason"], len(r["token_ids"])) for r in results] == [("length", 400)] * 8
        assert sum(sc.counters.preemptions for sc in s.engine.schedulers) > 0
        assert _wait_pool_idle(s.engine)
    finally:
        s.stop()


def test_generation_longer_than_the_pool_ends_with_length(tiny_program):
    """Issue 28, hang 2: 15 usable pages of 8 tokens and 200 tokens asked: 116 came, then nothing, forever.
    Now the sequence ends with "length" when its pages fill the pool, and the pages come back."""
    s = ServerThread(_cfg(tiny_program, kv_pages=16))
    try:
        r = gen(
            s,
            {
                "text": "hello",
                "return_input_ids": True,
                "sampling_params": {"max_completion_tokens": 200, "ignore_eos": True},
            },
        )
        prompt = r.json()["responses"][0]
        out = prompt["responses"][0]
        assert out["finish_reason"] == "length"
        assert len(prompt["input_ids"]) + len(out["token_ids"]) == 15 * STRIDE + 1  # the pool full + the last token
        assert _wait_pool_idle(s.engine)
    finally:
        s.stop()


@pytest.mark.parametrize(
    "body,needle",
    [
        ("{not json", "malformed JSON"),
        ({"text": 5}, "text"),
        ({"text": "hi", "sampling_params": {"max_completion_tokens": -3}}, "max_completion_tokens"),
        ({"text": "hi", "sampling_params": {"max_completion_tokens": 10**9}}, "max_completion_tokens"),
        ({"text": "hi", "sampling_params": {"temperature": -1}}, "temperature"),
        ({"text": "hi", "sampling_params": {"top_p": 0}}, "top_p"),
        ({"text": "hi", "input_ids": [3, 4]}, "exactly one"),
        ({"input_ids": [3, 4000]}, "outside the vocabulary"),
        ({"text": ""}, "empty"),
        ({"text": "x" * 600}, "context"),
        ({"text": "hi", "sampling_params": {"bogus": 1}}, "bogus"),
    ],
)
def test_bad_input_is_a_400_with_a_hint(server, body, needle):
    if isinstance(body, str):
        r = httpx.post(f"{server.url}/generate", content=body, headers={"content-type": "application/json"})
    else:
        r = gen(server, body)
    assert r.status_code == 400, r.text
    err = r.json()
    assert err["code"] == 400 and needle in err["error"]
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_queue_full_is_503_with_retry_after(tiny_program):
    s = ServerThread(_cfg(tiny_program, max_queue=2))
    try:
        payload = {"text": "queue", "sampling_params": {"max_completion_tokens": 40, "ignore_eos": True}}
        rs = overflow_queue(s, lambda client: client.post(f"{s.url}/generate", json=payload), 2)
        assert [r.status_code for r in rs] == [200, 200, 503]
        codes = sorted(r.status_code for r in rs)
        assert 200 in codes and 503 in codes
        busy = next(r for r in rs if r.status_code == 503)
        assert busy.headers["retry-after"] and busy.json()["code"] == 503
        # more sequences than the queue holds can never be served: not a retry, a 400 even when idle
        too_many = gen(s, {"text": ["a", "b"], "sampling_params": {"max_completion_tokens": 2, "n": 2}})
        assert too_many.status_code == 400 and "--max-queue" in too_many.json()["error"]
        assert _wait_pool_idle(s.engine)
    finally:
        s.stop()


def test_two_devices_share_the_load(tiny_program, server):
    payloads = [
        {
            "text": f"device spread {i}",
            "return_input_ids": True,
            "sampling_params": {"max_completion_tokens": 6, "ignore_eos": True},
        }
        for i in range(8)
    ]
    alone = [gen(server, p).json()["responses"][0]["responses"][0] for p in payloads]
    s = ServerThread(_cfg(tiny_program, device_ids=[0, 1]))
    try:
        assert asyncio.run(_post_all(s.url, payloads)) == alone
        assert all(sc.counters.generated_tokens > 0 for sc in s.engine.schedulers)
    finally:
        s.stop()


def test_n_and_stop_strings(server):
    r = gen(
        server,
        {"text": "n copies", "sampling_params": {"max_completion_tokens": 8, "n": 2, "temperature": 1.0, "seed": 3}},
    )
    assert r.status_code == 200, r.text
    outs = r.json()["responses"][0]["responses"]
    assert len(outs) == 2 and all(o["text"] for o in outs)
    for prompt in ("stop here", "The quick brown fox", "prompt number 3", "abc", "Hello"):
        params = {"max_completion_tokens": 16, "ignore_eos": True}
        text = gen(server, {"text": prompt, "sampling_params": params}).json()["responses"][0]["responses"][0]["text"]
        if len(text) >= 4:  # (the tiny random model often emits special tokens, which have no text)
            break
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    r = gen(server, {"text": prompt, "sampling_params": {**params, "stop": [stop]}}).json()
    out = r["responses"][0]["responses"][0]
    assert out["text"] == text[: text.index(stop)] and out["finish_reason"] == "stop"


def test_max_tokens_per_request(tiny_program):
    s = ServerThread(_cfg(tiny_program, max_tokens_per_request=8))
    try:
        r = gen(s, {"text": "cap", "sampling_params": {"max_completion_tokens": 9}})
        assert r.status_code == 400 and "limit of 8" in r.json()["error"]
        # defaults stay within the cap (/generate's 50, a chat's rest of the context), not refused
        r = gen(s, {"text": "cap", "sampling_params": {"ignore_eos": True}, "return_input_ids": True})
        assert r.status_code == 200 and len(r.json()["responses"][0]["responses"][0]["token_ids"]) == 8
        chat = {"messages": [{"role": "user", "content": "hi"}], "ignore_eos": True}
        r = httpx.post(f"{s.url}/v1/chat/completions", json=chat, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
    finally:
        s.stop()
