"""serve/frontends/tool_calls.py and reasoning.py: model outputs parsed into tool calls (whole and streamed),
the grammars that force a call (over SmolLM2's tokenizer), parser choice, `tools` validation, and
reasoning_content splitting. No model, no server."""

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serve.frontends.reasoning import ReasoningSplitter, split_reasoning
from serve.frontends.tool_calls import (
    PARSERS,
    FunctionTool,
    HermesParser,
    Llama3Parser,
    MistralParser,
    ToolCall,
    ToolError,
    ToolParser,
    ToolStream,
    forced_tools,
    pick_parser,
    tools_system_prompt,
)

WEATHER = {"city": "Paris", "days": 3}
NESTED = {"text": 'Grüße, 世界 🌍 "quoted"', "options": {"formal": True, "targets": ["ja", "fr"], "n": None}}


def calls_of(parser: ToolParser, text: str) -> tuple[str | None, list[tuple[str, object]]]:
    content, calls = parser.parse(text)
    return content, [(c.name, json.loads(c.arguments)) for c in calls]


# (output, content, [(name, arguments)]); content is the output itself where it does not parse as calls
LLAMA3 = [
    ('{"name": "get_weather", "parameters": {"city": "Paris", "days": 3}}', None, [("get_weather", WEATHER)]),
    (
        '<|python_tag|>{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}',
        None,
        [("get_weather", WEATHER)],
    ),
    ('\n\n{"type": "function", "name": "get_weather", "parameters": {}}', None, [("get_weather", {})]),
    (
        '{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {"y": [2]}}',
        None,
        [("a", {"x": 1}), ("b", {"y": [2]})],
    ),
    ('{"name": "a", "parameters": {}}\n{"name": "b", "parameters": {}}', None, [("a", {}), ("b", {})]),
    ('{"name": "translate", "parameters": ' + json.dumps(NESTED) + "}", None, [("translate", NESTED)]),
    ("Let me look.<|python_tag|>" + '{"name": "f", "parameters": {}}', "Let me look.", [("f", {})]),
    (
        '<|python_tag|>brave_search.call(query="weather in Menlo Park", n=2)',
        None,
        [("brave_search", {"query": "weather in Menlo Park", "n": 2})],
    ),
    ("The capital of France is Paris.", "The capital of France is Paris.", []),
]
LLAMA3_BAD = [
    '{"name": "get_weather", "parameters": {"city": "Par',  # truncated
    '{"name": "get_weather", "parameters": "city=Paris"}',  # arguments not an object
    '{"answer": 42}',  # a JSON answer, not a call
    '{"name": "f", "parameters": {}, "parameters2": {}}',
    '{"name": "f", "parameters": {}} and then some words',
    "<|python_tag|>import os; os.system('ls')",
    "<|python_tag|>brave_search.call(q=open('x'))",
    "<|python_tag|>brave_search.call(query=",
    '{"name": "f", "parameters": {"x": NaN}}',
]
HERMES = [
    (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>',
        None,
        [("get_weather", WEATHER)],
    ),
    (
        '<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n'
        '<tool_call>\n{"name": "b", "arguments": {"y": "z"}}\n</tool_call>',
        None,
        [("a", {"x": 1}), ("b", {"y": "z"})],
    ),
    (
        "I'll check the weather for you.\n\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>\n',
        "I'll check the weather for you.",
        [("get_weather", WEATHER)],
    ),
    (
        '<tool_call>\n{"name": "translate", "arguments": ' + json.dumps(NESTED, ensure_ascii=False) + "}\n</tool_call>",
        None,
        [("translate", NESTED)],
    ),
    ('<tool_call>\n{"name": "f", "arguments": {"k": "v"}}', None, [("f", {"k": "v"})]),  # no </tool_call>
    (  # Hermes 2 Pro's Python dicts
        "<tool_call>\n{'arguments': {'symbol': 'TSLA', 'all': True}, 'name': 'get_stock'}\n</tool_call>",
        None,
        [("get_stock", {"symbol": "TSLA", "all": True})],
    ),
    ("Plain answer, no tools.", "Plain answer, no tools.", []),
]
HERMES_BAD = [
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par',  # truncated, no </tool_call>
    '<tool_call>\n{"name": "get_weather", "arguments": ["Paris"]}\n</tool_call>',
    "<tool_call>\nget_weather(city='Paris')\n</tool_call>",
    '<tool_call>\n{"arguments": {}}\n</tool_call>',
    '<tool_call>\n{"name": "f", "arguments": {}}\n<tool_call>\n{"name": "g", "arguments": {}}\n</tool_call>',
    '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>\nAnd some more text.',
    "Use <tool_call> tags to call tools.",
    "<tool_call>\n{'name': 'f', 'arguments': {'when': b'now'}}\n</tool_call>",
    "<tool_call>\n{'name': 'f', 'arguments': {'x': open('y')}}\n</tool_call>",
]
MISTRAL = [
    (
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}]',
        None,
        [("get_weather", WEATHER)],
    ),
    (
        '[TOOL_CALLS][{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": ' + json.dumps(NESTED) + "}]",
        None,
        [("a", {"x": 1}), ("b", NESTED)],
    ),
    ('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "days": 3}', None, [("get_weather", WEATHER)]),
    (
        '[TOOL_CALLS]a[ARGS]{"x": 1}[TOOL_CALLS]b[ARGS]{"y": "é"}',
        None,
        [("a", {"x": 1}), ("b", {"y": "é"})],
    ),
    ('[TOOL_CALLS]f[CALL_ID]a1b2c3d4e[ARGS]{"x": 1}', None, [("f", {"x": 1})]),
    ('Sure. [TOOL_CALLS] [{"name": "f", "arguments": {}}]', "Sure.", [("f", {})]),
    ("Paris is the capital.", "Paris is the capital.", []),
]
MISTRAL_BAD = [
    '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Par',
    "[TOOL_CALLS] []",
    '[TOOL_CALLS] [{"name": "f", "arguments": "x=1"}]',
    '[TOOL_CALLS] {"name": "f", "arguments": {}}',
    "[TOOL_CALLS]get_weather[ARGS]not json",
    '[TOOL_CALLS] [{"name": "f", "arguments": {}}] trailing words',
]
CASES = {"llama3": (Llama3Parser, LLAMA3, LLAMA3_BAD), "hermes": (HermesParser, HERMES, HERMES_BAD)}
CASES["mistral"] = (MistralParser, MISTRAL, MISTRAL_BAD)


