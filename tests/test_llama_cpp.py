"""llama-server's own routes and fields (serve/frontends/llama_cpp_api.py) and the llama.cpp spellings of
the OpenAI routes, as raw llama.cpp-style requests over the tiny program. llama-server's command line:
tests/test_serve_gguf.py."""

from __future__ import annotations

import json
import threading
import time

import httpx
import numpy as np
import openai
import pytest

from tests.server_util import TINY_MODEL_NAME
from tests.tiny import char_tokenizer

MODEL = TINY_MODEL_NAME
PROMPT = "The quick brown fox jumps"  # (25 characters: three full pages of 8 for the prefix cache)
GREEDY = {"temperature": 0, "ignore_eos": True}


def post(server, path: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=120, **kw)


def completion(server, **body) -> dict:
    r = post(server, "/completion", {"prompt": PROMPT, "n_predict": 6, **GREEDY, **body})
    assert r.status_code == 200, r.text
    return r.json()


def ids_of(text: str) -> list[int]:
    return char_tokenizer()[0].encode(text).ids


def test_completion_fields(server):
    r = completion(server, return_tokens=True)
    openai_text = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 6, **GREEDY}).json()
    assert r["content"] == openai_text["choices"][0]["text"] and len(r["tokens"]) == 6
    assert (r["stop"], r["stop_type"], r["stopping_word"], r["truncated"]) == (True, "limit", "", False)
    assert (r["tokens_predicted"], r["tokens_evaluated"]) == (6, len(ids_of(PROMPT)))
    assert r["model"] == MODEL and r["prompt"] == PROMPT
    settings = r["generation_settings"]
    assert settings["n_predict"] == 6 and settings["temperature"] == 0 and settings["n_ctx"] == 512
    t = r["timings"]
    assert t["predicted_n"] == 6 and t["prompt_ms"] >= 0 and t["predicted_per_second"] > 0
    assert post(server, "/completions", {"prompt": PROMPT, "n_predict": 6, **GREEDY}).json()["content"] == r["content"]


def test_stop_word_and_eos(server):
    full = completion(server, n_predict=12)["content"]
    word = full[4:6]
    r = completion(server, n_predict=12, stop=[word, "~never~"])
    assert (r["stop_type"], r["stopping_word"], r["content"]) == ("word", word, full[: full.find(word)])
    # the end token (id 2) forced by logit_bias: stop_type eos
    r = completion(server, n_predict=12, ignore_eos=False, logit_bias=[[2, 100]])
    assert (r["stop_type"], r["content"], r["tokens_predicted"]) == ("eos", "", 1)


def test_streaming_events(server):
    whole = completion(server, n_predict=8)
    with httpx.stream(
        "POST", f"{server.url}/completion", json={"prompt": PROMPT, "n_predict": 8, "stream": True, **GREEDY}
    ) as r:
        lines = [x for x in r.iter_lines() if x]
    events = [json.loads(x[6:]) for x in lines]
    assert all(x.startswith("data: {") for x in lines)  # (no [DONE] on llama-server's own stream)
    *chunks, final = events
    assert all(c["stop"] is False and c["tokens"] for c in chunks)
    assert "".join(c["content"] for c in chunks) == whole["content"]
    assert final["stop"] is True and final["stop_type"] == "limit" and final["tokens_predicted"] == 8


def test_n_probs(server):
    r = completion(server, n_probs=3)
    probs = r["completion_probabilities"]
    assert len(probs) == 6 and "".join(p["token"] for p in probs) == r["content"]
    for p in probs:
        assert len(p["top_logprobs"]) == 3 and p["logprob"] <= 0
        assert p["top_logprobs"][0]["logprob"] >= p["top_logprobs"][-1]["logprob"]
        assert p["top_logprobs"][0]["id"] == p["id"]  # (greedy: the top one)
        assert bytes(p["bytes"]).decode() == p["token"]
    with httpx.stream(
        "POST",
        f"{server.url}/completion",
        json={"prompt": PROMPT, "n_predict": 3, "n_probs": 2, "stream": True, **GREEDY},
    ) as s:
        events = [json.loads(x[6:]) for x in s.iter_lines() if x]
    assert [len(e["completion_probabilities"]) for e in events[:-1]] == [1, 1, 1]


