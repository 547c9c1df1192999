"""serve/triton_api.py: Triton's generate extension, TensorRT-LLM backend style, over the real HTTP server."""

import json
import time

import httpx
import pytest

from serve.core.engine import EngineConfig
from tests.server_util import TINY_MODEL_NAME, ServerThread, loading_client, overflow_queue, tiny_config
from tests.tiny import char_tokenizer

MODEL = TINY_MODEL_NAME
CURL = {"text_input": "What is machine learning?", "max_tokens": 20, "bad_words": "", "stop_words": ""}


def _cfg(out, **kw) -> EngineConfig:
    return tiny_config(out, model_name=MODEL, **kw)


def post(server, path, payload, **kw):
    return httpx.post(f"{server.url}{path}", json=payload, timeout=120, **kw)


def triton(server, payload, model="ensemble"):
    r = post(server, f"/v2/models/{model}/generate", payload)
    assert r.status_code == 200, r.text
    return r.json()


def generate_greedy(server, text, n, ignore_eos=False):
    r = post(
        server,
        "/generate",
        {
            "text": text,
            "return_input_ids": True,
            "sampling_params": {"max_completion_tokens": n, "ignore_eos": ignore_eos},
        },
    )
    return r.json()["responses"][0]["responses"][0]


def stream(server, payload, model="ensemble"):
    with httpx.stream("POST", f"{server.url}/v2/models/{model}/generate_stream", json=payload, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: {") for line in lines), lines[-1:]  # no [DONE]: Triton has none
    return [json.loads(line[6:]) for line in lines]


def test_the_curl_line(server):
    body = triton(server, CURL)
    assert body["model_name"] == "ensemble" and body["model_version"] == "1" and body["sequence_id"] == 0
    assert body["text_output"].startswith(CURL["text_input"])
    assert "output_log_probs" not in body and "cum_log_probs" not in body
    expected = generate_greedy(server, CURL["text_input"], 20)["text"]
    assert body["text_output"] == CURL["text_input"] + expected  # greedy; the prompt comes first by default


@pytest.mark.parametrize("path", ["/v2/models/{m}/generate", "/v2/models/{m}/versions/1/generate"])
@pytest.mark.parametrize("model", [MODEL, "ensemble", "tensorrt_llm_bls", "tensorrt_llm"])
def test_names_versions_and_parameters(server, path, model):
    payload = {
        "text_input": "abc",
        "parameters": {"max_tokens": [5], "temperature": 0},
        "unknown_field": 1,
        "exclude_input_in_output": True,
    }
    r = post(server, path.format(m=model), payload)
    assert r.status_code == 200, r.text
    assert r.json()["model_name"] == model
    assert r.json()["text_output"] == generate_greedy(server, "abc", 5)["text"]


def test_stream_pieces_concatenate_to_the_output(server):
    payload = {"text_input": "Streaming test", "max_tokens": 12, "end_id": -1, "return_log_probs": True}
    chunks = stream(server, {**payload, "stream": True})
    assert len(chunks) > 1 and all(c["model_name"] == "ensemble" for c in chunks)
    text = "".join(c["text_output"] for c in chunks)
    full = triton(server, payload)
    assert full["text_output"] == "Streaming test" + text  # streamed pieces never hold the prompt
    assert triton(server, {**payload, "exclude_input_in_output": True})["text_output"] == text
    logprobs = [x for c in chunks for x in c["output_log_probs"]]
    assert logprobs == pytest.approx(full["output_log_probs"]) and len(logprobs) == 12
    assert chunks[-1]["cum_log_probs"] == pytest.approx(full["cum_log_probs"]) == pytest.approx(sum(logprobs))
    assert all(x <= 0 for x in logprobs)
    # without stream: true, generate_stream answers once, with the whole output
    assert [c["text_output"] for c in stream(server, payload)] == [full["text_output"]]


def _some_text(server, n=16):
    for prompt in ("stop here", "The quick brown fox", "prompt number 3", "abc", "Hello"):
        out = generate_greedy(server, prompt, n, ignore_eos=True)
        if len(out["text"]) >= 6:  # (the tiny random model often emits special tokens, which have no text)
            return prompt, out
    pytest.skip("the tiny model produced no text")


def test_stop_words_end_id_and_bad_words(server):
    prompt, out = _some_text(server)
    text, ids = out["text"], out["token_ids"]
    base = {"text_input": prompt, "max_tokens": 16, "exclude_input_in_output": True, "return_finish_reason": True}
    assert triton(server, {**base, "end_id": -1})["text_output"] == text  # end_id -1: EOS does not stop
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    for stop_words in (stop, [stop], ["", "never appears", stop]):
        body = triton(server, {**base, "end_id": -1, "stop_words": stop_words})
        assert body["text_output"] == text[: text.index(stop)] and body["finish_reason"] == "stop"
    tok, info = char_tokenizer()
    end = ids[3]
    cut = next(i for i, t in enumerate(ids) if t == end or t == info.eos_id)
    body = triton(server, {**base, "end_id": end})
    assert body["text_output"] == tok.decode(ids[:cut]) and body["finish_reason"] == "stop"
    banned = text[0]
    body = triton(server, {**base, "end_id": -1, "bad_words": [banned, ""]})
    assert banned not in body["text_output"] and body["finish_reason"] == "length"


def test_sampling_is_seeded(server):
    payload = {
        "text_input": "seeded",
        "max_tokens": 10,
        "temperature": 1.0,
        "top_k": 50,
        "random_seed": 7,
        "end_id": -1,
    }
    first = triton(server, payload)["text_output"]
    del payload["random_seed"]
    assert triton(server, {**payload, "seed": 7})["text_output"] == first  # vLLM's name works too
    assert triton(server, {**payload, "seed": 8})["text_output"] != first


def test_health_and_metadata(server):
    get = lambda path: httpx.get(f"{server.url}{path}")  # noqa: E731
    assert get("/v2/health/live").status_code == 200 and get("/v2/health/ready").status_code == 200
    meta = get("/v2").json()
    assert meta["name"] == "aotllm" and "version" in meta and "generate" in meta["extensions"]
    for model in (MODEL, "ensemble", "tensorrt_llm_bls", "tensorrt_llm"):
        m = get(f"/v2/models/{model}").json()
        assert m["name"] == model and m["versions"] == ["1"] and m["platform"] == "ensemble"
        assert {"text_input", "max_tokens", "bad_words", "stop_words"} <= {i["name"] for i in m["inputs"]}
        assert "text_output" in {o["name"] for o in m["outputs"]}
        assert get(f"/v2/models/{model}/ready").status_code == 200
        assert get(f"/v2/models/{model}/versions/1/ready").status_code == 200
    for path in ("/v2/models/nope", "/v2/models/nope/ready", "/v2/models/ensemble/versions/2"):
        r = get(path)
        assert r.status_code == 404 and ("nope" in r.json()["error"] or "version 2" in r.json()["error"])
    r = post(server, "/v2/models/nope/generate", CURL)
    assert r.status_code == 404 and set(r.json()) == {"error"}


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"max_tokens": -3}, "max_tokens"),
        ({"max_tokens": None}, "max_tokens"),
        ({"max_tokens": 10**9}, "max_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"temperature": 1000}, "temperature"),
        ({"top_p": 2}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"text_input": None}, "text_input"),
        ({"text_input": ""}, "text_input"),
        ({"text_input": "x" * 600}, "context"),
        ({"end_id": 4000}, "end_id"),
        ({"stop_words": [str(i) for i in range(17)]}, "stop_words"),
        ({"presence_penalty": 5}, "presence_penalty"),
        ({"beam_width": 2}, "beam_width"),
    ],
)
def test_bad_input_is_a_400_naming_the_field(server, change, needle):
    payload = {k: v for k, v in {**CURL, **change}.items() if v is not None}
    for route in ("generate", "generate_stream"):
        r = post(server, f"/v2/models/ensemble/{route}", {**payload, "stream": True})
        assert r.status_code == 400, r.text
        assert set(r.json()) == {"error"} and needle in r.json()["error"]
    r = httpx.post(f"{server.url}/v2/models/ensemble/generate", content="{nope", timeout=30)
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]
    assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200


