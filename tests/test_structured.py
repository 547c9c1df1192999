"""Constrained decoding (serve/core/guide.py, serve/frontends/constraints.py): the sampler's mask under every
sampling setting, each protocol's constraint fields over the tiny program, and the refusals."""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import jsonschema
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serve.core.guide import Constraint, ConstraintError, Guides, allowed
from serve.core.sampling import Sampler, SamplingParams
from tests.server_util import TINY_MODEL_NAME
from tests.tiny import char_tokenizer

MODEL = TINY_MODEL_NAME

SAMPLERS = {
    "greedy": {"temperature": 0},
    "temperature": {"temperature": 1.0, "seed": 1},
    "top_k": {"temperature": 1.5, "top_k": 5, "seed": 2},
    "top_p": {"temperature": 1.0, "top_p": 0.8, "seed": 3},
    "min_p": {"temperature": 1.0, "min_p": 0.2, "seed": 4},
    "penalties": {"temperature": 0.7, "presence_penalty": 1.5, "frequency_penalty": 1.0, "repetition_penalty": 1.3},
    "logit_bias": {"temperature": 0, "logit_bias": {str(ord("z") - 29): 100}},  # 'z': forbidden by the regex
    "n": {"temperature": 1.0, "n": 3, "seed": 5},
}


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=120)


def texts(r: httpx.Response) -> list[tuple[str, str]]:
    assert r.status_code == 200, r.text
    return [(c.get("text") or c["message"]["content"], c["finish_reason"]) for c in r.json()["choices"]]


# -- the sampler's mask ------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    allowed_frac=st.sampled_from([1 / 500, 0.01, 0.3, 1.0]),
    temperature=st.sampled_from([0.0, 0.5, 1.0, 2.0]),
    top_k=st.sampled_from([0, 1, 3, 50]),
    top_p=st.sampled_from([1.0, 0.9, 0.2]),
    min_p=st.sampled_from([0.0, 0.1]),
    penalty=st.booleans(),
)
def test_sampled_token_is_always_allowed(seed, allowed_frac, temperature, top_k, top_p, min_p, penalty):
    rng = np.random.default_rng(seed)
    vocab = 1000
    logits = (rng.standard_normal(vocab) * 4).astype(np.float32)
    ok = rng.random(vocab) < allowed_frac
    ok[rng.integers(vocab)] = True
    mask = np.packbits(np.pad(ok, (0, 24)), bitorder="little").view(np.int32)  # (whole 32-bit words)
    best_forbidden = int(np.flatnonzero(~ok)[0]) if not ok.all() else 0
    params = SamplingParams(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=1.5 if penalty else 1.0,
        frequency_penalty=1.0 if penalty else 0.0,
        logit_bias={best_forbidden: 100.0},
    )
    sampler = Sampler(params, [1, 2, 3], seed=seed)
    for _ in range(3):
        assert ok[sampler.sample(logits, mask).token_id]


class FixedGuide:
    """A guide that allows a fixed set of tokens (Sampler's side of core/guide.Guide)."""

    def __init__(self, ok: np.ndarray) -> None:
        self.ok, self.masks = ok, 0

    def allows(self, token: int) -> bool:
        return bool(self.ok[token])

    def mask(self, vocab_size: int) -> np.ndarray:
        self.masks += 1
        return np.packbits(np.pad(self.ok, (0, -len(self.ok) % 32)), bitorder="little").view(np.int32)

    def advance(self, token: int) -> None:
        pass


def test_mask_only_when_needed_draws_the_masked_distribution():
    """Without top-k/p or min-p the sampler draws unmasked and masks only when that token is not allowed:
    the draws still follow the masked distribution (chi-square), and greedy picks the masked argmax."""
    logits = np.log(np.array([0.30, 0.25, 0.20, 0.10, 0.08, 0.04, 0.02, 0.01], np.float32))
    ok = np.array([0, 1, 0, 1, 1, 0, 1, 1], bool)
    guide = FixedGuide(ok)
    sampler = Sampler(SamplingParams(temperature=1.0), [], seed=0, guide=guide)  # type: ignore[arg-type]
    assert not sampler.needs_mask
    n = 20000
    counts = np.bincount([sampler.sample(logits).token_id for _ in range(n)], minlength=8)
    assert counts[~ok].sum() == 0 and 0 < guide.masks < n  # (the mask only after a forbidden draw)
    p = np.exp(logits) * ok
    expected = n * p[ok] / p.sum()
    chi2 = float((((counts[ok] - expected) ** 2) / expected).sum())
    assert chi2 < 20.5  # 4 degrees of freedom: p = 0.0004
    greedy = Sampler(SamplingParams(temperature=0), [], guide=FixedGuide(ok))  # type: ignore[arg-type]
    assert greedy.sample(logits).token_id == 1
    assert Sampler(SamplingParams(temperature=1.0, top_p=0.9), [], guide=guide).needs_mask  # type: ignore[arg-type]


