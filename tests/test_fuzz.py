"""A bounded fuzz of the HTTP API (schemathesis over the app's OpenAPI schema) against a real server on the
tiny model: no generated request, valid or not, gets a 5xx, and afterwards the server is healthy, idle and
its KV pool empty.

The app's routes read their JSON bodies themselves (each front-end validates with its own pydantic model),
so /openapi.json lists their paths and path parameters but no request bodies. The fuzz adds each route's
body schema from the very model that route validates with (where the served schema declares a body, that
one is kept), then narrows the fields the server checks beyond their types (`valid_fields`: the ranges of
serve/core/sampling.py, token ids inside the vocabulary, the served model's names) so that a valid case
is one the server should serve: positive cases reach the engine (streamed or not, every protocol), and
negative cases break those same rules (plus wrong types, and bodies that are not JSON), which the server
must refuse with a 4xx. Generation is bounded: valid cases ask for at most MAX_TOKENS tokens per sequence,
a few sequences, short prompts; the server refuses more (--max-tokens-per-request). Deterministic:
hypothesis derandomized, no example database. Besides, a fixed corpus of hostile bodies per route
(`test_hostile_bodies`): what the generators do not make (lone surrogates in strings, byte-order marks).
"""

from __future__ import annotations

import copy
import json
import time
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from pydantic import BaseModel
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup

from serve.frontends.anthropic_api import CountRequest, MessagesRequest
from serve.frontends.app import create_app
from serve.frontends.generate_protocol import GenerateRequest
from serve.frontends.llama_cpp_api import CompletionRequest as LlamaCompletionRequest
from serve.frontends.openai_protocol import (
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    TokenizeRequest,
)
from serve.frontends.responses_api import ResponsesRequest
from serve.frontends.triton_api import ALIASES, VERSION, TritonGenerateRequest
from tests.server_util import ServerThread, tiny_config

MAX_TOKENS = 16  # completion tokens per sequence: valid cases' bound and the server's limit
EXAMPLES = {GenerationMode.POSITIVE: 30, GenerationMode.NEGATIVE: 15}  # per route with a body
EXAMPLES_NO_BODY = 6  # per route with path parameters only (GETs)

BODIES: dict[str, type[BaseModel]] = {
    "/generate": GenerateRequest,
    "/v1/completions": CompletionRequest,
    "/v1/chat/completions": ChatRequest,
    "/v1/embeddings": EmbeddingRequest,
    "/tokenize": TokenizeRequest,
    "/detokenize": DetokenizeRequest,
    "/completion": LlamaCompletionRequest,  # llama-server's own routes
    "/completions": LlamaCompletionRequest,
    "/infill": LlamaCompletionRequest,
    "/embedding": EmbeddingRequest,
    "/embeddings": EmbeddingRequest,
    "/apply-template": ChatRequest,
    "/v1/messages": MessagesRequest,  # Anthropic's
    "/v1/messages/count_tokens": CountRequest,
    "/v1/responses": ResponsesRequest,  # OpenAI's Responses
    **{
        f"/v2/models/{{name}}{version}/{kind}": TritonGenerateRequest
        for version in ("", "/versions/{version}")
        for kind in ("generate", "generate_stream")
    },
}


def _served_schema() -> dict[str, Any]:
    """The app's OpenAPI document as the server serves it (building it loads no engine)."""

    def never(report: Any) -> Any:
        raise AssertionError("not loaded for the schema")

    return create_app(never).openapi()


def _fuzzed() -> list[tuple[str, str, GenerationMode]]:
    """(method, path, mode) for every route a request can vary: with a body, valid and invalid ones; with
    path parameters only, valid ones (any string is a valid path parameter: there is nothing to break)."""
    out = []
    for path, methods in _served_schema()["paths"].items():
        for method, op in methods.items():
            if path in BODIES or op.get("requestBody"):
                out += [(method.upper(), path, mode) for mode in EXAMPLES]
            elif op.get("parameters"):
                out.append((method.upper(), path, GenerationMode.POSITIVE))
    return out


# Fields a valid case gives though the protocol does not require them: the server's defaults ask for more
# than MAX_TOKENS (chat: the rest of the context; /generate: 50), which it refuses; a chat message without
# content fails the template; /tokenize needs one of its three text fields (content here).
REQUIRED = {
    "ChatRequest": ["max_tokens"],
    "ChatMessage": ["content"],
    "GenerateRequest": ["sampling_params"],
    "GenerateSamplingParams": ["max_completion_tokens"],
    "TokenizeRequest": ["content"],
}


