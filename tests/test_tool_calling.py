"""Tool calling and reasoning_content on chat completions, through the openai client: tool_choice forced
by the grammar, calls parsed into `tool_calls` (whole and streamed), the tool round trip, reasoning split.
The parsers themselves: tests/test_tool_parsers.py."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from tests.server_util import TOOL_DESCRIPTIONS, TOOL_PARAMETERS, ServerThread, tiny_config, tools_server

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": name,
            **({"description": d} if (d := TOOL_DESCRIPTIONS.get(name)) else {}),
            "parameters": schema,
        },
    }
    for name, schema in TOOL_PARAMETERS.items()
]
SCHEMAS = TOOL_PARAMETERS
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def llama3_server(tiny_program, tmp_path_factory):
    # (the tiny char vocabulary has no newline, which hermes' format needs: llama3's JSON calls do without)
    s = tools_server(tiny_program, tmp_path_factory.mktemp("template"), tool_call_parser="llama3")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(llama3_server):
    return openai.OpenAI(base_url=llama3_server.url + "/v1", api_key="x", max_retries=0, timeout=120)


def check_calls(calls, names) -> None:
    assert calls and all(c.type == "function" and c.id for c in calls)
    for c in calls:
        assert c.function.name in names
        jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_forced_tool_choice_gives_valid_calls(client, choice):
    names = {"get_weather", "get_time"} if choice == "required" else {"get_time"}
    for seed in range(3):
        r = client.chat.completions.create(
            model="tiny-llama",
            messages=ASK,
            tools=TOOLS,
            tool_choice=choice,
            parallel_tool_calls=False,  # (the random model may repeat calls past max_tokens)
            temperature=1.0,
            seed=seed,
            max_tokens=200,
        )
        c = r.choices[0]
        assert c.finish_reason == "tool_calls", c
        check_calls(c.message.tool_calls, names)
        assert c.message.content is None


def test_parallel_tool_calls_false_gives_one_call(client):
    for seed in range(3):
        r = client.chat.completions.create(
            model="tiny-llama",
            messages=ASK,
            tools=TOOLS,
            tool_choice="required",
            parallel_tool_calls=False,
            temperature=1.0,
            seed=seed,
            max_tokens=200,
        )
        assert len(r.choices[0].message.tool_calls) == 1


def test_streamed_tool_calls_equal_the_whole_answer(client):
    kw = {"model": "tiny-llama", "messages": ASK, "tools": TOOLS, "tool_choice": "required", "max_tokens": 200}
    whole = client.chat.completions.create(temperature=1.0, seed=11, **kw).choices[0]
    chunks = list(client.chat.completions.create(temperature=1.0, seed=11, stream=True, **kw))
    deltas = [d.tool_calls[0] for ch in chunks if (d := ch.choices[0].delta).tool_calls]
    assert not "".join(ch.choices[0].delta.content or "" for ch in chunks)
    assert [(d.function.name, d.function.arguments) for d in deltas] == [
        (t.function.name, t.function.arguments) for t in whole.message.tool_calls
    ]
    assert [d.index for d in deltas] == list(range(len(deltas))) and all(d.id for d in deltas)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # the SDK's own accumulation of the deltas
    with client.chat.completions.stream(temperature=1.0, seed=11, **kw) as stream:
        final = stream.get_final_completion().choices[0]
    check_calls(final.message.tool_calls, {"get_weather", "get_time"})


def test_tool_round_trip_renders_the_calls_and_results(client, llama3_server):
    call = (
        client.chat.completions.create(
            model="tiny-llama", messages=ASK, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=200
        )
        .choices[0]
        .message
    )
    messages = [
        *ASK,
        call.model_dump(exclude_none=True),
        *({"role": "tool", "tool_call_id": c.id, "content": '{"temp": 21}'} for c in call.tool_calls),
    ]
    r = client.chat.completions.create(
        model="tiny-llama", messages=messages, tools=TOOLS, tool_choice="none", max_tokens=5, temperature=0
    )
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.content
    # the prompt (char tokens) showed the tools, the call in the parser's format and the result
    body = {"messages": messages, "tools": TOOLS, "max_tokens": 1}
    shown = httpx.post(f"{llama3_server.url}/v1/chat/completions", json=body).json()["usage"]["prompt_tokens"]
    plain = client.chat.completions.create(model="tiny-llama", messages=ASK, max_tokens=1).usage.prompt_tokens
    calls = "; ".join(
        json.dumps({"name": c.function.name, "parameters": json.loads(c.function.arguments)}) for c in call.tool_calls
    )
    result = '<user><tool_response>\n{"temp": 21}\n</tool_response>'  # (a template that knows no tool role)
    added = "[get_weather,get_time]" + "<assistant>" + calls + result * len(call.tool_calls)
    assert shown == plain + len(added)


def test_special_tokens_reach_the_text_when_asked(client):
    """(Mistral's [TOOL_CALLS] is a special token: with tools, the server keeps such markers in the text.)"""
    kw = {"model": "tiny-llama", "prompt": "x", "max_tokens": 3, "temperature": 0, "logit_bias": {"1": 100}}
    assert client.completions.create(**kw).choices[0].text == ""
    kept = client.completions.create(**kw, extra_body={"skip_special_tokens": False})
    assert kept.choices[0].text == "<s><s><s>"


@pytest.mark.parametrize(
    "body, param",
    [
        ({"tools": [{"type": "function", "function": {"parameters": {}}}]}, "tools"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ],
)
def test_bad_tool_requests_are_400s(llama3_server, body, param):
    r = httpx.post(f"{llama3_server.url}/v1/chat/completions", json={"messages": ASK, "max_tokens": 2, **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_reasoning_content_split_whole_and_streamed(tiny_program):
    s = ServerThread(tiny_config(tiny_program), reasoning_parser="deepseek_r1")
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=120)
        # the regex makes the random model think "ab" and answer "xyz"
        kw = {"model": "tiny-llama", "messages": ASK, "max_tokens": 30, "extra_body": {"guided_regex": "ab</think>xyz"}}
        m = c.chat.completions.create(**kw).choices[0].message
        assert (m.reasoning_content, m.content) == ("ab", "xyz")
        chunks = list(c.chat.completions.create(stream=True, **kw))
        deltas = [ch.choices[0].delta for ch in chunks]
        assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "ab"
        assert "".join(d.content or "" for d in deltas) == "xyz"
    finally:
        s.stop()


# -- SmolLM2 -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_tool_round_trip(smollm2_f32_artifacts):
    """SmolLM2's template renders no tools: the server shows them in a system prompt (hermes' format) and
    forces the call with the grammar; the tool's result goes back as a `tool` message; the answer uses it."""
    from serve.core.engine import EngineConfig

    art = smollm2_f32_artifacts
    cfg = EngineConfig(vmfb=art.vmfb, parameters=[art.irpa], model_config=art.config, tokenizer=art.dir)
    s = ServerThread(cfg)
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=600)
        # (with parallel calls allowed, greedy SmolLM2 repeats its call until max_tokens)
        kw = {"model": "default", "tools": TOOLS, "max_tokens": 100, "temperature": 0, "parallel_tool_calls": False}
        for stream in (False, True):
            if stream:
                with c.chat.completions.stream(messages=ASK, tool_choice="required", **kw) as st:
                    first = st.get_final_completion().choices[0]
            else:
                first = c.chat.completions.create(messages=ASK, tool_choice="required", **kw).choices[0]
            assert first.finish_reason == "tool_calls", first
            check_calls(first.message.tool_calls, {"get_weather", "get_time"})
            named = c.chat.completions.create(
                messages=ASK, tool_choice={"type": "function", "function": {"name": "get_weather"}}, **kw
            ).choices[0]
            check_calls(named.message.tool_calls, {"get_weather"})
            assert "paris" in json.loads(named.message.tool_calls[0].function.arguments)["city"].lower()
            messages = [
                *ASK,
                named.message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": named.message.tool_calls[0].id, "content": "Sunny, 31 degrees C."},
            ]
            if stream:  # (tool_choice auto)
                with c.chat.completions.stream(messages=messages, **kw) as st:
                    final = st.get_final_completion().choices[0]
            else:
                final = c.chat.completions.create(messages=messages, **kw).choices[0]
            assert final.finish_reason == "stop" and final.message.tool_calls is None
            assert "31" in final.message.content or "sunny" in final.message.content.lower(), final.message.content
    finally:
        s.stop()