# -- every sampler, each protocol's fields -----------------------------------------------------------------


@pytest.mark.parametrize("name", SAMPLERS)
def test_regex_holds_under_every_sampler(server, name):
    pattern = "[0-9]{2,4}-(ab|cd)"
    r = post(
        server, "/v1/completions", {"prompt": "Code:", "max_tokens": 20, "guided_regex": pattern, **SAMPLERS[name]}
    )
    for text, finish in texts(r):
        assert re.fullmatch(pattern, text) and finish == "stop", (text, finish)


def test_choice_gbnf_and_lark_on_completions(server):
    r = post(server, "/v1/completions", {"prompt": "Colour:", "max_tokens": 10, "guided_choice": ["red", "green"]})
    assert texts(r)[0] in (("red", "stop"), ("green", "stop"))
    gbnf = 'root ::= answer " " digit digit\nanswer ::= "yes" | "no"\ndigit ::= [0-9]'
    for field in ("grammar", "guided_grammar"):  # llama.cpp's GBNF, vLLM's grammar
        text, finish = texts(post(server, "/v1/completions", {"prompt": "Q?", "max_tokens": 10, field: gbnf}))[0]
        assert re.fullmatch(r"(yes|no) [0-9]{2}", text) and finish == "stop"
    lark = 'start: "x" NUM "y"\nNUM: /[1-9]/'
    body = {"prompt": "Q?", "max_tokens": 10, "structured_outputs": {"grammar": lark}}
    assert re.fullmatch("x[1-9]y", texts(post(server, "/v1/completions", body))[0][0])


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
        "pet": {"anyOf": [{"type": "null"}, {"type": "boolean"}]},
    },
    "required": ["name", "age", "tags", "pet"],
    "additionalProperties": False,
}


def test_json_schema_chat_streamed_and_not(server):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "A person, please."}],
        "max_tokens": 120,
        "temperature": 0.8,
        "seed": 7,
        "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}},
    }
    text, finish = texts(post(server, "/v1/chat/completions", body))[0]
    assert finish == "stop"
    jsonschema.validate(json.loads(text), SCHEMA)
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json={**body, "stream": True}, timeout=120) as r:
        chunks = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert streamed == text and chunks[-1]["choices"][0]["finish_reason"] == "stop"  # same seed, same text
    body["response_format"] = {"type": "json_object"}
    assert isinstance(json.loads(texts(post(server, "/v1/chat/completions", body))[0][0]), dict)


def test_running_out_of_tokens_mid_structure_is_length(server):
    body = {"prompt": "x", "max_tokens": 3, "json_schema": SCHEMA}  # llama.cpp's field
    text, finish = texts(post(server, "/v1/completions", body))[0]
    assert finish == "length" and text.startswith("{")


def test_generate_and_triton_fields(server):
    sp = {"max_completion_tokens": 12}
    for field, value, check in (
        ("regex", "[a-c]{3}", "[a-c]{3}"),
        ("ebnf", 'root ::= "k" [0-9]', "k[0-9]"),
        ("json_schema", json.dumps({"enum": ["on", "off"]}), '"(on|off)"'),
    ):
        r = post(server, "/generate", {"text": "go", "sampling_params": {**sp, field: value}})
        assert r.status_code == 200, r.text
        out = r.json()["responses"][0]["responses"][0]
        assert re.fullmatch(check, out["text"]) and out["finish_reason"] == "stop", (field, out)
    triton = {"text_input": "go", "max_tokens": 12, "return_finish_reason": True, "exclude_input_in_output": True}
    for kind, guide, check in (("regex", "[0-9]{4}", "[0-9]{4}"), ("json_schema", '{"enum": [1, 2]}', "[12]")):
        body = {**triton, "guided_decoding_guide_type": kind, "guided_decoding_guide": guide}
        r = post(server, f"/v2/models/{MODEL}/generate", body)
        assert r.status_code == 200 and re.fullmatch(check, r.json()["text_output"]), r.text
    r = post(server, f"/v2/models/{MODEL}/generate", {**triton, "guided_decoding_guide_type": "json"})
    assert r.json()["text_output"].startswith("{")  # (any object: the random model's keys run past 12 tokens)