@pytest.mark.parametrize("name", CASES)
def test_parse_recorded_outputs(name):
    parser_cls, good, bad = CASES[name]
    parser = parser_cls()
    for text, content, calls in good:
        assert calls_of(parser, text) == (content, calls), text
    for text in bad:
        assert parser.parse(text) == (text, []), text


def test_call_ids_and_openai_shape():
    (call,) = HermesParser().parse(HERMES[0][0])[1]
    assert call.id.startswith("call_") and len(call.id) == 29
    assert call.openai() == {
        "id": call.id,
        "type": "function",
        "function": {"name": "get_weather", "arguments": call.arguments},
    }
    assert json.loads(call.arguments) == WEATHER
    # Mistral's templates insist on 9-letter-and-digit ids: a model's own is kept, others made so
    (kept,) = MistralParser().parse('[TOOL_CALLS][{"name": "f", "arguments": {}, "id": "Ab3dE6gH9"}]')[1]
    (made,) = MistralParser().parse('[TOOL_CALLS][{"name": "f", "arguments": {}, "id": "x"}]')[1]
    assert kept.id == "Ab3dE6gH9" and len(made.id) == 9 and made.id.isalnum()
    args_form = MistralParser(args_form=True).render_calls([ToolCall("f", '{"x":1}'), ToolCall("g", "{}")])
    assert args_form == '[TOOL_CALLS]f[ARGS]{"x": 1}[TOOL_CALLS]g[ARGS]{}'
    assert ToolCall.from_openai([call.openai()]) == [call]
    with pytest.raises(ToolError, match=r"tool_calls\[0\]"):
        ToolCall.from_openai([{"function": {"arguments": "{}"}}])


