"""OpenAI's Responses API (serve/frontends/responses_api.py) through the openai client over the tiny program:
text, instructions and message lists, the streamed event grammar, text.format constraints, forced function
calls and the tool round trip, reasoning items, and the refusals."""

from __future__ import annotations

import json
import time

import httpx
import jsonschema
import openai
import pytest

from serve.core.scheduler import Event
from serve.frontends.chat_output import ChatOutput
from serve.frontends.responses_api import ResponsesRequest, Turn
from serve.frontends.tool_calls import pick_parser
from tests.server_util import TOOL_DESCRIPTIONS, TOOL_PARAMETERS, tools_server

TOOLS = [
    {
        "type": "function",
        "name": name,
        **({"description": d} if (d := TOOL_DESCRIPTIONS.get(name)) else {}),
        "parameters": schema,
        "strict": True,
    }
    for name, schema in TOOL_PARAMETERS.items()
]
SCHEMAS = TOOL_PARAMETERS
ASK = "What is the weather in Paris?"
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
JSON_SCHEMA = {"format": {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}}


@pytest.fixture(scope="module")
def server(tiny_program, tmp_path_factory):
    s = tools_server(tiny_program, tmp_path_factory.mktemp("template"), tool_call_parser="llama3")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)


def events_of(client, **kw) -> list:
    return list(client.responses.create(stream=True, **kw))


def check_grammar(events) -> None:
    """The stream's event order: lifecycle first and last, every item opened and closed in turn."""
    types = [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] in ("response.completed", "response.incomplete")
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    open_index = None
    for e in events[2:-1]:
        if e.type == "response.output_item.added":
            assert open_index is None
            open_index = e.output_index
        elif e.type == "response.output_item.done":
            assert e.output_index == open_index
            open_index = None
        else:
            assert e.output_index == open_index, e
    assert open_index is None


def test_plain_string_input(client):
    r = client.responses.create(model="any-name", input="Hi there", max_output_tokens=8, temperature=0)
    assert r.id.startswith("resp_") and r.object == "response" and r.model == "tiny-llama"
    assert r.status in ("completed", "incomplete")
    if r.status == "incomplete":
        assert r.incomplete_details.reason == "max_output_tokens" and r.usage.output_tokens == 8
    [message] = r.output
    assert message.type == "message" and message.role == "assistant"
    assert r.output_text == message.content[0].text and message.content[0].annotations == []
    u = r.usage
    assert u.total_tokens == u.input_tokens + u.output_tokens and u.output_tokens_details.reasoning_tokens == 0
    chat = client.chat.completions.create(
        model="x", messages=[{"role": "user", "content": "Hi there"}], max_tokens=8, temperature=0
    )
    assert u.input_tokens == chat.usage.prompt_tokens and r.output_text == chat.choices[0].message.content


def test_instructions_and_messages_render_as_the_chat(client):
    items = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Yo"}]},
        {"role": "user", "content": "Again"},
    ]
    r = client.responses.create(model="x", instructions="Sys.", input=items, max_output_tokens=6, temperature=0)
    messages = [
        {"role": "system", "content": "Sys."},
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Yo"},
        {"role": "user", "content": "Again"},
    ]
    chat = client.chat.completions.create(model="x", messages=messages, max_tokens=6, temperature=0)
    assert r.usage.input_tokens == chat.usage.prompt_tokens
    assert r.output_text == chat.choices[0].message.content


