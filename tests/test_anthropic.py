"""Anthropic's Messages API (serve/frontends/anthropic_api.py) through the anthropic client: messages whole and
streamed, stop sequences, count_tokens, tool use forced and streamed, the tool round trip, thinking blocks,
and errors in Anthropic's shape."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator

import anthropic
import httpx
import jsonschema
import pytest

from serve.core.detokenizer import StopMatcher
from serve.frontends.anthropic_api import BlockStream, content_blocks
from serve.frontends.chat_output import Parts
from serve.frontends.tool_calls import ToolCall
from tests import server_util
from tests.server_util import TOOL_DESCRIPTIONS, TOOL_PARAMETERS, tools_server

TOOLS = [
    {"name": name, **({"description": d} if (d := TOOL_DESCRIPTIONS.get(name)) else {}), "input_schema": schema}
    for name, schema in TOOL_PARAMETERS.items()
]
SCHEMAS = TOOL_PARAMETERS
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
MODEL = "claude-any"  # (any name: the server serves one model)
# (the SDK has no sampling parameters any more; the server takes Anthropic's former temperature, top_p, top_k)
GREEDY = {"extra_body": {"temperature": 0}}


@pytest.fixture(scope="module")
def srv(tiny_program, tmp_path_factory):
    # (the tiny char vocabulary has no newline, which hermes' format needs: llama3's JSON calls do without)
    s = tools_server(tiny_program, tmp_path_factory.mktemp("template"), tool_call_parser="llama3")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(srv):
    return anthropic.Anthropic(base_url=srv.url, api_key="x", max_retries=0, timeout=120)


def text_of(message) -> str:
    return "".join(b.text for b in message.content if b.type == "text")


def blocks_of(message) -> list[dict]:
    """The content as sent (the stream's final message has the SDK's Parsed... blocks)."""
    return [b.model_dump(exclude={"parsed_output"}, exclude_none=True) for b in message.content]


def count(client, messages=ASK, **kw) -> int:
    return client.messages.count_tokens(model=MODEL, messages=messages, **kw).input_tokens


def greedy(client, max_tokens=20, **kw):
    return client.messages.create(model=MODEL, messages=ASK, max_tokens=max_tokens, **GREEDY, **kw)


def test_plain_message(client, srv):
    r = greedy(client, max_tokens=8)
    assert (r.type, r.role, r.model) == ("message", "assistant", MODEL) and r.id.startswith("msg_")
    assert [b.type for b in r.content] == ["text"] and r.content[0].text
    assert r.stop_reason in ("end_turn", "max_tokens") and r.stop_sequence is None
    if r.stop_reason == "max_tokens":
        assert r.usage.output_tokens == 8
    assert 1 <= r.usage.output_tokens <= 8
    # the prompt is the chat's: as /v1/chat/completions counts it, and as count_tokens does
    assert r.usage.input_tokens == count(client)
    body = {"messages": ASK, "max_tokens": 1}
    openai_usage = httpx.post(f"{srv.url}/v1/chat/completions", json=body, timeout=60).json()["usage"]
    assert r.usage.input_tokens == openai_usage["prompt_tokens"]
    assert r.usage.cache_read_input_tokens == 0 and r.usage.cache_creation_input_tokens == 0


def test_count_tokens_is_the_rendered_prompt(client, srv):
    r = httpx.post(f"{srv.url}/v1/messages/count_tokens", json={"model": MODEL, "messages": ASK}, timeout=60)
    assert r.status_code == 200 and r.json() == {"input_tokens": count(client)}
    # (char tokens: each character of the rendered prompt is one token)
    assert count(client, [{"role": "user", "content": "abc"}]) == count(client, [{"role": "user", "content": ""}]) + 3


def test_system_prompt_string_and_blocks(client):
    plain = count(client)
    as_string = count(client, system="Be brief.")
    as_blocks = count(client, system=[{"type": "text", "text": "Be brief."}])
    assert as_string == as_blocks == plain + len("<system>Be brief.")
    # several blocks are joined with a newline (one <unk> token in the tiny vocabulary)
    two = [{"type": "text", "text": "Be"}, {"type": "text", "text": "brief."}]
    assert count(client, system=two) == as_string
    r = client.messages.create(model=MODEL, messages=ASK, system=two, max_tokens=3, **GREEDY)
    assert r.usage.input_tokens == as_string


def test_stop_sequences(client):
    full = text_of(greedy(client))
    # two stop strings of the greedy text, the later one listed first: the earlier one stops it
    firsts = [k for k in range(1, len(full) - 1) if full.find(full[k : k + 2]) == k]
    assert len(firsts) >= 2, full
    early, late = firsts[0], firsts[-1]
    stops = ["~never~", full[late : late + 2], full[early : early + 2]]
    r = greedy(client, stop_sequences=stops)
    assert (r.stop_reason, r.stop_sequence) == ("stop_sequence", full[early : early + 2])
    assert text_of(r) == full[:early]
    with client.messages.stream(model=MODEL, messages=ASK, max_tokens=20, **GREEDY, stop_sequences=stops) as st:
        final = st.get_final_message()
    assert (final.stop_reason, final.stop_sequence, text_of(final)) == (r.stop_reason, r.stop_sequence, text_of(r))
    assert greedy(client, stop_sequences=["~never~"]).stop_sequence is None


def test_the_stop_matcher_names_the_stop_string():
    """The stop string that completes first as the text streams ends it, and is the one named (the earliest
    in the text; at a tie, the one listed first)."""
    for stops, text, name in (
        (["de", "bc", "cdef", "zz"], "abcdef", "bc"),
        (["cd", "c"], "abcdef", "c"),  # ("c" is whole a character earlier)
        (["bcd", "cd"], "abcdef", "bcd"),
        (["c", "cd"], "abcdef", "c"),
    ):
        matcher = StopMatcher(stops)
        emitted = "".join(matcher.feed(ch)[0] for ch in text)
        assert matcher.matched == name and emitted == text[: text.find(name)]


def test_streaming_equals_the_whole_message(client):
    whole = greedy(client)
    raw = list(client.messages.create(model=MODEL, messages=ASK, max_tokens=20, **GREEDY, stream=True))
    kinds = [e.type for e in raw]
    assert kinds[0] == "message_start" and kinds[1] == "content_block_start"
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(kinds[2:-3]) == {"content_block_delta"}
    start = raw[0].message
    assert start.stop_reason is None and start.content == [] and start.usage.input_tokens == whole.usage.input_tokens
    assert "".join(e.delta.text for e in raw if e.type == "content_block_delta") == text_of(whole)
    assert raw[-2].delta.stop_reason == whole.stop_reason and raw[-2].usage.output_tokens == whole.usage.output_tokens
    with client.messages.stream(model=MODEL, messages=ASK, max_tokens=20, **GREEDY) as st:
        assert "".join(st.text_stream) == text_of(whole)
        final = st.get_final_message()
    assert blocks_of(final) == blocks_of(whole) and final.stop_reason == whole.stop_reason
    assert final.usage.input_tokens == whole.usage.input_tokens
    assert final.usage.output_tokens == whole.usage.output_tokens


def test_stream_wire_format_and_disconnect(srv):
    body = {"model": MODEL, "messages": ASK, "max_tokens": 400, "stream": True}
    with httpx.stream("POST", f"{srv.url}/v1/messages", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = r.iter_lines()
        first = [next(lines) for _ in range(6)]
    assert first[0] == "event: message_start" and json.loads(first[1][len("data: ") :])["type"] == "message_start"
    assert first[3:5] == ["event: ping", 'data: {"type": "ping"}']
    # the client left: its sequence is cancelled, nothing stays queued or running
    deadline = time.time() + 30
    while sum(s.load for s in srv.engine.schedulers):
        assert time.time() < deadline, "the sequence of a closed stream still runs"
        time.sleep(0.05)


def test_consecutive_turns_are_one_turn(client):
    two = [{"role": "user", "content": "ab"}, {"role": "user", "content": [{"type": "text", "text": "cd"}]}]
    assert count(client, two) == count(client, [{"role": "user", "content": "ab\ncd"}])


def test_structured_output_and_the_context_limit(client):
    schema = {
        "type": "object",
        "properties": {"a": {"type": "integer"}},
        "required": ["a"],
        "additionalProperties": False,
    }
    r = client.messages.create(
        model=MODEL, messages=ASK, max_tokens=100, output_config={"format": {"type": "json_schema", "schema": schema}}
    )
    assert r.stop_reason == "end_turn"
    jsonschema.validate(json.loads(text_of(r)), schema)
    # a format that never ends before the context (512 tokens) does: not max_tokens
    endless = {"type": "string", "minLength": 1000}
    r = client.messages.create(
        model=MODEL, messages=ASK, max_tokens=1000, output_config={"format": {"type": "json_schema", "schema": endless}}
    )
    assert r.stop_reason == "model_context_window_exceeded"
    assert r.usage.input_tokens + r.usage.output_tokens == 512


@contextlib.contextmanager
def failing_steps(engine, after: int) -> Iterator[None]:
    """The engine's device calls fail from the `after`+1-th on (the scheduler fails the running sequences)."""
    calls = {"n": 0}
    for s in engine.schedulers:
        execute = s._execute

        def failing(*args, execute=execute):
            calls["n"] += 1
            if calls["n"] > after:
                raise RuntimeError("injected failure")
            return execute(*args)

        s._execute = failing
    try:
        yield
    finally:
        for s in engine.schedulers:
            del s._execute