@pytest.mark.parametrize("name", CASES)
def test_render_calls_parses_back(name):
    parser = CASES[name][0]()
    calls = [ToolCall("get_weather", json.dumps(WEATHER)), ToolCall("translate", json.dumps(NESTED))]
    text = parser.render_calls(calls)
    assert [(c.name, json.loads(c.arguments)) for c in parser.parse(text)[1]] == [
        ("get_weather", WEATHER),
        ("translate", NESTED),
    ]


def stream(parser: ToolParser, deltas: list[str]) -> tuple[str, list[tuple[str, str]]]:
    ts = ToolStream(parser)
    streamed = ""
    for d in deltas:
        out = ts.feed(d)
        assert not any(m in out for m in parser.markers)
        streamed += out
    rest, calls = ts.finish()
    return streamed + rest, [(c.name, c.arguments) for c in calls]


def parsed(parser: ToolParser, text: str) -> tuple[str, list[tuple[str, str]]]:
    content, calls = parser.parse(text)
    return content or "", [(c.name, c.arguments) for c in calls]


@pytest.mark.parametrize("name", CASES)
def test_stream_every_split_point_matches_parse(name):
    parser_cls, good, bad = CASES[name]
    parser = parser_cls()
    for text in [t for t, _, _ in good] + bad + ["  Hi there <tool", "{", "<|python_tag|>", "Hello [TOOL_CALLS"]:
        expect = parsed(parser, text)
        assert stream(parser, list(text)) == expect, text
        for i in range(len(text) + 1):
            assert stream(parser, [text[:i], text[i:]]) == expect, (text, i)


def test_stream_sends_content_before_a_call():
    ts = ToolStream(HermesParser())
    assert ts.feed("The weather ") == "The weather"
    assert ts.feed("in Paris:\n<tool") == " in Paris:"
    assert ts.feed('_call>\n{"name": "f", "arguments": {}}\n</tool_call>') == ""
    assert ts.finish()[0] == "" and [c.name for c in ts.finish()[1]] == ["f"]
    ts = ToolStream(Llama3Parser())
    assert ts.feed(" {") == "" and ts.feed('"answer": 1}') == ""
    assert ts.finish() == (' {"answer": 1}', [])  # not a call after all: all of it is content


@settings(max_examples=150, deadline=None)
@given(st.sampled_from([(p, t) for p, good, bad in CASES.values() for t in [g[0] for g in good] + bad]), st.data())
def test_stream_any_split_matches_parse(case, data):
    parser_cls, text = case
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=8)))
    deltas = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    assert stream(parser_cls(), deltas) == parsed(parser_cls(), text)


FRAGMENTS = ["<tool_call>", "</tool_call>", "<|python_tag|>", "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]", "{", "}", "[", "]"]
FRAGMENTS += ['"name": ', '"arguments": ', '"parameters": ', '"f"', "{}", ", ", ";", "\n", " ", "x", "é", "NaN"]
FRAGMENTS += ["f.call(", "q=", '"v"', ")", "Hi. "]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(CASES)), st.lists(st.sampled_from(FRAGMENTS), max_size=14), st.data())
def test_parse_never_raises_and_stream_agrees(name, pieces, data):
    parser, text = CASES[name][0](), "".join(pieces)
    content, calls = parser.parse(text)
    assert calls or content == text
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=6)))
    deltas = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    assert stream(parser, deltas) == parsed(parser, text)