def test_streamed_events_and_text_equal_the_whole_response(client, server):
    kw = {"model": "x", "input": "Tell me", "max_output_tokens": 10, "temperature": 0}
    whole = client.responses.create(**kw)
    events = events_of(client, **kw)
    check_grammar(events)
    types = [e.type for e in events]
    assert types[2:5] == ["response.output_item.added", "response.content_part.added", "response.output_text.delta"]
    assert types[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text == next(e.text for e in events if e.type == "response.output_text.done")
    final = events[-1].response
    # (the second request finds the first's prompt in the prefix cache: only the cached count differs)
    assert final.status == whole.status and final.output_text == text
    assert final.usage.model_dump(exclude={"input_tokens_details"}) == whole.usage.model_dump(
        exclude={"input_tokens_details"}
    )
    assert final.id == events[0].response.id
    # the wire: `event: NAME` and `data: {json}` of the same type, a blank line after each
    body = {"input": "Tell me", "max_output_tokens": 2, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/responses", json=body, timeout=120) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        blocks = r.read().decode().split("\n\n")
    assert blocks[-1] == "" and len(blocks) > 3
    for block in blocks[:-1]:
        name, data = block.split("\n")
        assert name.startswith("event: ") and json.loads(data.removeprefix("data: "))["type"] == name[7:]


def test_json_schema_and_sdk_stream(client):
    kw = {"model": "x", "input": "A person", "max_output_tokens": 80, "temperature": 0.8, "extra_body": {"seed": 7}}
    r = client.responses.create(text=JSON_SCHEMA, **kw)
    assert r.status == "completed", r
    jsonschema.validate(json.loads(r.output_text), PERSON)
    with client.responses.stream(text=JSON_SCHEMA, **kw) as stream:
        final = stream.get_final_response()
    assert final.output_text == r.output_text  # (same seed)
    check_grammar(events_of(client, text=JSON_SCHEMA, **kw))
    r = client.responses.create(text={"format": {"type": "json_object"}}, **kw)
    if r.status == "completed":
        assert isinstance(json.loads(r.output_text), dict)
    else:  # (the random model's keys may run on)
        assert r.incomplete_details.reason == "max_output_tokens" and r.output_text.startswith("{")


@pytest.mark.parametrize("choice", ["required", {"type": "function", "name": "get_time"}])
def test_forced_function_call(client, choice):
    names = set(SCHEMAS) if choice == "required" else {"get_time"}
    kw = {"model": "x", "input": ASK, "tools": TOOLS, "tool_choice": choice, "parallel_tool_calls": False}
    kw |= {"max_output_tokens": 200, "temperature": 0}
    r = client.responses.create(**kw)
    assert r.status == "completed", r
    [call] = [o for o in r.output if o.type == "function_call"]
    assert call.name in names and call.call_id.startswith("call_") and call.id and call.status == "completed"
    jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
    events = events_of(client, **kw)
    check_grammar(events)
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    item = next(e.item for e in events if e.type == "response.output_item.done" and e.item.type == "function_call")
    assert args == done.arguments == item.arguments == call.arguments and item.name == call.name
    with client.responses.stream(**kw) as stream:
        final = stream.get_final_response()
    assert [(o.name, o.arguments) for o in final.output if o.type == "function_call"] == [(call.name, call.arguments)]


def test_tool_round_trip(client):
    kw = {"model": "x", "tools": TOOLS, "temperature": 0}
    first = client.responses.create(
        input=ASK, tool_choice="required", parallel_tool_calls=False, max_output_tokens=200, **kw
    )
    [call] = [o for o in first.output if o.type == "function_call"]
    items = [
        {"role": "user", "content": ASK},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": '{"temp": 21}'},
    ]
    r = client.responses.create(input=items, tool_choice="none", max_output_tokens=3, **kw)
    assert r.usage.input_tokens > first.usage.input_tokens and r.output_text
    # the same prompt as chat completions renders for the same conversation
    messages = [
        {"role": "user", "content": ASK},
        {
            "role": "assistant",
            "tool_calls": [
                {"id": call.call_id, "type": "function", "function": call.model_dump(include={"name", "arguments"})}
            ],
        },
        {"role": "tool", "tool_call_id": call.call_id, "content": '{"temp": 21}'},
    ]
    chat_tools = [{"type": "function", "function": {k: t[k] for k in ("name", "parameters")}} for t in TOOLS]
    chat = client.chat.completions.create(
        model="x", messages=messages, tools=chat_tools, tool_choice="none", max_tokens=1
    )
    assert r.usage.input_tokens == chat.usage.prompt_tokens


def cancelled_count(server) -> float:
    """The server's count of sequences that finished cancelled (/metrics)."""
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith("aotllm_requests_finished_total") and 'finish_reason="cancelled"' in line:
            return float(line.split()[-1])
    return 0.0


def test_a_client_leaving_the_stream_cancels_its_sequence(server):
    before = cancelled_count(server)
    body = {"input": "Tell me", "max_output_tokens": 400, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/responses", json=body, timeout=120) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i == 12:
                break  # leaves the stream: the connection closes
    deadline = time.time() + 30
    while cancelled_count(server) < before + 1 or any(s.load for s in server.engine.schedulers):
        assert time.time() < deadline, "the sequence was not cancelled"
        time.sleep(0.05)


@pytest.mark.parametrize(
    "kw, param",
    [
        ({"previous_response_id": "resp_123"}, "previous_response_id"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}]},
            "input[0].content[0]",
        ),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "objec"}}}}, "text.format.schema"),
        ({"text": JSON_SCHEMA, "tools": TOOLS, "tool_choice": "required"}, "text.format.schema"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]"),
    ],
)
def test_refusals_are_400s_naming_the_field(client, kw, param):
    kw = {"model": "x", "input": "Hi", "max_output_tokens": 2, **kw}
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(**kw)
    assert e.value.param == param, e.value
    if param == "previous_response_id":
        assert "send the whole conversation as `input`" in e.value.message