@pytest.mark.parametrize(
    "body, param, words",
    [
        ({"guided_regex": "a(b"}, "guided_regex", ["unclosed group", "^"]),
        ({"guided_json": {"type": "objec"}}, "guided_json", ["Invalid type: objec"]),
        ({"json_schema": {"type": "string", "format": "foo"}}, "json_schema", ["Unknown format: foo"]),
        ({"grammar": 'root ::= "a" | b'}, "grammar", ["'b' not found"]),
        ({"guided_choice": []}, "guided_choice", ["non-empty list"]),
        ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice", ["give one constraint"]),
        ({"response_format": {"type": "xml"}}, "response_format.type", ["'xml' is not supported"]),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", ["schema"]),
        ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs.structural_tag", ["not supported"]),
    ],
)
def test_bad_constraints_are_400s_naming_the_problem(server, body, param, words):
    r = post(server, "/v1/completions", {"prompt": "x", "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and all(w in err["message"] for w in words), err


def test_bad_constraints_on_generate_and_triton(server):
    r = post(server, "/generate", {"text": "x", "sampling_params": {"regex": "(", "ebnf": "root ::= 'a'"}})
    assert r.status_code == 400 and "give one constraint" in r.json()["error"]
    r = post(server, "/generate", {"text": "x", "sampling_params": {"regex": "a{2"}})
    assert r.status_code == 400 and "regex" in r.json()["error"]
    body = {"text_input": "x", "max_tokens": 4, "guided_decoding_guide_type": "structural_tag"}
    r = post(server, f"/v2/models/{MODEL}/generate", body)
    assert r.status_code == 400 and "not supported" in r.json()["error"]


def test_top_k_program_refuses_constraints(server):
    """A program exported with --top-k returns K logits, which cannot be masked: a 400 that says so."""
    abi = server.engine.abi
    abi.top_k = 4
    try:
        r = post(server, "/v1/completions", {"prompt": "x", "max_tokens": 4, "guided_regex": "[0-9]"})
    finally:
        abi.top_k = None
    assert r.status_code == 400 and "without --top-k" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "guided_regex"


# -- compiling: cache and deadline -------------------------------------------------------------------------


def test_a_guide_in_error_allows_only_the_end_token():
    tok, _ = char_tokenizer()
    guide = Guides(tok, 128, [2]).guide(Constraint.of("regex", "[0-9]+"))
    assert guide.allows(tok.token_to_id("7")) and not guide.allows(tok.token_to_id("x"))
    guide.advance(tok.token_to_id("x"))  # (the sampler never does this: llguidance's error state)
    assert np.flatnonzero(allowed(guide.mask(128), 128)).tolist() == [2]


def test_compiled_constraints_are_cached_and_slow_ones_time_out(monkeypatch):
    tok, _ = char_tokenizer()
    guides = Guides(tok, 128, [2])
    c = Constraint.of("json_schema", {"type": "integer"})
    assert guides.compile(c) is guides.compile(Constraint.of("json_schema", '{"type": "integer"}'))
    a, b = guides.guide(c), guides.guide(c)
    a.advance(tok.token_to_id("7"))
    assert a.matcher is not b.matcher and b.matcher.is_accepting() is False  # each sequence its own state

    real = guides.compile

    def slow(constraint):
        time.sleep(0.5)
        return real(constraint)

    monkeypatch.setattr(guides, "compile", slow)
    with pytest.raises(ConstraintError, match="longer than 0.05 s"):
        asyncio.run(guides.prepare(Constraint.of("regex", "[0-9]+"), timeout=0.05))


# -- SmolLM2 through the openai client ---------------------------------------------------------------------


def _schemas() -> list[type]:
    """20 response formats as the openai client's `parse` takes them: nested objects, arrays, enums, bounded
    numbers, optional fields, anyOf. Strings, arrays and numbers are bounded so that a small model's answer
    ends: JSON allows a float any number of digits, and greedy SmolLM2 writes them on; a multipleOf bounds
    them (a power of two, which jsonschema checks exactly)."""
    from typing import Annotated, Literal

    from pydantic import BaseModel, Field

    S = Field(max_length=24)

    class Person(BaseModel):
        name: str = S
        age: int = Field(ge=0, le=120)

    class Point(BaseModel):
        x: float = Field(ge=-1000, le=1000, multiple_of=0.25)
        y: float = Field(ge=-1000, le=1000, multiple_of=0.25)

    class Pick(BaseModel):
        color: Literal["red", "green", "blue"]

    class Book(BaseModel):
        title: str = S
        author: str = S
        year: int = Field(ge=1000, le=2030)
        tags: list[str] = Field(max_length=3)

    class Address(BaseModel):
        street: str = S
        city: str = S
        zip: str = Field(pattern=r"^[0-9]{5}$")

    class Resident(BaseModel):
        name: str = S
        address: Address

    class Product(BaseModel):
        name: str = S
        price: float = Field(ge=0, le=10**6, multiple_of=0.25)
        discount: float | None = Field(ge=0, le=1, multiple_of=0.25)

    class Shape(BaseModel):
        kind: Literal["circle", "square"]
        size: int | str

    class Member(BaseModel):
        name: str = S
        role: Literal["lead", "dev", "qa"]

    class Team(BaseModel):
        members: list[Member] = Field(max_length=3)

    class Answer(BaseModel):
        yes: bool
        reason: str = Field(max_length=60)

    class Week(BaseModel):
        days: list[Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]] = Field(max_length=7)

    class Event(BaseModel):
        date: str = Field(pattern=r"^20[0-9]{2}-[01][0-9]-[0-3][0-9]$")
        attendees: int = Field(ge=1, le=1000)

    class Ingredient(BaseModel):
        name: str = S
        grams: int = Field(ge=1, le=5000)

    class Recipe(BaseModel):
        ingredients: list[Ingredient] = Field(max_length=4)
        steps: list[Annotated[str, Field(max_length=40)]] = Field(max_length=3)

    class Movie(BaseModel):
        title: str = S
        rating: float = Field(ge=0, le=10, multiple_of=0.5)
        genres: list[Literal["drama", "comedy", "action"]] = Field(max_length=3)

    class Place(BaseModel):
        lat: float = Field(ge=-90, le=90, multiple_of=0.125)
        lon: float = Field(ge=-180, le=180, multiple_of=0.125)

    class Contact(BaseModel):
        email: str = Field(pattern=r"^[a-z]{1,12}@[a-z]{1,12}\.com$")
        phone: str | None = Field(max_length=16)

    class Line(BaseModel):
        sku: str = Field(pattern=r"^[A-Z]{3}-[0-9]{3}$")
        qty: int = Field(ge=1, le=99)

    class Order(BaseModel):
        id: int = Field(ge=1)
        lines: list[Line] = Field(max_length=3)

    class Sentiment(BaseModel):
        label: Literal["positive", "negative", "neutral"]
        score: float = Field(ge=0, le=1, multiple_of=0.25)

    class Translation(BaseModel):
        source_language: str = S
        target_language: str = S
        text: str = Field(max_length=60)

    class Leaf(BaseModel):
        name: str = S
        children: list[Person] = Field(max_length=2)

    class Tree(BaseModel):
        name: str = S
        children: list[Leaf] = Field(max_length=2)

    class Flag(BaseModel):
        enabled: bool
        level: Literal[1, 2, 3]

    return [Person, Point, Pick, Book, Resident, Product, Shape, Team, Answer, Week, Event, Recipe, Movie, Place] + [
        Contact,
        Order,
        Sentiment,
        Translation,
        Tree,
        Flag,
    ]


@pytest.fixture(scope="module")
def smollm2_server(smollm2_f32_artifacts):
    from serve.core.engine import EngineConfig
    from tests.server_util import ServerThread

    art = smollm2_f32_artifacts
    cfg = EngineConfig(vmfb=art.vmfb, parameters=[art.irpa], model_config=art.config, tokenizer=art.dir)
    s = ServerThread(cfg)
    yield s
    s.stop()


@pytest.mark.slow
def test_smollm2_parse_20_schemas_streamed_and_not(smollm2_server):
    """The openai client's `parse` gets a valid object for 20 varied schemas, streamed and not, and every
    output validates against the schema the client sent (jsonschema)."""
    from concurrent.futures import ThreadPoolExecutor

    import openai
    from openai.lib._pydantic import to_strict_json_schema

    client = openai.OpenAI(base_url=smollm2_server.url + "/v1", api_key="x", max_retries=0, timeout=600)

    def ask(model: type) -> list[object]:
        messages = [{"role": "user", "content": f"Give me an example {model.__name__} as JSON."}]
        kw = {"model": "default", "messages": messages, "response_format": model, "max_tokens": 400}
        done = client.chat.completions.parse(temperature=0, **kw).choices[0]
        with client.chat.completions.stream(temperature=0.7, seed=1, **kw) as stream:
            streamed = stream.get_final_completion().choices[0]
        out = []
        for choice in (done, streamed):
            assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, model), choice
            value = json.loads(choice.message.content)
            jsonschema.validate(value, to_strict_json_schema(model))
            assert list(value) == list(model.model_fields)  # in the schema's order
            out.append(choice.message.parsed)
        return out

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(ask, _schemas()))
    assert len(results) == 20