def test_pick_parser():
    assert isinstance(pick_parser(None, "{{- '<tool_call>\\n' }}{{ tool_call | tojson }}"), HermesParser)
    assert isinstance(pick_parser("auto", "{% if message.role == 'ipython' %}"), Llama3Parser)
    assert isinstance(pick_parser(None, "{{- '<|python_tag|>' + tool_call.name }}"), Llama3Parser)
    mistral = pick_parser(None, "{{- '[TOOL_CALLS]' + tool_calls | tojson }}")
    assert isinstance(mistral, MistralParser) and not mistral.args_form
    mistral = pick_parser(None, "{{ '[TOOL_CALLS]' + name + '[ARGS]' }}")
    assert isinstance(mistral, MistralParser) and mistral.args_form
    assert isinstance(pick_parser(None, None), HermesParser) and isinstance(pick_parser(None, "chatml"), HermesParser)
    assert isinstance(pick_parser("llama3", "<tool_call>"), Llama3Parser)
    with pytest.raises(ValueError, match="llama3, hermes, mistral"):
        pick_parser("pythonic", None)
    assert set(PARSERS) == {"llama3", "hermes", "mistral"}


def test_function_tool_from_openai():
    tools = FunctionTool.from_openai(
        [
            {"type": "function", "function": {"name": "f", "description": "F.", "parameters": {"type": "object"}}},
            {"type": "function", "function": {"name": "g"}},
        ]
    )
    assert tools == [
        FunctionTool("f", "F.", {"type": "object"}),
        FunctionTool("g", None, {"type": "object", "properties": {}}),
    ]
    bad = [
        ({"tools": "x"}, "tools: expected a list"),
        ([{"type": "function", "function": {"description": "no name"}}], r"tools\[0\]\.function\.name"),
        ([{"type": "function", "function": {"name": "f"}}, {"type": "retrieval"}], r"tools\[1\]: only .*'function'"),
        ([{"type": "function", "function": {"name": "f", "parameters": []}}], r"tools\[0\]\.function\.parameters"),
        ([{"type": "function", "function": {"name": "f", "description": 3}}], r"tools\[0\]\.function\.description"),
        ([{"type": "function", "function": {"name": "f"}}] * 2, r"tools\[1\].*'f' is defined twice"),
    ]
    for value, message in bad:
        with pytest.raises(ToolError, match=message):
            FunctionTool.from_openai(value)


def test_forced_tools():
    f, g = FunctionTool("f", None, {}), FunctionTool("g", None, {})
    assert forced_tools([f, g], None) is None and forced_tools([f, g], "auto") is None
    assert forced_tools([f, g], "none") is None
    assert forced_tools([f, g], "required") == [f, g]
    assert forced_tools([f, g], {"type": "function", "function": {"name": "g"}}) == [g]
    for choice, message in [("required", "needs at least one"), ("sometimes", "expected 'none'")]:
        with pytest.raises(ToolError, match=message):
            forced_tools([], choice)
    with pytest.raises(ToolError, match="'h' is not one of tools"):
        forced_tools([f], {"type": "function", "function": {"name": "h"}})


def test_tools_system_prompt_shows_tools_and_format():
    tools = FunctionTool.from_openai([{"type": "function", "function": {"name": "get_weather", "description": "Now."}}])
    for parser in (HermesParser(), Llama3Parser(), MistralParser(), MistralParser(args_form=True)):
        prompt = tools_system_prompt(tools, parser)
        assert '"name": "get_weather"' in prompt and '"description": "Now."' in prompt
        example = parser.render_calls([ToolCall("function_name", '{"argument": "value"}')])
        assert example in prompt and parser.parse(example)[1]


# Grammars, over SmolLM2's tokenizer

TOKENIZER = Path("/root/.cache/aotllm/artifacts/d161fd426ab4723ff7168b54/tokenizer.json")
TOOLS = FunctionTool.from_openai(
    [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather at http://example.com # forecasts",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}, "days": {"$ref": "#/$defs/days"}},
                    "required": ["city"],
                    "$defs": {"days": {"type": "integer", "minimum": 1}},
                },
            },
        },
        {"type": "function", "function": {"name": "wörld_time", "parameters": {"type": "object", "properties": {}}}},
    ]
)
GRAMMAR_PARSERS = [Llama3Parser(), HermesParser(), MistralParser(), MistralParser(args_form=True)]
GRAMMAR_IDS = ["llama3", "hermes", "mistral", "mistral-args"]


