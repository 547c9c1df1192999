"""Prompt logprobs over the OpenAI API: `echo` + `logprobs` on /v1/completions (OpenAI's legacy shape, which
loglikelihood harnesses read) and vLLM's `prompt_logprobs` on /v1/completions and /v1/chat/completions, against
the eager model's log-softmax at every prompt position (the tiny f32 program)."""

import dataclasses
import json
import random
import threading

import httpx
import numpy as np
import openai
import pytest

from serve.core.scheduler import IDLE_PREFILL_CHUNK, PREFILL_CHUNK
from serve.frontends.chat_template import BUILTIN_TEMPLATES, encode_prompt, render_chat
from tests.server_util import TINY_MODEL_NAME
from tests.tiny import char_tokenizer

MODEL = TINY_MODEL_NAME
TOL = 1e-4  # f32 program vs f64 log-softmax of the eager f32 logits
PROMPT = "The quick brown fox jumps over the lazy dog"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def eager(tiny_models):
    """ids -> the eager model's log-softmax [len(ids), V] (float64): row i is the distribution of token i + 1."""
    import torch

    from models.llama import PagedLlama
    from models.weights import load_weights
    from tests.eager import one_pass

    model = PagedLlama.from_weights(load_weights(gguf_file=tiny_models["llama31"][2]), 8)

    def logprobs(ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            logits = model.score(*one_pass(model, ids))[0, : len(ids)].double()
        return torch.log_softmax(logits, -1).numpy()

    return logprobs


def ids_of(text: str) -> list[int]:
    return char_tokenizer()[0].encode(text).ids


def chat_ids(messages=CHAT) -> list[int]:
    tok, info = char_tokenizer()
    return encode_prompt(tok, info, render_chat(BUILTIN_TEMPLATES["chatml"], messages, True, "<s>", "</s>"))


def text_of(token_id: int) -> str:
    return char_tokenizer()[0].decode([token_id], skip_special_tokens=False)


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json={"model": MODEL, **body}, timeout=120)


def check_top(row: np.ndarray, own: int, shown: set[int], k: int) -> set[int]:
    """`shown` (the prompt token `own` and the k most likely, as a position's answer gives them) against the
    eager log-softmax `row`, near-ties in either order -> the k most likely."""
    top = shown if len(shown) == k else shown - {own}
    assert own in shown and len(top) == k, (shown, k)
    kth = np.sort(row)[-k] if k else np.inf
    assert all(row[t] >= kth - TOL for t in top), (sorted(top), kth)
    return top


def check_echo_logprobs(lp, ids: list[int], want: np.ndarray, k: int) -> None:
    """The echoed prompt's entries of a logprobs object (`lp`: the client's object or a dict) against the eager
    log-softmax `want` of `ids`: null first, then each prompt token's logprob and the k most likely tokens."""
    get = (lambda name: lp[name]) if isinstance(lp, dict) else (lambda name: getattr(lp, name))
    tokens, token_logprobs, top_logprobs, offsets = (
        get(name)[: len(ids)] for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset")
    )
    assert tokens == [text_of(t) for t in ids] and offsets == list(range(len(ids)))
    assert token_logprobs[0] is None and top_logprobs[0] is None
    by_text: dict[str, list[int]] = {}  # (ids past the char table decode to "": one key for them all)
    for t in range(want.shape[1]):
        by_text.setdefault(text_of(t), []).append(t)
    for i in range(1, len(ids)):
        row, got = want[i - 1], top_logprobs[i]
        assert abs(token_logprobs[i] - row[ids[i]]) <= TOL and got[tokens[i]] == token_logprobs[i], i
        assert all(any(abs(lp - row[t]) <= TOL for t in by_text[text]) for text, lp in got.items()), i
        kth = np.sort(row)[-k] if k else np.inf
        assert all(lp >= kth - TOL for text, lp in got.items() if text != tokens[i]), i
        assert len(got) <= k + 1 and (len(got) >= k or "" in got), i