def test_cache_prompt_reuses_the_prefix(server):
    prompt = "A prompt long enough to fill some pages of the prefix cache."
    first = completion(server, prompt=prompt, cache_prompt=True)
    again = completion(server, prompt=prompt, cache_prompt=True)
    assert again["tokens_cached"] >= 8 * (len(ids_of(prompt)) // 8 - 1) and again["content"] == first["content"]
    assert again["timings"]["cache_n"] == again["tokens_cached"]


def test_prompt_shapes(server):
    text = completion(server)["content"]
    assert completion(server, prompt=ids_of(PROMPT))["content"] == text
    mixed = [*ids_of(PROMPT[:9]), PROMPT[9:]]  # ids, then a text (tokenized alone)
    assert completion(server, prompt=mixed)["content"] == text
    r = post(server, "/completion", {"prompt": [PROMPT, {"prompt_string": PROMPT}], "n_predict": 6, **GREEDY}).json()
    assert isinstance(r, list) and [x["content"] for x in r] == [text, text] and [x["index"] for x in r] == [0, 1]


def test_logit_bias_and_grammar(server):
    banned = completion(server, return_tokens=True)["tokens"][0]
    r = completion(server, logit_bias=[[banned, False]], return_tokens=True)
    assert banned not in r["tokens"]
    r = completion(server, logit_bias={"q": 100})  # (OpenAI's form; a text biases its tokens)
    assert r["content"] == "q" * 6
    r = completion(server, grammar='root ::= "ab" [0-9]', ignore_eos=False)
    assert len(r["content"]) == 3 and r["content"][:2] == "ab" and r["stop_type"] == "eos"


def test_errors_are_llama_server_shaped(server):
    r = post(server, "/completion", {"prompt": "x" * 600})
    err = r.json()["error"]
    assert r.status_code == 400 and err["type"] == "exceed_context_size_error" and err["code"] == 400
    assert err["n_ctx"] == 512 and err["n_prompt_tokens"] >= 512
    r = post(server, "/completion", {"prompt": "x", "n_predict": 0})
    assert r.status_code == 400 and "n_predict" in r.json()["error"]["message"]
    r = post(server, "/infill", {"input_prefix": "def f(", "input_suffix": "):"})
    assert r.status_code == 400 and "fill-in-the-middle" in r.json()["error"]["message"]  # (no FIM tokens)
    r = httpx.get(f"{server.url}/no/such/route")
    assert (
        r.status_code == 404 and r.json()["error"]["code"] == 404 and "/no/such/route" in r.json()["error"]["message"]
    )
    r = httpx.get(f"{server.url}/completion")
    assert r.status_code == 405 and r.json()["error"]["code"] == 405


def test_props_slots_and_apply_template(server):
    props = httpx.get(f"{server.url}/props").json()
    assert props["total_slots"] == server.engine.cfg.max_running and props["model_path"] == MODEL
    assert props["default_generation_settings"]["n_ctx"] == 512 and "im_start" in props["chat_template"]
    assert props["default_generation_settings"]["params"]["temperature"] == 0.8  # (llama.cpp's default)
    slots = httpx.get(f"{server.url}/slots").json()
    assert len(slots) == props["total_slots"] and not any(s["is_processing"] for s in slots)
    # one long request running: its slot shows it
    body = {"prompt": "x", "n_predict": 400, "ignore_eos": True, "stream": True}
    busy: list[dict] = []

    def run() -> None:
        with httpx.stream("POST", f"{server.url}/completion", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line and not busy:
                    busy.extend(s for s in httpx.get(f"{server.url}/slots").json() if s["is_processing"])

    t = threading.Thread(target=run)
    t.start()
    t.join(120)
    assert len(busy) == 1 and busy[0]["params"]["n_predict"] == 400 and busy[0]["next_token"]["n_remain"] < 400
    messages = [{"role": "user", "content": "Hi"}]
    r = post(server, "/apply-template", {"messages": messages}).json()
    assert r["prompt"] == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert post(server, "/apply-template", {}).status_code == 400


@pytest.mark.parametrize("path", ["/embedding", "/embeddings", "/v1/embeddings"])
def test_embedding_input_shapes(server, path):
    text = "a cat"
    shapes = [
        text,
        [text, ids_of(text)],
        [{"prompt_string": text}, {"content": [{"type": "text", "text": "a "}, {"type": "text", "text": "cat"}]}],
        [*ids_of("a "), "cat"],  # one prompt: ids and a text
    ]
    vectors = []
    for shape in shapes:
        key = "content" if path == "/embedding" and isinstance(shape, str) else "input"
        r = post(server, path, {key: shape})
        assert r.status_code == 200, r.text
        body = r.json()
        rows = [d["embedding"][0] for d in body] if path != "/v1/embeddings" else [d["embedding"] for d in body["data"]]
        vectors += rows
    assert len(vectors) == 6
    for v in vectors[1:]:
        np.testing.assert_allclose(v, vectors[0], rtol=1e-5, atol=1e-6)
    r = post(server, path, {"input": [text, {"image": "x"}]})
    assert r.status_code == 400 and "input[1]" in r.json()["error"]["message"]


def test_openai_routes_take_llama_cpp_spellings(server):
    client = openai.OpenAI(base_url=server.url, api_key="x", max_retries=0)  # (no /v1: llama-server's aliases)
    assert [m.id for m in client.models.list().data] == [MODEL]
    r = client.chat.completions.create(
        model="gpt-3.5-turbo", messages=[{"role": "user", "content": "Hi"}], max_tokens=3
    )
    assert r.model == MODEL and r.system_fingerprint and r.usage.prompt_tokens_details.cached_tokens >= 0
    r = post(server, "/v1/completions", {"prompt": PROMPT, "n_predict": 5, **GREEDY}).json()
    assert r["usage"]["completion_tokens"] == 5 and r["system_fingerprint"]
    t0 = time.time()
    for path, body in (
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 600}]}),
        ("/v1/responses", {"input": "x" * 600}),
        ("/v1/embeddings", {"input": "x" * 600}),
    ):
        r = post(server, path, body)
        err = r.json()["error"]
        assert r.status_code == 400 and err["type"] == "exceed_context_size_error" and err["n_ctx"] == 512, (path, err)
    assert time.time() - t0 < 30