def valid_fields(vocab_size: int, model: str) -> dict[str, dict[str, dict[str, Any]]]:
    """Model name ("*": any) -> body field name -> the JSON schema of the field's valid values (the protocols
    share most names). Ranges are serve/core/sampling.py's (narrower where a wide value only costs time);
    fields the server refuses whatever their value (suffix, best_of, dimensions) are left out."""
    token = {"type": "integer", "minimum": 0, "maximum": vocab_size - 1}
    ids = {"type": "array", "items": token, "minItems": 1, "maxItems": 48}
    text = {"type": "string", "minLength": 1, "maxLength": 120}  # (the tiny model's tokenizer: a token a char)
    texts = {"type": "array", "items": text, "minItems": 1, "maxItems": 3}
    words = {"anyOf": [{"type": "string", "maxLength": 8}, {"type": "array", "items": text, "maxItems": 4}]}
    length = {"type": "integer", "minimum": 1, "maximum": MAX_TOKENS}
    penalty = {"type": "number", "minimum": -2, "maximum": 2}
    absent = {"not": {}}  # never generated (hypothesis-jsonschema leaves such a property out)
    common = {
        "model": {"anyOf": [{"enum": [model]}, {"type": "null"}]},
        "max_tokens": length,
        "max_completion_tokens": length,
        "max_output_tokens": length,
        "n_predict": {"anyOf": [length, {"enum": [-1]}]},
        "min_length": {"type": "integer", "minimum": 0, "maximum": MAX_TOKENS},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "min_p": {"type": "number", "minimum": 0, "maximum": 1},
        "top_k": {"type": "integer", "minimum": -1, "maximum": vocab_size},
        "repetition_penalty": {"type": "number", "minimum": 0.5, "maximum": 2},
        "presence_penalty": penalty,
        "frequency_penalty": penalty,
        "n": {"type": "integer", "minimum": 1, "maximum": 4},
        "stop": {"anyOf": [text, {"type": "array", "items": text, "maxItems": 4}, {"type": "null"}]},
        "stop_words": words,
        "bad_words": words,
        "stop_token_ids": {"type": "array", "items": token, "maxItems": 4},
        "end_id": {"anyOf": [token, {"enum": [-1]}, {"type": "null"}]},
        "pad_id": {"anyOf": [token, {"type": "null"}]},
        "logit_bias": {
            "type": "object",
            "propertyNames": {"pattern": f"^[0-9]{{1,{len(str(vocab_size - 1)) - 1}}}$"},  # ids below vocab
            "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
            "maxProperties": 4,
        },
        "prompt": {"anyOf": [text, texts, ids, {"type": "array", "items": ids, "minItems": 1, "maxItems": 3}]},
        "input": {"anyOf": [text, texts, ids, {"type": "array", "items": ids, "minItems": 1, "maxItems": 3}]},
        "text": {"anyOf": [text, texts]},
        "input_ids": {"anyOf": [ids, {"type": "array", "items": ids, "minItems": 1, "maxItems": 3}]},
        "text_input": text,
        "content": text,  # (tokenize's text, and a chat message's)
        "tokens": {"type": "array", "items": token, "maxItems": 48},
        "rid": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        "encoding_format": {"enum": ["float", "base64"]},
        "response_format": {"anyOf": [{"type": "null"}, {"enum": [{"type": "text"}]}]},
        "use_beam_search": {"enum": [False]},
        "num_beams": {"enum": [1]},
        "suffix": absent,
        # constraints: tests/test_structured.py checks them (an arbitrary regex or grammar is rightly a 400)
        **dict.fromkeys(
            ["structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar", "json_schema"]
            + ["grammar", "regex", "ebnf", "guided_decoding_guide_type", "guided_decoding_guide"]
            + ["tools", "tool_choice"],  # (tests/test_tool_calling.py)
            absent,
        ),
        "best_of": absent,
        "dimensions": absent,
    }
    return {"*": common, "TokenizeRequest": {"text": text, "prompt": text}}


def with_bodies(schema: dict[str, Any], vocab_size: int, model: str) -> dict[str, Any]:
    """`schema` with a JSON body on every POST route whose model we know and that declares none, its fields
    narrowed to their valid values; Triton's path parameters a served name and the one version."""
    fields = valid_fields(vocab_size, model)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for path, model_type in BODIES.items():
        op = schema["paths"].get(path, {}).get("post")
        if op is None or "requestBody" in op:
            continue
        body = model_type.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, sub in [(model_type.__name__, body), *body.pop("$defs", {}).items()]:
            valid = {**fields["*"], **fields.get(name, {})}
            for field in sub.get("properties", {}):
                if field in valid:
                    sub["properties"][field] = valid[field]
            sub["required"] = [*sub.get("required", []), *REQUIRED.get(name, [])]
            components[name] = sub
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model_type.__name__}"}}},
        }
        if path.startswith("/v2/models/"):
            names = {"name": [model, *ALIASES], "version": [VERSION]}
            for param in op.get("parameters", []):
                param["schema"] = {"enum": names[param["name"]]}
    _exactly_one(components["GenerateRequest"], "text", "input_ids")
    return schema


def _exactly_one(model: dict[str, Any], a: str, b: str) -> None:
    """A model that needs exactly one of two fields (the rule /generate checks after the schema's)."""
    variants = []
    for given_, left_out in ((a, b), (b, a)):
        v = copy.deepcopy(model)
        v["properties"].pop(left_out)
        v["required"] = [*v.get("required", []), given_]
        variants.append(v)
    model.clear()
    model["anyOf"] = variants