def test_not_loaded_is_503():
    with loading_client() as client:
        assert client.get("/v2/health/live").status_code == 200
        for r in (
            client.get("/v2/health/ready"),
            client.get("/v2/models/ensemble"),
            client.post("/v2/models/ensemble/generate", json=CURL),
        ):
            assert r.status_code == 503 and r.headers["retry-after"] and set(r.json()) == {"error"}


def cancelled(server):
    text = httpx.get(f"{server.url}/metrics").text
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith('aotllm_requests_finished_total{finish_reason="cancelled"}')
    )


def test_stream_disconnect_frees_the_pages(server):
    before = cancelled(server)
    payload = {"text_input": "leave early", "max_tokens": 200, "end_id": -1, "stream": True}
    with httpx.stream("POST", f"{server.url}/v2/models/ensemble/generate_stream", json=payload, timeout=60) as r:
        events = (line for line in r.iter_lines() if line.startswith("data: "))
        next(events), next(events)  # two pieces, then the client goes away
    deadline = time.time() + 30
    while time.time() < deadline and not (
        all(s.used == 0 for s in server.engine.pool_stats())
        and all(s.load == 0 for s in server.engine.schedulers)
        and cancelled(server) == before + 1
    ):  # counted at stream teardown
        time.sleep(0.1)
    assert all(s.used == 0 for s in server.engine.pool_stats()) and cancelled(server) == before + 1
    assert triton(server, CURL)["text_output"]


def test_queue_full_is_503_with_retry_after(tiny_program):
    s = ServerThread(_cfg(tiny_program, max_queue=2))
    try:
        payload = {"text_input": "queue", "max_tokens": 40, "end_id": -1}

        rs = overflow_queue(s, lambda client: client.post(f"{s.url}/v2/models/ensemble/generate", json=payload), 2)
        assert [r.status_code for r in rs] == [200, 200, 503]
        assert {r.status_code for r in rs} == {200, 503}
        busy = next(r for r in rs if r.status_code == 503)
        assert busy.headers["retry-after"] and set(busy.json()) == {"error"}
        assert httpx.get(f"{s.url}/v2/health/ready").status_code == 200
    finally:
        s.stop()


@pytest.mark.slow
def test_smollm2_answers_the_curl_line(smollm2_f32_artifacts):
    art = smollm2_f32_artifacts
    s = ServerThread(EngineConfig(vmfb=art.vmfb, parameters=[art.irpa], model_config=art.config, tokenizer=art.dir))
    try:
        body = post(s, "/v2/models/ensemble/generate", CURL).json()
        answer = body["text_output"][len(CURL["text_input"]) :]
        assert body["text_output"].startswith(CURL["text_input"])
        assert sum(c.isalpha() for c in answer) >= 20, answer
        chunks = stream(s, {**CURL, "stream": True})
        assert CURL["text_input"] + "".join(c["text_output"] for c in chunks) == body["text_output"]
    finally:
        s.stop()