def test_infill_lays_the_code_out_with_the_fim_tokens(tiny_program, tmp_path):
    """/infill on a vocabulary with StarCoder's fill-in-the-middle tokens (the tiny char vocabulary plus
    them, each one token): prefix, suffix and middle, and the repo-level layout for input_extra."""
    from models.gguf_tokenizer import save_tokenizer
    from tests.server_util import ServerThread, tiny_config

    tok, info = char_tokenizer()
    tok.add_special_tokens(["<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<repo_name>", "<file_sep>"])
    save_tokenizer(tok, info, tmp_path)
    s = ServerThread(tiny_config(tiny_program, tokenizer=tmp_path))
    try:
        body = {"input_prefix": "def add(a, b): return ", "input_suffix": " # sum", "n_predict": 4, **GREEDY}
        r = post(s, "/infill", body).json()
        assert r["prompt"] == "<fim_prefix>def add(a, b): return <fim_suffix> # sum<fim_middle>"
        assert r["tokens_evaluated"] == len(tok.encode(r["prompt"]).ids) == 3 + 22 + 6 and r["tokens_predicted"] == 4
        extra = [{"filename": "u.py", "text": "X = 1"}]
        r = post(s, "/infill", {**body, "input_extra": extra}).json()
        assert r["prompt"].startswith("<repo_name>myproject\n<file_sep>u.py\nX = 1<fim_prefix>def add")
    finally:
        s.stop()