def test_echo_logprobs_equal_eager(client, eager):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    plain = client.completions.create(**kw).choices[0].text
    r = client.completions.create(echo=True, logprobs=3, **kw)
    ch, ids = r.choices[0], ids_of(PROMPT)
    assert ch.text == PROMPT + plain and ch.finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 4)
    lp, want = ch.logprobs, eager(ids)
    check_echo_logprobs(lp, ids, want, 3)
    # then the generated tokens, their offsets in the echoed text; greedy: the first is the prompt's argmax
    assert len(lp.tokens) == len(ids) + 4 and "".join(lp.tokens) == ch.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert abs(lp.token_logprobs[len(ids)] - want[-1].max()) <= TOL
    assert all(len(top) == 3 for top in lp.top_logprobs[len(ids) :])  # (greedy: the token is among them)


def test_loglikelihood_as_lm_eval_asks(server, eager):
    """lm-evaluation-harness's local-completions: token-id prompts in a batch, echo, logprobs 1, max_tokens 1,
    greedy; it sums token_logprobs[ctxlen:-1] and calls the continuation greedy when each token is its top's
    best. The last entry is the generated token's, whatever it is (an end token too)."""
    context, continuations = ids_of("Question: what colour is the sky? Answer:"), [" blue", " xyzzy"]
    prompts = [context + ids_of(c) for c in continuations]
    r = post(server, "/v1/completions", {"prompt": prompts, "echo": True, "logprobs": 1, "max_tokens": 1, "seed": 1})
    assert r.status_code == 200, r.text
    choices = sorted(r.json()["choices"], key=lambda c: c["index"])
    assert len(choices) == 2
    for choice, ids in zip(choices, prompts):
        lp, want = choice["logprobs"], eager(ids)
        assert len(lp["token_logprobs"]) == len(ids) + 1
        check_echo_logprobs(lp, ids, want, 1)
        score = sum(lp["token_logprobs"][len(context) : -1])
        assert abs(score - sum(want[i - 1, ids[i]] for i in range(len(context), len(ids)))) <= 10 * TOL
        greedy = all(
            tok == max(top.values())
            for tok, top in zip(lp["token_logprobs"][len(context) : -1], lp["top_logprobs"][len(context) : -1])
        )
        assert greedy == all(want[i - 1].argmax() == ids[i] for i in range(len(context), len(ids)))


def test_echo_with_max_tokens_zero_scores_the_prompt_alone(server, client, eager):
    ids = ids_of(PROMPT)
    r = client.completions.create(model=MODEL, prompt=PROMPT, echo=True, logprobs=2, max_tokens=0)
    ch = r.choices[0]
    assert ch.text == PROMPT and ch.finish_reason == "length" and len(ch.logprobs.tokens) == len(ids)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 0, len(ids))
    check_echo_logprobs(ch.logprobs, ids, eager(ids), 2)
    assert client.completions.create(model=MODEL, prompt=PROMPT, echo=True, max_tokens=0).choices[0].text == PROMPT
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, echo=True, max_tokens=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == PROMPT and chunks[-1].choices[0].finish_reason == "length"
    # without echo, nothing would come back: refused as before
    r = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_echo_logprobs_of_several_prompts_and_n(server, eager):
    prompts = ["ab c", "xyz!"]
    body = {"prompt": prompts, "n": 2, "echo": True, "logprobs": 0, "max_tokens": 0}
    r = post(server, "/v1/completions", body)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    for c, text in zip(choices, [p for p in prompts for _ in range(2)]):
        assert c["text"] == text
        check_echo_logprobs(c["logprobs"], ids_of(text), eager(ids_of(text)), 0)


def test_echo_logprobs_keep_a_generated_end_token(server, eager):
    """An end token generated adds no text, yet with echo it has its entry (text ""), as vLLM gives it: a
    harness reading token_logprobs[ctxlen:-1] drops exactly the generated token."""
    ids = ids_of(PROMPT)
    eos = char_tokenizer()[1].eos_id
    body = {"prompt": PROMPT, "echo": True, "logprobs": 1, "max_tokens": 3, "logit_bias": {str(eos): 100}}
    choice = post(server, "/v1/completions", body).json()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["text"] == PROMPT
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 1 and lp["tokens"][-1] == "" and lp["text_offset"][-1] == len(PROMPT)
    assert abs(lp["token_logprobs"][-1] - eager(ids)[-1, eos]) <= TOL  # (the model's own distribution)
    plain = post(server, "/v1/completions", {**body, "echo": False}).json()["choices"][0]
    assert plain["logprobs"]["tokens"] == []  # (without echo, as before: no entry for it)