@pytest.fixture(scope="module")
def tokenizer_json() -> str:
    pytest.importorskip("llguidance")
    if not TOKENIZER.exists():
        pytest.skip(f"{TOKENIZER} (SmolLM2's tokenizer) is not here")
    return TOKENIZER.read_text()


@pytest.fixture(scope="module")
def tok(tokenizer_json):
    import llguidance

    return llguidance.LLTokenizer(tokenizer_json, eos_token=2)


def accepts(tok, grammar: str, text: str) -> bool:
    import llguidance

    m = llguidance.LLMatcher(tok, llguidance.LLMatcher.grammar_from_lark(grammar), log_level=0)
    assert not m.is_error(), m.get_error() + "\n" + grammar
    ids = tok.tokenize_str(text)
    return m.try_consume_tokens(ids) == len(ids) and m.is_accepting()


def call(name: str, args: object) -> ToolCall:
    return ToolCall(name, json.dumps(args, ensure_ascii=False))


@pytest.mark.parametrize("parser", GRAMMAR_PARSERS, ids=GRAMMAR_IDS)
def test_grammar_accepts_valid_calls_only(tok, parser):
    single, parallel = parser.grammar(TOOLS, parallel=False), parser.grammar(TOOLS, parallel=True)
    good = [call("get_weather", {"city": "Paris", "days": 3}), call("get_weather", {"city": "Zürich 東京"})]
    good += [call("wörld_time", {})]
    for c in good:
        text = parser.render_calls([c])
        assert accepts(tok, single, text) and accepts(tok, parallel, text), text
        assert parser.parse(text)[1][0].name == c.name
    bad = [
        call("get_wether", {"city": "Paris"}),  # no such tool
        call("get_weather", {"city": "Paris", "days": "3"}),  # wrong type
        call("get_weather", {"city": "Paris", "days": 0}),  # below the minimum
        call("get_weather", {"days": 3}),  # missing required
    ]
    for c in bad:
        assert not accepts(tok, single, parser.render_calls([c])), c
    two = parser.render_calls(good[:2])
    assert not accepts(tok, single, two) and accepts(tok, parallel, two)
    three = parser.render_calls(good)
    assert accepts(tok, parallel, three) and not accepts(tok, parallel, three[:-1])
    assert not accepts(tok, single, "The weather in Paris is sunny.")


def test_grammar_matches_recorded_spacing(tok):
    """What the models write, not only what render_calls writes."""
    hermes = HermesParser().grammar(TOOLS, parallel=True)
    qwen = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>'
    assert accepts(tok, hermes, qwen) and accepts(tok, hermes, qwen + "\n" + qwen)
    assert accepts(tok, hermes, qwen.replace('{"city": "Paris", "days": 3}', '{"city":"Paris","days":3}'))
    assert not accepts(tok, hermes, qwen.replace('{"city"', "{" + " " * 40 + '"city"'))  # whitespace is bounded
    llama = Llama3Parser().grammar(TOOLS, parallel=False)
    assert accepts(tok, llama, '{"name": "get_weather", "parameters": {"city": "Paris"}}')
    assert not accepts(tok, llama, '{"name": "get_weather", "arguments": {"city": "Paris"}}')


def test_grammar_uses_token_ids_for_added_tokens(tokenizer_json):
    """Qwen's <tool_call> is an added token: llguidance does not match it against the literal text, so
    the grammar must name the token."""
    import llguidance

    tj = json.loads(tokenizer_json)
    n = len(tj["model"]["vocab"])
    for i, text in enumerate(["<tool_call>", "</tool_call>"]):
        tj["added_tokens"].append(
            {"id": n + i, "content": text, "single_word": False, "lstrip": False, "rstrip": False}
            | {"normalized": False, "special": False}
        )
    qwen_tok = llguidance.LLTokenizer(json.dumps(tj), eos_token=2)
    text = HermesParser().render_calls([call("wörld_time", {})])
    assert not accepts(qwen_tok, HermesParser().grammar(TOOLS, parallel=False), text)
    ids = {"<tool_call>": n, "</tool_call>": n + 1}
    assert accepts(qwen_tok, HermesParser().grammar(TOOLS, parallel=False, token_ids=ids), text)


