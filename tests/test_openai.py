"""serve/openai_api.py + serve/metrics.py over the real HTTP server, with the real `openai` client."""

import json
import logging
import time
from types import SimpleNamespace

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serve.core.engine import EngineConfig
from serve.core.scheduler import Counters, Event
from serve.frontends.chat_template import BUILTIN_TEMPLATES, encode_prompt, render_chat
from serve.frontends.metrics import Metrics
from serve.frontends.openai_protocol import ChatMessage
from tests.server_util import TINY_MODEL_NAME, ServerThread, loading_client, overflow_queue, tiny_config
from tests.tiny import char_tokenizer

MODEL = TINY_MODEL_NAME
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


def _cfg(out, **kw) -> EngineConfig:
    return tiny_config(out, model_name=MODEL, **kw)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)


def chat_prompt_ids(messages=CHAT):
    tok, info = char_tokenizer()
    return encode_prompt(tok, info, render_chat(BUILTIN_TEMPLATES["chatml"], messages, True, "<s>", "</s>"))


def generate_greedy(server, input_ids, n_tokens):
    r = httpx.post(
        f"{server.url}/generate",
        timeout=120,
        json={"input_ids": input_ids, "sampling_params": {"max_completion_tokens": n_tokens, "ignore_eos": True}},
    )
    return r.json()["responses"][0]["responses"][0]["text"]


def sse(server, path, payload):
    with httpx.stream("POST", f"{server.url}{path}", json=payload, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def metrics(server):
    text = httpx.get(f"{server.url}/metrics").text
    return {
        s.name + json.dumps(s.labels, sort_keys=True): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def test_models(client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_completion_greedy_equals_generate_and_usage_is_exact(server, client):
    prompt = "The quick brown fox"
    r = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    ids = char_tokenizer()[0].encode(prompt).ids
    assert r.id.startswith("cmpl-") and r.object == "text_completion" and r.model == MODEL
    assert r.choices[0].text == generate_greedy(server, ids, 12) and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 12, len(ids) + 12)


def test_chat_renders_chatml_and_usage_is_exact(server, client):
    r = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_completion_tokens=10, temperature=0, extra_body={"ignore_eos": True}
    )
    ids = chat_prompt_ids()
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"
    msg = r.choices[0].message
    assert msg.role == "assistant" and msg.content == generate_greedy(server, ids, 10)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 10)


def test_n_and_seed_reproducible(client):
    kw = dict(
        model=MODEL, messages=CHAT, max_tokens=8, temperature=1.0, seed=1234, n=2, extra_body={"ignore_eos": True}
    )
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.usage.completion_tokens == 16 and a.usage.prompt_tokens == len(chat_prompt_ids())
    c = client.completions.create(
        model=MODEL, prompt=["one", "two"], max_tokens=5, n=2, seed=3, extra_body={"ignore_eos": True}
    )
    assert [ch.index for ch in c.choices] == [0, 1, 2, 3]
    assert c.usage.prompt_tokens == 6 and c.usage.completion_tokens == 20