def test_streamed_echo_logprobs_come_first_with_the_prompt(client, eager):
    kw = dict(
        model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, echo=True, logprobs=2, extra_body={"ignore_eos": True}
    )
    whole = client.completions.create(**kw).choices[0]
    chunks = [c for c in client.completions.create(stream=True, **kw) if c.choices]
    first, ids = chunks[0].choices[0], ids_of(PROMPT)
    assert first.text == PROMPT and first.logprobs.tokens == [text_of(t) for t in ids]
    check_echo_logprobs(first.logprobs, ids, eager(ids), 2)
    assert "".join(c.choices[0].text for c in chunks) == whole.text
    streamed = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
    for name in ("tokens", "text_offset"):
        assert [x for lp in streamed for x in getattr(lp, name)] == getattr(whole.logprobs, name)
    got = [x for lp in streamed for x in lp.token_logprobs]
    assert got[0] is None and np.allclose(got[1:], whole.logprobs.token_logprobs[1:], atol=1e-6)


def check_vllm_prompt_logprobs(plp: list, ids: list[int], want: np.ndarray, k: int) -> None:
    """vLLM's shape: null, then per position {str(id): {logprob, rank, decoded_token}} for the prompt token
    and the k most likely (ranks 1..k by logprob; the prompt token's own rank where it is among them)."""
    assert len(plp) == len(ids) and plp[0] is None
    for i in range(1, len(ids)):
        row, entry, own = want[i - 1], plp[i], ids[i]
        assert all(
            abs(e["logprob"] - row[int(t)]) <= TOL and e["decoded_token"] == text_of(int(t)) for t, e in entry.items()
        )
        top = check_top(row, own, {int(t) for t in entry}, k)
        by_rank = sorted(top - {own}, key=lambda t: entry[str(t)]["rank"])
        assert [entry[str(t)]["rank"] for t in by_rank] == sorted(set(range(1, k + 1)) - {entry[str(own)]["rank"]})
        assert all(row[a] >= row[b] - TOL for a, b in zip(by_rank, by_rank[1:])), i
        rank = entry[str(own)]["rank"]
        if own in top:
            assert 1 + (row > row[own] + TOL).sum() <= rank <= 1 + (row > row[own] - TOL).sum(), i
        else:
            assert rank is None, i


@pytest.mark.parametrize("k", [0, 3])
def test_vllm_prompt_logprobs_on_completions(server, eager, k):
    ids = ids_of(PROMPT)
    r = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "prompt_logprobs": k, "n": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert "prompt_logprobs" not in body and len(body["choices"]) == 2
    for choice in body["choices"]:
        check_vllm_prompt_logprobs(choice["prompt_logprobs"], ids, eager(ids), k)
        assert choice["logprobs"] is None
    plain = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2}).json()
    assert "prompt_logprobs" not in plain["choices"][0]


def test_vllm_prompt_logprobs_on_chat(server, client, eager):
    ids = chat_ids()
    r = post(server, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 3, "prompt_logprobs": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["prompt_tokens"] == len(ids) and "prompt_logprobs" not in body["choices"][0]
    check_vllm_prompt_logprobs(body["prompt_logprobs"], ids, eager(ids), 2)
    # (the openai client keeps the field as an extra)
    c = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=1, extra_body={"prompt_logprobs": 0})
    check_vllm_prompt_logprobs(c.model_extra["prompt_logprobs"], ids, eager(ids), 0)