# reasoning_content

REASONING = [
    # (kind, output, reasoning, content)
    ("deepseek_r1", "Let me think.\n</think>\n\nParis.", "Let me think.\n", "Paris."),
    ("deepseek_r1", "<think>\nHmm.</think>Paris.", "\nHmm.", "Paris."),
    ("deepseek_r1", "  <think>Hmm.</think>\n", "Hmm.", None),
    ("deepseek_r1", "Still thinking when max_tokens hit", "Still thinking when max_tokens hit", None),
    ("deepseek_r1", "</think>\n\nJust the answer.", None, "Just the answer."),
    ("deepseek_r1", "a</think>b</think>c", "a", "b</think>c"),
    ("deepseek_r1", "", None, None),
    ("qwen3", "<think>\nThe user asks.\n</think>\n\nParis.", "\nThe user asks.\n", "Paris."),
    ("qwen3", "\n<think>x</think>\n\n\n", "x", None),
    ("qwen3", "<think>\n\n</think>\n\nNo thinking.", "\n\n", "No thinking."),
    ("qwen3", "Paris, without thinking.", None, "Paris, without thinking."),
    ("qwen3", "Answer </think> stray", None, "Answer </think> stray"),
    ("qwen3", "<think>cut off by max_tokens", "cut off by max_tokens", None),  # (vLLM: all content)
    ("qwen3", "<thin", None, "<thin"),
]


@pytest.mark.parametrize(("kind", "text", "reasoning", "content"), REASONING)
def test_split_reasoning(kind, text, reasoning, content):
    assert split_reasoning(kind, text) == (reasoning, content)


def reasoning_stream(kind: str, deltas: list[str]) -> tuple[str | None, str | None]:
    splitter, reasoning, content = ReasoningSplitter(kind), "", ""
    for d in [*deltas, None]:
        r, c = splitter.feed(d) if d is not None else splitter.finish()
        reasoning, content = reasoning + r, content + c
    return reasoning or None, content or None


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(["deepseek_r1", "qwen3"]),
    st.lists(st.sampled_from(["<think>", "</think>", "<", "</", "think", ">", "\n", " ", "a", "é", "<th"]), max_size=12)
    | st.sampled_from([t for _, t, _, _ in REASONING]).map(lambda t: [t]),
    st.data(),
)
def test_reasoning_stream_matches_split(kind, pieces, data):
    text = "".join(pieces)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=10)))
    deltas = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    assert reasoning_stream(kind, deltas) == split_reasoning(kind, text)


def test_reasoning_stream_sends_as_it_comes():
    s = ReasoningSplitter("qwen3")
    assert s.feed("<thi") == ("", "") and s.feed("nk>\nStep one") == ("\nStep one", "")
    assert s.feed(" done.</th") == (" done.", "") and s.feed("ink>\n") == ("", "")
    assert s.feed("\nParis") == ("", "Paris") and s.finish() == ("", "")
    with pytest.raises(ValueError, match="deepseek_r1, qwen3"):
        ReasoningSplitter("granite")


def test_grammar_tolerates_unsupported_schema_keywords(tok):
    """A client's schema with a keyword llguidance does not implement still gives a grammar (lenient)."""
    params = {
        "type": "object",
        "properties": {"when": {"type": "string", "format": "made-up"}, "unit": {"enum": ["c", "f"]}},
    }
    tools = [FunctionTool("f", None, params)]
    grammar = HermesParser().grammar(tools, parallel=False)
    assert accepts(tok, grammar, HermesParser().render_calls([call("f", {"when": "now", "unit": "c"})]))
    assert not accepts(tok, grammar, HermesParser().render_calls([call("f", {"when": "now", "unit": "k"})]))
    with pytest.raises(ToolError, match="no tools"):
        HermesParser().grammar([], parallel=False)