def test_generation_failure_mid_stream_is_an_error_event(client, srv):
    kw = {"model": MODEL, "messages": ASK, "max_tokens": 20, **GREEDY}
    texts = []
    with failing_steps(srv.engine, after=3), pytest.raises(anthropic.APIStatusError) as e:
        for ev in client.messages.create(stream=True, **kw):
            if ev.type == "content_block_delta":
                texts.append(ev.delta.text)
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "api_error", e.value.body
    assert "generation failed" in e.value.body["error"]["message"]
    assert "".join(texts) == text_of(greedy(client))[: len("".join(texts))] and texts
    with failing_steps(srv.engine, after=0), pytest.raises(anthropic.InternalServerError) as e:
        client.messages.create(**kw)
    assert e.value.status_code == 500 and e.value.body["error"]["type"] == "api_error"


def check_tool_use(message, names) -> list:
    uses = [b for b in message.content if b.type == "tool_use"]
    assert message.stop_reason == "tool_use" and uses, message
    for b in uses:
        assert b.name in names and b.id.startswith("toolu_")
        jsonschema.validate(b.input, SCHEMAS[b.name])
    return uses


@pytest.mark.parametrize("choice", [{"type": "any"}, {"type": "tool", "name": "get_time"}])
def test_forced_tool_use(client, choice):
    names = {"get_weather", "get_time"} if choice["type"] == "any" else {"get_time"}
    for _ in range(2):
        r = client.messages.create(
            model=MODEL,
            messages=ASK,
            tools=TOOLS,
            tool_choice={**choice, "disable_parallel_tool_use": True},  # (the random model repeats calls)
            max_tokens=200,
        )
        assert len(check_tool_use(r, names)) == 1
        assert not text_of(r)