def test_reasoning_item_whole_and_streamed(tiny_program, tmp_path_factory):
    """With deepseek_r1, an output that never closes </think> is all reasoning (the random model's is)."""
    s = tools_server(tiny_program, tmp_path_factory.mktemp("template"), reasoning_parser="deepseek_r1")
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=120)
        kw = {"model": "x", "input": "Think", "max_output_tokens": 6, "temperature": 0}
        r = c.responses.create(**kw)
        [item] = r.output
        assert item.type == "reasoning" and item.status == "incomplete" and r.output_text == ""
        assert len(item.content[0].text) == 6 and r.usage.output_tokens_details.reasoning_tokens == 6
        events = events_of(c, **kw)
        check_grammar(events)
        text = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
        assert text == item.content[0].text == next(e.text for e in events if e.type == "response.reasoning_text.done")
    finally:
        s.stop()


class _Seq:
    prompt_ids = [1, 2, 3]
    output_ids: list[int] = []
    cached_tokens = 0


def test_reasoning_then_message_then_calls_in_order():
    """The Turn alone: parts become items in order (reasoning, message, calls) whatever the deltas."""
    req = ResponsesRequest(input="x")
    turn = Turn("resp_1", "m", req, _Seq(), ChatOutput(pick_parser("llama3", None), "deepseek_r1"))  # type: ignore[arg-type]
    call = '{"name": "get_time", "parameters": {"zone": "UTC"}}'
    events = turn.start()
    for i, piece in enumerate(["a", "b</th", "ink>", "Hello ", "<|python_tag|>" + call]):
        events += turn.feed(Event(text=piece, token_ids=[i], finish_reason="stop" if i == 4 else None))
    out = turn.response()["output"]
    assert [o["type"] for o in out] == ["reasoning", "message", "function_call"]
    assert out[0]["content"][0]["text"] == "ab" and out[1]["content"][0]["text"] == "Hello"
    assert json.loads(out[2]["arguments"]) == {"zone": "UTC"} and out[2]["name"] == "get_time"
    assert turn.usage()["output_tokens_details"]["reasoning_tokens"] == 2
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[-1]["type"] == "response.completed" and turn.status == "completed"


def test_a_failed_generation_ends_the_stream_with_error_and_failed():
    turn = Turn("resp_1", "m", ResponsesRequest(input="x"), _Seq(), ChatOutput(None, None))  # type: ignore[arg-type]
    events = turn.start() + turn.feed(Event(text="ab", token_ids=[1]))
    events += turn.feed(Event(finish_reason="error", error="boom"))
    assert [e["type"] for e in events][-2:] == ["error", "response.failed"]
    assert events[-2]["message"] == "generation failed: boom" and events[-1]["response"]["status"] == "failed"
    assert events[-1]["response"]["error"] == {"code": "server_error", "message": "generation failed: boom"}