def test_stop_strings(client):
    kw = dict(model=MODEL, prompt="The quick brown fox", temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(max_tokens=20, **kw).choices[0].text
    assert len(full) >= 6
    stop = full[3:5]
    cut = client.completions.create(max_tokens=20, stop=[stop, "\x7f"], **kw).choices[0]
    assert cut.text == full[: full.index(stop)] and cut.finish_reason == "stop"
    assert client.completions.create(max_tokens=20, stop=stop, **kw).choices[0].text == cut.text


def test_logit_bias_forces_a_token(client):
    z = char_tokenizer()[0].token_to_id("z")
    r = client.completions.create(
        model=MODEL,
        prompt="abc",
        max_tokens=6,
        temperature=0,
        logit_bias={str(z): 100},
        extra_body={"ignore_eos": True},
    )
    assert r.choices[0].text == "zzzzzz"


def test_completion_logprobs_concatenate_to_text(client):
    r = client.completions.create(
        model=MODEL,
        prompt="Logprobs",
        max_tokens=10,
        temperature=0.8,
        seed=5,
        logprobs=3,
        stop=["e"],
        extra_body={"ignore_eos": True},
    )
    ch = r.choices[0]
    lp = ch.logprobs
    assert "".join(lp.tokens) == ch.text and len(lp.token_logprobs) == len(lp.tokens) == len(lp.top_logprobs)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert all(x <= 0 for x in lp.token_logprobs)
    for tok, top in zip(lp.tokens, lp.top_logprobs):
        assert tok in top and len(top) <= 4


def test_chat_logprobs(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        max_tokens=8,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == r.choices[0].message.content and len(content) == 8
    for t in content:
        assert t.bytes == list(t.token.encode()) and len(t.top_logprobs) == 2
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob and t.logprob == t.top_logprobs[0].logprob


def test_chat_stream_structure(server, client):
    payload = {
        "model": MODEL,
        "messages": CHAT,
        "max_tokens": 6,
        "n": 2,
        "seed": 9,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
        "unknown_field": [1],
    }
    chunks = sse(server, "/v1/chat/completions", payload)
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == MODEL and c["created"] for c in chunks)
    *body, last = chunks
    prompt_tokens = len(chat_prompt_ids())
    usage = last["usage"]
    assert last["choices"] == [] and usage.pop("prompt_tokens_details")["cached_tokens"] >= 0
    assert usage == {"prompt_tokens": prompt_tokens, "completion_tokens": 12, "total_tokens": prompt_tokens + 12}
    assert all(c["usage"] is None and len(c["choices"]) == 1 for c in body)
    texts = []
    for i in (0, 1):
        mine = [c["choices"][0] for c in body if c["choices"][0]["index"] == i]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert [m["finish_reason"] for m in mine] == [None] * (len(mine) - 1) + ["length"]
        texts.append("".join(m["delta"].get("content", "") for m in mine))
    whole = client.chat.completions.create(
        **{k: v for k, v in payload.items() if k not in ("stream", "stream_options", "ignore_eos", "unknown_field")},
        extra_body={"ignore_eos": True},
    )
    assert texts == [c.message.content for c in whole.choices]


def test_completion_stream_with_the_client(client):
    kw = dict(model=MODEL, prompt="Stream me", max_tokens=9, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 9 and len({c.id for c in chunks}) == 1


def test_chat_stream_with_the_client_and_logprobs(client):
    kw = dict(model=MODEL, messages=CHAT, max_tokens=7, temperature=0, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, logprobs=True, top_logprobs=1, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full
    assert "".join(t.token for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.content) == full


def test_completion_echo(client):
    kw = dict(model=MODEL, prompt="Echo", max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    plain = client.completions.create(**kw).choices[0].text
    assert client.completions.create(echo=True, **kw).choices[0].text == "Echo" + plain
    chunks = list(client.completions.create(echo=True, stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == "Echo" + plain


def test_any_model_name_is_the_served_model(server, client):
    """One model is served: a request naming another (clients send fixed names) gets it, as llama-server
    does; only GET /v1/models/{name} says which names exist."""
    r = client.chat.completions.create(model="gpt-4o", messages=CHAT, max_tokens=2)
    assert r.model == MODEL
    assert client.completions.create(model="nope", prompt="x", max_tokens=2).model == MODEL
    assert client.embeddings.create(model="text-embedding-3-small", input="x").model == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


@pytest.mark.parametrize(
    "kw,param",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"logprobs": 6}, "logprobs"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"99999": 1}}, "logit_bias"),
        ({"stop": [""]}, "stop"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x" * 600}, "prompt"),
        ({"prompt": [5, 99999]}, "prompt"),
        ({"n": "many"}, "n"),
    ],
)
def test_bad_completion_params_are_400(server, client, kw, param):
    body = {"model": MODEL, "prompt": "hi", **kw}
    with pytest.raises(openai.BadRequestError):
        client.completions.create(**body)
    r = httpx.post(f"{server.url}/v1/completions", json=body)
    err = r.json()["error"]
    overflow = kw.get("prompt") == "x" * 600  # (llama.cpp's error type, with the counts)
    assert r.status_code == 400 and err["message"]
    assert err["type"] == ("exceed_context_size_error" if overflow else "invalid_request_error")
    assert err["param"] is not None and err["param"].startswith(param)
    if overflow:
        assert err["n_prompt_tokens"] >= 512 and err["n_ctx"] == 512


@pytest.mark.parametrize(
    "kw",
    [
        {"messages": []},
        {"messages": [{"content": "no role"}]},
        {"top_logprobs": 21, "logprobs": True},
        {"top_logprobs": 2},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objec"}}}},
    ],
)
def test_bad_chat_params_are_400(client, kw):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(**{"model": MODEL, "messages": CHAT, **kw})


def test_text_content_parts_are_joined(client):
    parts = [{"type": "text", "text": "Be"}, {"type": "text", "text": "brief."}]
    assert ChatMessage(role="user", content=parts).for_template()["content"] == "Be\nbrief."
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": parts}], max_tokens=2)
    assert r.usage.prompt_tokens == len(chat_prompt_ids([{"role": "user", "content": "Be\nbrief."}]))


def test_malformed_json_is_400(server):
    r = httpx.post(f"{server.url}/v1/chat/completions", content="{nope", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def eager_embedding(tiny_models, ids, pooling):
    import numpy as np
    import torch

    from models.llama import PagedLlama
    from models.weights import load_weights
    from tests.eager import one_pass

    model = PagedLlama.from_weights(load_weights(gguf_file=tiny_models["llama31"][2]), 8)
    with torch.no_grad():
        h = model.hidden_states(*one_pass(model, ids))[0, : len(ids)].double()
    v = (h.mean(0) if pooling == "mean" else h[-1]).numpy()
    return v / np.linalg.norm(v)


def test_embeddings_match_eager_and_are_deterministic(server, client, tiny_models):
    import numpy as np

    texts = ["hello world", "a different text", "hello world"]
    r = client.embeddings.create(model=MODEL, input=texts)  # the client asks for base64
    vecs = [np.array(d.embedding) for d in r.data]
    assert [d.index for d in r.data] == [0, 1, 2] and r.model == MODEL
    ids = [char_tokenizer()[0].encode(t).ids for t in texts]
    assert r.usage.prompt_tokens == r.usage.total_tokens == sum(len(x) for x in ids)
    assert np.array_equal(vecs[0], vecs[2]) and not np.allclose(vecs[0], vecs[1])
    for v, x in zip(vecs, ids):
        assert abs(np.linalg.norm(v) - 1) < 1e-5
        assert np.abs(v - eager_embedding(tiny_models, x, "mean")).max() <= 1e-4
    plain = httpx.post(f"{server.url}/v1/embeddings", json={"input": ids[1], "encoding_format": "float"}).json()
    assert np.abs(np.array(plain["data"][0]["embedding"]) - vecs[1]).max() <= 1e-6


def test_embeddings_last_pooling_over_chunked_prefill(tiny_program, tiny_models):
    import numpy as np

    s = ServerThread(_cfg(tiny_program, pooling="last", max_tokens_per_step=8))
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=120)
        text = "a prompt of more than three pages of eight tokens"
        got = np.array(c.embeddings.create(model=MODEL, input=text, encoding_format="float").data[0].embedding)
        want = eager_embedding(tiny_models, char_tokenizer()[0].encode(text).ids, "last")
        assert np.abs(got - want).max() <= 1e-4
        assert s.engine.pool_stats()[0].used == 0
    finally:
        s.stop()


@pytest.mark.parametrize(
    "body,param",
    [
        ({"input": []}, "input"),
        ({"input": "x", "dimensions": 3}, "dimensions"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"input": [[999999]]}, "input"),
    ],
)
def test_bad_embedding_requests_are_400(server, body, param):
    r = httpx.post(f"{server.url}/v1/embeddings", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_tokenize_round_trip(server):
    tok = char_tokenizer()[0]
    text = "Hello, world!"
    r = httpx.post(f"{server.url}/tokenize", json={"content": text}).json()
    assert r["tokens"] == tok.encode(text, add_special_tokens=False).ids
    assert (
        httpx.post(f"{server.url}/tokenize", json={"text": text, "add_special": True}).json()["tokens"]
        == tok.encode(text).ids
    )
    pieces = httpx.post(f"{server.url}/tokenize", json={"content": "ab", "with_pieces": True}).json()["tokens"]
    assert pieces == [{"id": tok.token_to_id("a"), "piece": "a"}, {"id": tok.token_to_id("b"), "piece": "b"}]
    assert httpx.post(f"{server.url}/detokenize", json={"tokens": r["tokens"]}).json()["content"] == text
    bad = httpx.post(f"{server.url}/detokenize", json={"tokens": [99999]})
    assert bad.status_code == 400 and "vocabulary" in bad.json()["error"]["message"]


def test_metrics_move_with_traffic(server, client):
    before = metrics(server)
    client.completions.create(model=MODEL, prompt="metrics", max_tokens=5, extra_body={"ignore_eos": True})
    after = metrics(server)
    dev = json.dumps({"device": "0"})

    def delta(name):
        return after.get(name, 0) - before.get(name, 0)

    assert delta("aotllm_generation_tokens_total" + dev) == 5
    assert delta("aotllm_prompt_tokens_total" + dev) == len("metrics")
    assert delta('aotllm_requests_finished_total{"finish_reason": "length"}') == 1
    assert delta("aotllm_time_to_first_token_seconds_count{}") == 1
    assert delta("aotllm_inter_token_latency_seconds_count{}") == 4
    assert delta("aotllm_e2e_request_latency_seconds_count{}") == 1
    assert 0 < delta("aotllm_device_seconds_total" + dev) < delta("aotllm_step_seconds_total" + dev)
    assert after["aotllm_kv_pages_total" + dev] == 127
    assert _wait_idle(server.engine) and metrics(server)["aotllm_requests_running" + dev] == 0
    for name in (
        "aotllm_kv_pages_used",
        "aotllm_kv_pages_cached",
        "aotllm_requests_waiting",
        "aotllm_prefix_cache_hit_tokens_total",
    ):
        assert name + dev in after


def _wait_idle(engine, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if all(s.pool.stats().used == 0 and s.load == 0 for s in engine.schedulers):
            return True
        time.sleep(0.1)
    return False


def test_client_disconnects_cancel_and_free_pages(server):
    before = metrics(server)
    payload = {"model": MODEL, "messages": CHAT, "max_tokens": 400, "n": 2, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=payload, timeout=120) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i == 6:
                break  # leaves the stream: the connection closes
    assert _wait_idle(server.engine)
    cancelled = 'aotllm_requests_finished_total{"finish_reason": "cancelled"}'
    deadline = time.time() + 10  # recorded when the stream is torn down, which may trail the engine
    while metrics(server).get(cancelled, 0) - before.get(cancelled, 0) < 2 and time.time() < deadline:
        time.sleep(0.05)
    assert metrics(server)[cancelled] - before.get(cancelled, 0) == 2


def test_engine_gauges_read_the_schedulers():
    stats = SimpleNamespace(total=10, used=3, cached=2, prefix_hit_tokens=0, prefix_queries=0, prefix_hits=0)
    sched = SimpleNamespace(
        device_index=0, running=[1, 2, 3], waiting=[4], pool=SimpleNamespace(stats=lambda: stats), counters=Counters()
    )
    get = Metrics(lambda: SimpleNamespace(schedulers=[sched])).registry.get_sample_value
    dev = {"device": "0"}
    assert get("aotllm_requests_running", dev) == 3 and get("aotllm_requests_waiting", dev) == 1
    assert (get("aotllm_kv_pages_used", dev), get("aotllm_kv_pages_cached", dev)) == (3, 2)


def test_sequence_timer_counts_once_per_sequence():
    seq = SimpleNamespace(arrival=time.monotonic())
    m = Metrics()
    outer, inner = m.timer(seq), m.timer(seq)  # two observers of one sequence
    for ev in (Event(text="a", token_ids=[5]), Event(text="b", token_ids=[6]), Event(finish_reason="stop")):
        inner(ev)
        outer(ev)
    inner.close()
    outer.close()
    value = m.registry.get_sample_value
    assert value("aotllm_time_to_first_token_seconds_count") == 1
    assert value("aotllm_e2e_request_latency_seconds_count") == 1
    assert value("aotllm_inter_token_latency_seconds_count") == 1
    assert value("aotllm_requests_finished_total", {"finish_reason": "stop"}) == 1
    gone = m.timer(seq)  # closed timers release the sequence; one that never finishes counts as cancelled
    gone.close()
    assert value("aotllm_requests_finished_total", {"finish_reason": "cancelled"}) == 1
    assert Metrics().registry.get_sample_value("aotllm_requests_finished_total", {"finish_reason": "stop"}) is None


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(json.loads(record.getMessage()))


def test_access_log_line_per_request(client):
    handler, logger = _Records(), logging.getLogger("aotllm.access")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        r = client.chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=3, user="alice", extra_body={"ignore_eos": True}
        )
        list(client.completions.create(model=MODEL, prompt="s", max_tokens=2, stream=True))
        deadline = time.time() + 10  # the server logs a stream after its last byte: that may come later
        while not any(line["path"] == "/v1/completions" for line in handler.lines) and time.time() < deadline:
            time.sleep(0.02)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    chat = next(line for line in handler.lines if line["request_id"] == r.id)
    assert chat["path"] == "/v1/chat/completions" and chat["status"] == 200 and chat["user"] == "alice"
    assert chat["prompt_tokens"] == r.usage.prompt_tokens and chat["finish_reasons"] == ["length"]
    streamed = [line for line in handler.lines if line["path"] == "/v1/completions"][-1]
    assert streamed["stream"] is True and streamed["completion_tokens"] == 2


def test_loading_is_503_with_retry_after():
    with loading_client() as c:
        for r in (c.get("/v1/models"), c.post("/v1/chat/completions", json={"messages": CHAT})):
            assert r.status_code == 503 and r.headers["retry-after"]
            assert r.json()["error"]["type"] == "server_error"
        assert c.get("/metrics").status_code == 200


def test_queue_full_is_503_with_retry_after(tiny_program):
    s = ServerThread(_cfg(tiny_program, max_queue=2))  # a second app in this process: its own registry
    try:
        payload = {"model": MODEL, "prompt": "queue", "max_tokens": 30, "ignore_eos": True}
        rs = overflow_queue(s, lambda c: c.post(f"{s.url}/v1/completions", json=payload), 2)
        assert [r.status_code for r in rs] == [200, 200, 503]
        codes = sorted(r.status_code for r in rs)
        assert 200 in codes and 503 in codes
        busy = next(r for r in rs if r.status_code == 503)
        assert busy.headers["retry-after"] and busy.json()["error"]["code"] == "queue_full"
        assert "aotllm_kv_pages_total" in httpx.get(f"{s.url}/metrics").text
    finally:
        s.stop()


@pytest.mark.slow
def test_smollm2_chat(smollm2_path, smollm2_f32_artifacts, smollm2_reference):
    import transformers

    from tests.conftest import SMOL_PROMPT

    art = smollm2_f32_artifacts
    _, ref, tok = smollm2_reference
    s = ServerThread(
        EngineConfig(
            vmfb=art.vmfb, parameters=[art.irpa], model_config=art.config, tokenizer=art.dir, model_name="smollm2"
        )
    )
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=300)
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        r = c.chat.completions.create(model="smollm2", messages=messages, temperature=0, max_tokens=32)
        # HF's tokenizer of the same GGUF renders and tokenizes the chat alike (its template adds a system turn)
        hf = transformers.AutoTokenizer.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name)
        hf_ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        hf_ids = hf_ids["input_ids"] if hasattr(hf_ids, "keys") else hf_ids
        assert r.usage.prompt_tokens == len(hf_ids)
        assert "Paris" in r.choices[0].message.content and r.choices[0].finish_reason == "stop"
        greedy = c.completions.create(
            model="smollm2", prompt=SMOL_PROMPT, temperature=0, max_tokens=32, extra_body={"ignore_eos": True}
        )
        assert greedy.choices[0].text == tok.decode(ref)
        # embeddings: related sentences lie closer than unrelated ones
        import numpy as np

        texts = [
            "The cat sat on the mat.",
            "A kitten was sitting on the rug.",
            "Quarterly tax returns must be filed by April.",
        ]
        e = [np.array(d.embedding) for d in c.embeddings.create(model="smollm2", input=texts).data]
        assert len(e[0]) == 576 and float(e[0] @ e[1]) > float(e[0] @ e[2])
    finally:
        s.stop()