def test_echo_logprobs_and_prompt_logprobs_together(server, eager):
    """Each view keeps its own k: echo's `logprobs` and vLLM's `prompt_logprobs`."""
    ids = ids_of(PROMPT)
    for logprobs, k in [(1, 4), (4, 1)]:
        body = {"prompt": PROMPT, "max_tokens": 1, "echo": True, "logprobs": logprobs, "prompt_logprobs": k}
        r = post(server, "/v1/completions", body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        check_echo_logprobs(choice["logprobs"], ids, eager(ids), logprobs)
        check_vllm_prompt_logprobs(choice["prompt_logprobs"], ids, eager(ids), k)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("extra", [{"prompt_logprobs": 21}, {"prompt_logprobs": -1}, {"prompt_logprobs": "x"}])
def test_bad_prompt_logprobs_are_400(server, path, extra):
    body = {"prompt": PROMPT} if path == "/v1/completions" else {"messages": CHAT}
    r = post(server, path, {**body, "max_tokens": 1, **extra})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs", r.text


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_prompt_logprobs_with_a_stream(server, path):
    """vLLM's rule: k > 0 with a stream is refused; 0 is allowed (and shows nothing)."""
    body = {"prompt": PROMPT} if path == "/v1/completions" else {"messages": CHAT}
    r = post(server, path, {**body, "max_tokens": 1, "stream": True, "prompt_logprobs": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs"
    with httpx.stream(
        "POST", f"{server.url}{path}", json={**body, "max_tokens": 2, "stream": True, "prompt_logprobs": 0}
    ) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.status_code == 200 and lines[-1] == "data: [DONE]"
    assert all("prompt_logprobs" not in json.loads(line[6:]) for line in lines[:-1])


def test_a_program_without_score_refuses_naming_the_field(server):
    eng = server.engine
    kept = eng.abi
    eng.abi = dataclasses.replace(kept, has_score=False)
    try:
        for path, body, param in [
            ("/v1/completions", {"prompt": PROMPT, "echo": True, "logprobs": 1}, "echo"),
            ("/v1/completions", {"prompt": PROMPT, "prompt_logprobs": 1}, "prompt_logprobs"),
            ("/v1/chat/completions", {"messages": CHAT, "prompt_logprobs": 0}, "prompt_logprobs"),
        ]:
            r = post(server, path, {**body, "max_tokens": 1})
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
            assert "score entry point" in r.json()["error"]["message"]
        assert post(server, "/v1/completions", {"prompt": PROMPT, "echo": True, "max_tokens": 1}).status_code == 200
    finally:
        eng.abi = kept


def test_long_prompt_over_several_chunks(server, client, eager):
    """A prompt longer than a step's prefill budget is scored chunk by chunk: alone (IDLE_PREFILL_CHUNK per
    step), and while another sequence decodes (PREFILL_CHUNK per step); every position equals the eager model's."""
    rng = random.Random(7)
    text = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ,.") for _ in range(400))
    ids = ids_of(text)
    assert len(ids) > IDLE_PREFILL_CHUNK > PREFILL_CHUNK and len(ids) + 1 < server.engine.abi.max_seq_len
    want = eager(ids)
    kw = dict(model=MODEL, prompt=text, echo=True, logprobs=2, max_tokens=1)
    check_echo_logprobs(client.completions.create(**kw).choices[0].logprobs, ids, want, 2)

    decoding, done = threading.Event(), threading.Event()

    def decode_meanwhile():
        stream = client.completions.create(
            model=MODEL, prompt="x", max_tokens=300, stream=True, extra_body={"ignore_eos": True}
        )
        for _ in stream:
            decoding.set()
        done.set()

    thread = threading.Thread(target=decode_meanwhile)
    thread.start()
    try:
        assert decoding.wait(60)
        r = post(server, "/v1/completions", {**kw, "prompt": ids, "prompt_logprobs": 1})
        assert r.status_code == 200, r.text
        overlapped = not done.is_set()
        choice = r.json()["choices"][0]
        check_echo_logprobs(choice["logprobs"], ids, want, 2)
        check_vllm_prompt_logprobs(choice["prompt_logprobs"], ids, want, 1)
    finally:
        thread.join(120)
    assert overlapped, "the other sequence finished before the long prompt was scored"