def test_streamed_tool_use(client):
    kw = {
        "model": MODEL,
        "messages": ASK,
        "tools": TOOLS,
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "max_tokens": 200,
        "extra_body": GREEDY["extra_body"],
    }
    whole = client.messages.create(**kw)
    raw = list(client.messages.create(stream=True, **kw))
    deltas = [e.delta for e in raw if e.type == "content_block_delta"]
    assert deltas and all(d.type == "input_json_delta" for d in deltas)
    starts = [e.content_block for e in raw if e.type == "content_block_start"]
    assert [(b.type, b.name, b.input) for b in starts] == [("tool_use", b.name, {}) for b in whole.content]
    with client.messages.stream(**kw) as st:
        final = st.get_final_message()
    uses = check_tool_use(final, {"get_weather", "get_time"})
    assert [(u.name, u.input) for u in uses] == [(b.name, b.input) for b in whole.content]


def test_tool_round_trip(client):
    forced = {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}
    call = client.messages.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=forced, **GREEDY, max_tokens=200)
    (use,) = check_tool_use(call, {"get_weather"})
    result = {"type": "tool_result", "tool_use_id": use.id, "content": '{"temp": 21}'}
    messages = [*ASK, {"role": "assistant", "content": call.content}, {"role": "user", "content": [result]}]
    r = client.messages.create(
        model=MODEL, messages=messages, tools=TOOLS, tool_choice={"type": "none"}, max_tokens=5, **GREEDY
    )
    assert r.stop_reason in ("max_tokens", "end_turn") and r.content
    # the prompt (char tokens) grew by the tools, the call in llama3's format and the result
    shown = json.dumps({"name": use.name, "parameters": use.input})
    tool_response = '<user><tool_response>\n{"temp": 21}\n</tool_response>'  # (a template with no tool role)
    added = "[get_weather,get_time]" + "<assistant>" + shown + tool_response
    assert count(client, messages, tools=TOOLS) == count(client) + len(added)
    # an error result says so; result text blocks are the same as a string
    errored = [*messages[:2], {"role": "user", "content": [{**result, "is_error": True}]}]
    assert count(client, errored, tools=TOOLS) == count(client) + len(added) + len("Error: ")
    blocks = [
        *messages[:2],
        {"role": "user", "content": [{**result, "content": [{"type": "text", "text": '{"temp": 21}'}]}]},
    ]
    assert count(client, blocks, tools=TOOLS) == count(client) + len(added)


def test_thinking_blocks(tiny_program, tmp_path_factory, client):
    """With --reasoning-parser deepseek_r1 an output that never closes </think> is all thinking."""
    plain = greedy(client)
    s = tools_server(tiny_program, tmp_path_factory.mktemp("template"), reasoning_parser="deepseek_r1")
    try:
        c = anthropic.Anthropic(base_url=s.url, api_key="x", max_retries=0, timeout=120)
        kw = {
            "model": MODEL,
            "messages": ASK,
            "max_tokens": 20,
            "extra_body": GREEDY["extra_body"],
            "thinking": {"type": "adaptive"},
        }
        r = c.messages.create(**kw)
        assert [b.type for b in r.content] == ["thinking"] and r.content[0].thinking == text_of(plain)
        with c.messages.stream(**kw) as st:
            final = st.get_final_message()
        assert blocks_of(final) == blocks_of(r)
    finally:
        s.stop()