@pytest.fixture(scope="module")
def fuzz_server(tiny_program):
    s = ServerThread(tiny_config(tiny_program, max_queue=64, max_tokens_per_request=MAX_TOKENS))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    raw = httpx.get(f"{fuzz_server.url}/openapi.json", timeout=30).json()
    engine = fuzz_server.engine
    return schemathesis.openapi.from_dict(with_bodies(raw, engine.abi.vocab_size, engine.cfg.model_name))


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("method", "path", "mode"), _fuzzed(), ids=lambda x: str(x))
def test_no_server_errors(fuzz_server, api_schema, method, path, mode):
    """Every generated case is sent; all those answered with a 5xx are listed at the end."""
    op = api_schema[path][method]
    failures: list[str] = []

    @settings(
        max_examples=EXAMPLES[mode] if len(op.body) else EXAMPLES_NO_BODY,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: each failing case is recorded as found
        suppress_health_check=list(HealthCheck),
    )
    @given(case=op.as_strategy(generation_mode=mode))
    def fuzz(case: schemathesis.Case) -> None:
        response = case.call(base_url=fuzz_server.url, timeout=60)
        try:
            case.validate_response(response, checks=[not_a_server_error])
        except (AssertionError, FailureGroup):
            sent = response.request.body  # (as sent: a negative case's body may be bytes that are no JSON)
            failures.append(f"{method} {response.request.url} {sent!r} -> {response.status_code} {response.text}")

    fuzz()
    assert not failures, "\n".join(failures)


LONE_SURROGATE = "\ud800"  # valid JSON ("\\ud800"), but no Unicode text: a tokenizer cannot take it
# A minimal valid body per route (for the Triton routes, one of its spellings) with the text field(s) that
# reach the tokenizer (or the stop matcher) holding a lone surrogate: hypothesis never generates one.
TEXT_FIELDS: dict[str, list[dict[str, Any]]] = {
    "/generate": [{"text": LONE_SURROGATE}, {"text": "hi", "sampling_params": {"stop": LONE_SURROGATE}}],
    "/v1/completions": [{"prompt": LONE_SURROGATE}, {"prompt": "hi", "stop": LONE_SURROGATE}],
    "/v1/chat/completions": [{"messages": [{"role": "user", "content": LONE_SURROGATE}], "max_tokens": 2}],
    "/v1/embeddings": [{"input": LONE_SURROGATE}],
    "/tokenize": [{"content": LONE_SURROGATE}],
    "/completion": [
        {"prompt": LONE_SURROGATE},
        {"prompt": [1, LONE_SURROGATE]},
        {"prompt": "hi", "stop": LONE_SURROGATE},
    ],
    "/embedding": [{"content": LONE_SURROGATE}, {"input": [{"prompt_string": LONE_SURROGATE}]}],
    "/apply-template": [{"messages": [{"role": "user", "content": LONE_SURROGATE}]}],
    "/v1/messages": [{"messages": [{"role": "user", "content": LONE_SURROGATE}], "max_tokens": 2}],
    "/v1/responses": [{"input": LONE_SURROGATE, "max_output_tokens": 2}],
    "/detokenize": [],
    "/v2/models/ensemble/generate": [
        {"text_input": LONE_SURROGATE, "max_tokens": 2},
        {"text_input": "hi", "max_tokens": 2, "bad_words": LONE_SURROGATE},
        {"text_input": "hi", "max_tokens": 2, "stop_words": LONE_SURROGATE},
    ],
}
NOT_OBJECTS = [b"\xff", b"\xef\xbb\xbf{}", b"", b"{", b"[]", b"null", b'"x"', b"1e999", b'{"a": NaN}']


@pytest.mark.parametrize("route", list(TEXT_FIELDS))
def test_hostile_bodies(fuzz_server, route):
    """Bodies that are no UTF-8, no JSON or no JSON object: a 4xx each; strings that are no Unicode text: no
    5xx (a prompt should get a 4xx; a stop string that can never match may be taken)."""
    bodies = NOT_OBJECTS + [json.dumps(b).encode() for b in TEXT_FIELDS[route]]
    failures = []
    for body in bodies:
        r = httpx.post(fuzz_server.url + route, content=body, headers={"Content-Type": "application/json"}, timeout=60)
        if r.status_code >= 500 or (body in NOT_OBJECTS and not 400 <= r.status_code < 500):
            failures.append(f"POST {route} {body!r} -> {r.status_code} {r.text[:200]}")
    assert not failures, "\n".join(failures)


def test_healthy_after(fuzz_server):
    """Runs after the fuzz (this module's order): the server answers, is idle, and every page came back."""
    assert httpx.get(f"{fuzz_server.url}/health", timeout=30).status_code == 200
    deadline = time.monotonic() + 15
    while sum(s.used for s in fuzz_server.engine.pool_stats()) and time.monotonic() < deadline:
        time.sleep(0.1)  # (cancelled sequences give their pages back at the next step)
    assert [s.used for s in fuzz_server.engine.pool_stats()] == [0]
    assert all(not s.running and not s.waiting for s in fuzz_server.engine.schedulers)
    body = {"prompt": "hello", "max_tokens": 4, "ignore_eos": True}  # (sampled: EOS could come first)
    r = httpx.post(f"{fuzz_server.url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