def test_content_blocks_and_their_stream():
    parts = Parts("ab", "xyz", [ToolCall("f", '{"a": 1}', "call_1"), ToolCall("g", "{}", "call_2")])
    blocks = content_blocks(parts)
    assert blocks == [
        {"type": "thinking", "thinking": "ab", "signature": ""},
        {"type": "text", "text": "xyz"},
        {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": 1}},
        {"type": "tool_use", "id": "toolu_2", "name": "g", "input": {}},
    ]
    anthropic.types.Message.model_validate(  # (the SDK's own types take them)
        {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": MODEL,
            "content": blocks,
            "stop_reason": "tool_use",
            "stop_sequence": None,
            "usage": {"input_tokens": 1, "output_tokens": 2},
        }
    )
    # streamed in pieces: one block per kind, in order, each started, filled and stopped
    stream = BlockStream()
    sse = [
        *stream.feed(Parts("a", "", [])),
        *stream.feed(Parts("b", "x", [])),
        *stream.feed(Parts("", "yz", [])),
        *stream.feed(Parts(None, "", parts.calls)),
        *stream.close(),
    ]
    events = [json.loads(e.split("\ndata: ")[1]) for e in sse]
    assert all(e.startswith(f"event: {ev['type']}\n") and e.endswith("\n\n") for e, ev in zip(sse, events))
    shape = [(e["type"], e["index"]) for e in events]
    assert shape == [
        ("content_block_start", 0),
        ("content_block_delta", 0),
        ("content_block_delta", 0),
        ("content_block_stop", 0),
        ("content_block_start", 1),
        ("content_block_delta", 1),
        ("content_block_delta", 1),
        ("content_block_stop", 1),
        ("content_block_start", 2),
        ("content_block_delta", 2),
        ("content_block_stop", 2),
        ("content_block_start", 3),
        ("content_block_delta", 3),
        ("content_block_stop", 3),
    ]
    deltas = [e["delta"] for e in events if e["type"] == "content_block_delta"]
    assert (
        "".join(d.get("thinking", "") for d in deltas) == "ab" and "".join(d.get("text", "") for d in deltas) == "xyz"
    )
    assert [json.loads(d["partial_json"]) for d in deltas if d["type"] == "input_json_delta"] == [{"a": 1}, {}]
    assert stream.close() == []


def bad_request(call) -> str:
    with pytest.raises(anthropic.BadRequestError) as e:
        call()
    assert e.value.status_code == 400 and e.value.body["type"] == "error", e.value.body
    assert e.value.body["error"]["type"] == "invalid_request_error"
    return e.value.body["error"]["message"]


@pytest.mark.parametrize(
    "kw, says",
    [
        ({"max_tokens": anthropic.omit}, "max_tokens"),
        ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "image"),
        ({"system": [{"type": "document", "source": {}}]}, "document"),
        ({"messages": [{"role": "system", "content": "x"}]}, "role"),
        ({"tools": TOOLS, "tool_choice": {"type": "tool", "name": "nope"}}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "sometimes"}}, "tool_choice"),
        ({"tool_choice": {"type": "any"}}, "tool_choice"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "server tools"),
        ({"stop_sequences": [""]}, "stop_sequences"),
        ({"messages": [*ASK, {"role": "assistant", "content": "It is"}]}, "prefill"),
        (
            {
                "tools": TOOLS,
                "tool_choice": {"type": "any"},
                "output_config": {"format": {"type": "json_schema", "schema": {}}},
            },
            "output_config.format",
        ),
        ({"output_config": {"format": {"type": "json_schema", "schema": {"type": 3}}}}, "output_config.format"),
        ({"extra_body": {"temperature": -1}}, "temperature"),
    ],
)
def test_bad_requests(client, kw, says):
    message = bad_request(lambda: client.messages.create(**{"model": MODEL, "messages": ASK, "max_tokens": 4, **kw}))
    assert says in message, message


def test_bad_count_request(client):
    bad = [{"role": "user", "content": [{"type": "text", "text": "x"}, {"type": "image", "source": {}}]}]
    assert "messages.0.content.1" in bad_request(lambda: count(client, bad))


def test_not_ready_is_overloaded():
    with server_util.loading_client() as c:
        r = c.post("/v1/messages", json={"model": MODEL, "messages": ASK, "max_tokens": 4})
    assert r.status_code == 503 and r.headers["retry-after"]
    assert r.json() == {"type": "error", "error": {"type": "overloaded_error", "message": "loading the model"}}
