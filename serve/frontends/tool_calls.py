"""OpenAI tool calling for chat completions: the request's `tools`, the model's output parsed into
`tool_calls` (whole or streamed), the llguidance grammar that forces a call (tool_choice "required" or a
named function), and the text that shows the tools and earlier calls to templates that cannot.

A parser is one model family's output format: llama3 (Llama 3.1-3.3 JSON calls), hermes (Hermes 2 Pro,
Qwen 2.5 / Qwen3 `<tool_call>` blocks) or mistral (`[TOOL_CALLS]`). Output that does not parse as calls
is content, whole: parsing never raises and never loses text.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar
from uuid import uuid4

_DECODER = json.JSONDecoder()
_Lit = Callable[[str], str]  # a literal text as Lark: a quoted string, or the one token that is that text
_CALL_KEYS = frozenset({"name", "arguments", "parameters", "type", "id"})
# Bounded JSON whitespace, so that a forced call cannot run on in whitespace; lenient: a client schema's
# unsupported keywords are ignored rather than failing the request.
_JSON_OPTIONS = {"whitespace_pattern": "[\\x20\\x0A\\x0D\\x09]{1,16}", "lenient": True}


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text of the arguments object (as OpenAI sends it)
    id: str = field(default_factory=lambda: "call_" + uuid4().hex[:24])

    def openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}

    @staticmethod
    def from_openai(tool_calls: list[Any]) -> list[ToolCall]:
        """An assistant message's `tool_calls` as sent back by the client (to render with render_calls)."""
        calls = []
        for i, tc in enumerate(tool_calls):
            fn = tc.get("function") if isinstance(tc, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise ToolError(f"tool_calls[{i}]: expected {{'function': {{'name': ..., 'arguments': ...}}}}")
            args = fn.get("arguments", "{}")
            call = ToolCall(fn["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))
            if isinstance(tc.get("id"), str):
                call.id = tc["id"]
            calls.append(call)
        return calls


class ToolError(ValueError):
    """A bad `tools` / `tool_choice`; the message says what and where (the front-end answers 400)."""


@dataclass
class FunctionTool:
    name: str
    description: str | None
    parameters: dict[str, Any]  # JSON schema of the arguments object

    @staticmethod
    def from_openai(tools: list[Any]) -> list[FunctionTool]:
        if not isinstance(tools, list):
            raise ToolError("tools: expected a list of {'type': 'function', 'function': {...}}")
        out: list[FunctionTool] = []
        for i, tool in enumerate(tools):
            where = f"tools[{i}]"
            if not isinstance(tool, dict) or tool.get("type") != "function":
                raise ToolError(f"{where}: only tools of type 'function' are supported")
            fn = tool.get("function")
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
                raise ToolError(f"{where}.function.name: missing (a non-empty string is required)")
            desc, params = fn.get("description"), fn.get("parameters")
            if desc is not None and not isinstance(desc, str):
                raise ToolError(f"{where}.function.description: expected a string")
            if params is not None and not isinstance(params, dict):
                raise ToolError(f"{where}.function.parameters: expected a JSON schema object")
            if any(t.name == fn["name"] for t in out):
                raise ToolError(f"{where}.function.name: {fn['name']!r} is defined twice")
            out.append(FunctionTool(fn["name"], desc, params or {"type": "object", "properties": {}}))
        return out

    def openai(self) -> dict[str, Any]:
        fn: dict[str, Any] = {"name": self.name, "parameters": self.parameters}
        if self.description is not None:
            fn["description"] = self.description
        return {"type": "function", "function": fn}


def forced_tools(tools: list[FunctionTool], tool_choice: Any) -> list[FunctionTool] | None:
    """The tools a grammar must force a call to for this `tool_choice`; None for "auto", "none" or absent."""
    if tool_choice in (None, "auto", "none"):
        return None
    if tool_choice == "required":
        if not tools:
            raise ToolError("tool_choice: 'required' needs at least one tool in tools")
        return tools
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    if isinstance(fn, dict) and tool_choice.get("type") == "function":
        named = [t for t in tools if t.name == fn.get("name")]
        if not named:
            raise ToolError(f"tool_choice.function.name: {fn.get('name')!r} is not one of tools")
        return named
    raise ToolError(
        "tool_choice: expected 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}"
    )


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def _json_at(text: str, pos: int) -> tuple[Any, int] | None:
    try:
        return _DECODER.raw_decode(text, pos)
    except (ValueError, RecursionError):
        return None


def _call(obj: Any) -> ToolCall | None:
    """{"name": ..., "arguments"|"parameters": {...}} as a call; None if it is not one."""
    if not isinstance(obj, dict) or not obj.keys() <= _CALL_KEYS:
        return None
    name, args = obj.get("name"), [obj[k] for k in ("arguments", "parameters") if k in obj]
    if not isinstance(name, str) or not name or len(args) != 1 or not isinstance(args[0], dict):
        return None
    return ToolCall(name, json.dumps(args[0], ensure_ascii=False, allow_nan=False))


def _args(call: ToolCall) -> Any:
    try:
        return json.loads(call.arguments)
    except ValueError:
        return call.arguments  # (a client's invalid arguments are shown as they came, as a string)


def _call_json(call: ToolCall, key: str) -> str:
    return json.dumps({"name": call.name, key: _args(call)}, ensure_ascii=False)


class ToolParser:
    name: ClassVar[str]
    markers: ClassVar[tuple[str, ...]]
    # The format's literals that a tokenizer may have as single (added) tokens: llguidance never matches
    # such a token against a literal's text, so grammar() is told their ids.
    token_texts: ClassVar[tuple[str, ...]] = ()
    args_key: ClassVar[str] = "arguments"

    def _section_start(self, text: str) -> int | None:
        return min((i for m in self.markers if (i := text.find(m)) >= 0), default=None)

    def starts_call(self, text_so_far: str) -> int | None:
        start = self._section_start(text_so_far)
        longest = max(map(len, self.markers))
        for k in range(max(0, len(text_so_far) - longest + 1), len(text_so_far)):
            if any(m.startswith(text_so_far[k:]) for m in self.markers):
                return k if start is None else min(start, k)
        return start

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        start = self._section_start(text)
        try:
            calls = self._parse_section(text[start:]) if start is not None else None
        except (ValueError, TypeError, SyntaxError, RecursionError):  # (ast on whatever the model wrote)
            calls = None
        if not calls or start is None:
            return text, []
        return text[:start].rstrip() or None, calls

    def _parse_section(self, section: str) -> list[ToolCall] | None:
        """The calls of the text from the first marker on; None unless all of it is calls."""
        raise NotImplementedError

    def grammar(self, tools: list[FunctionTool], parallel: bool, token_ids: Mapping[str, int] | None = None) -> str:
        """A llguidance Lark grammar accepting exactly one call (one or more when `parallel`) to one of
        `tools` in this format, each call's arguments valid against its tool's schema. `token_ids`: those
        of `token_texts` that the serving tokenizer has as one token, and their ids."""
        if not tools:
            raise ToolError("no tools to force a call to")
        ids = token_ids or {}

        def lit(text: str) -> str:
            return f"<[{ids[text]}]>" if text in ids else json.dumps(text, ensure_ascii=False)

        rules = [f"start: {self._calls_rule(parallel, lit)}"]
        for i, tool in enumerate(tools):
            rules.append(f"f{i}: {self._call_rule(tool, f'a{i}', lit)}")
            rules.append(f"a{i}: %json {json.dumps({'x-guidance': _JSON_OPTIONS, **tool.parameters})}")
        rules.append("fn: " + " | ".join(f"f{i}" for i in range(len(tools))))
        return "\n".join(rules) + "\n"

    def _calls_rule(self, parallel: bool, lit: _Lit) -> str:
        raise NotImplementedError

    def _call_rule(self, tool: FunctionTool, args_rule: str, lit: _Lit) -> str:
        head = json.dumps({"name": tool.name, self.args_key: 0}, ensure_ascii=False)[:-2]  # '{"name": "f", "k": '
        return f"{lit(head)} {args_rule} {lit('}')}"

    def render_calls(self, calls: list[ToolCall]) -> str:
        raise NotImplementedError


class Llama3Parser(ToolParser):
    """`{"name": "f", "parameters": {...}}` (calls separated by ";" or newlines), optionally after
    <|python_tag|>; or a built-in tool's `<|python_tag|>brave_search.call(query="x")`."""

    name = "llama3"
    markers = ("<|python_tag|>",)
    args_key = "parameters"

    def _section_start(self, text: str) -> int | None:
        # The JSON format's calls open the output without a marker.
        first = _skip_ws(text, 0)
        return first if text.startswith("{", first) else super()._section_start(text)

    def _parse_section(self, section: str) -> list[ToolCall] | None:
        tag = self.markers[0]
        body = section.removeprefix(tag).strip()
        if not body.startswith("{"):
            return _builtin_call(body) if section.startswith(tag) else None
        calls, pos = [], 0
        while pos < len(body):
            got = _json_at(body, pos)
            call = _call(got[0]) if got else None
            if got is None or call is None:
                return None
            calls.append(call)
            pos = _skip_ws(body, got[1])
            pos = _skip_ws(body, pos + 1) if body.startswith(";", pos) else pos
            pos = _skip_ws(body, pos + len(tag)) if body.startswith(tag, pos) else pos
        return calls

    def _calls_rule(self, parallel: bool, lit: _Lit) -> str:
        return f"fn ({lit('; ')} fn)*" if parallel else "fn"

    def render_calls(self, calls: list[ToolCall]) -> str:
        return "; ".join(_call_json(c, self.args_key) for c in calls)


def _builtin_call(body: str) -> list[ToolCall] | None:
    """`name.call(k=<Python literal>, ...)`, Llama 3.1's built-in tools."""
    expr = ast.parse(body, mode="eval").body
    if not (isinstance(expr, ast.Call) and isinstance(expr.func, ast.Attribute) and expr.func.attr == "call"):
        return None
    if not isinstance(expr.func.value, ast.Name) or expr.args or any(k.arg is None for k in expr.keywords):
        return None
    args = {k.arg: ast.literal_eval(k.value) for k in expr.keywords}
    return [ToolCall(expr.func.value.id, json.dumps(args, ensure_ascii=False, allow_nan=False))]


class HermesParser(ToolParser):
    """`<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>` blocks, after any content."""

    name = "hermes"
    markers = ("<tool_call>",)
    token_texts = ("<tool_call>", "</tool_call>")

    def _parse_section(self, section: str) -> list[ToolCall] | None:
        open_, close = self.token_texts
        calls, pos = [], 0
        while pos < len(section):
            if not section.startswith(open_, pos):
                return None
            body = _skip_ws(section, pos + len(open_))
            got = _json_at(section, body) or _python_dict_at(section, body, close)
            call = _call(got[0]) if got else None
            if got is None or call is None:
                return None
            calls.append(call)
            pos = _skip_ws(section, got[1])
            if section.startswith(close, pos):
                pos = _skip_ws(section, pos + len(close))
            elif pos < len(section):  # (only the last block may lack its </tool_call>)
                return None
        return calls

    def _calls_rule(self, parallel: bool, lit: _Lit) -> str:
        call = f'{lit("<tool_call>")} "\\n" fn "\\n" {lit("</tool_call>")}'
        return f'{call} ("\\n" {call})*' if parallel else call

    def render_calls(self, calls: list[ToolCall]) -> str:
        return "\n".join(f"<tool_call>\n{_call_json(c, self.args_key)}\n</tool_call>" for c in calls)


def _python_dict_at(text: str, pos: int, end: str) -> tuple[Any, int] | None:
    """A Python dict literal up to `end`, as Hermes 2 Pro sometimes writes its calls: {'name': 'f', ...}."""
    stop = text.find(end, pos)
    return (ast.literal_eval(text[pos:stop].strip()), stop) if stop >= 0 and text.startswith("{", pos) else None


_ARGS_HEAD = re.compile(r"([\w.\-]+)\s*(?:\[CALL_ID\]\s*(\w+)\s*)?\[ARGS\]")


class MistralParser(ToolParser):
    """`[TOOL_CALLS] [{"name": "f", "arguments": {...}}, ...]`, or the newer `[TOOL_CALLS]f[ARGS]{...}`
    (a template with [ARGS] makes grammar() and render_calls() use that form). Call ids are 9 letters
    and digits, as Mistral's templates require of the ids sent back."""

    name = "mistral"
    markers = ("[TOOL_CALLS]",)
    token_texts = ("[TOOL_CALLS]", "[ARGS]")

    def __init__(self, args_form: bool = False) -> None:
        self.args_form = args_form

    def _parse_section(self, section: str) -> list[ToolCall] | None:
        calls: list[ToolCall] = []
        pos, tag = 0, self.markers[0]
        while pos < len(section):
            if not section.startswith(tag, pos):
                return None
            pos = _skip_ws(section, pos + len(tag))
            if section.startswith("[", pos):
                got = _json_at(section, pos)
                if got is None or not isinstance(got[0], list) or not got[0]:
                    return None
                objs, pos = got
            elif head := _ARGS_HEAD.match(section, pos):
                got = _json_at(section, _skip_ws(section, head.end()))
                if got is None:
                    return None
                objs, pos = [{"name": head[1], "arguments": got[0], "id": head[2]}], got[1]
            else:
                return None
            for obj in objs:
                call = _call(obj)
                if call is None:
                    return None
                given = obj.get("id")
                call.id = given if isinstance(given, str) and len(given) == 9 and given.isalnum() else _mistral_id()
                calls.append(call)
            pos = _skip_ws(section, pos)
        return calls

    def _calls_rule(self, parallel: bool, lit: _Lit) -> str:
        if self.args_form:
            return f"({lit('[TOOL_CALLS]')} fn)" + ("+" if parallel else "")
        return f"{lit('[TOOL_CALLS]')} {lit('[')} fn " + (f"({lit(', ')} fn)* " if parallel else "") + lit("]")

    def _call_rule(self, tool: FunctionTool, args_rule: str, lit: _Lit) -> str:
        if self.args_form:
            return f"{lit(tool.name)} {lit('[ARGS]')} {args_rule}"
        return super()._call_rule(tool, args_rule, lit)

    def render_calls(self, calls: list[ToolCall]) -> str:
        if self.args_form:
            return "".join(f"[TOOL_CALLS]{c.name}[ARGS]{json.dumps(_args(c), ensure_ascii=False)}" for c in calls)
        return "[TOOL_CALLS][" + ", ".join(_call_json(c, self.args_key) for c in calls) + "]"


def _mistral_id() -> str:
    return uuid4().hex[:9]


PARSERS: dict[str, type[ToolParser]] = {p.name: p for p in (Llama3Parser, HermesParser, MistralParser)}
# A chat template's text that shows its model's format (the first found wins)
_TEMPLATE_HINTS = (
    ("<tool_call>", "hermes"),
    ("[TOOL_CALLS]", "mistral"),
    ("<|python_tag|>", "llama3"),
    ("ipython", "llama3"),
)


def pick_parser(name: str | None, chat_template: str | None) -> ToolParser:
    """The parser named (`--tool-call-parser`), or for None / "auto" the one the chat template's text
    implies; hermes, whose format tools_system_prompt teaches, when it implies none."""
    template = chat_template or ""
    if name in (None, "auto"):
        name = next((parser for hint, parser in _TEMPLATE_HINTS if hint in template), "hermes")
    elif name not in PARSERS:
        raise ValueError(f"unknown tool call parser {name!r}: expected one of {', '.join(PARSERS)} or 'auto'")
    return MistralParser("[ARGS]" in template) if name == "mistral" else PARSERS[name]()


def tools_system_prompt(tools: list[FunctionTool], parser: ToolParser) -> str:
    """A system prompt that lists `tools` and says how to call them in `parser`'s format, for chat
    templates that do not render `tools` themselves."""
    listing = "\n".join(json.dumps(t.openai(), ensure_ascii=False) for t in tools)
    one = ToolCall("function_name", '{"argument": "value"}')
    two = [one, ToolCall("other_function", '{"argument": 1}')]
    return (
        "You can call functions to help answer. These are the available functions, one JSON object per "
        f"line, each with its name, description and the JSON schema of its arguments:\n<tools>\n{listing}\n"
        "</tools>\n\nTo call a function, reply with exactly this (the arguments a JSON object valid against "
        f"the function's schema), with nothing after it:\n{parser.render_calls([one])}\n\nTo call several "
        f"functions at once:\n{parser.render_calls(two)}\n\nDo not invent functions or argument values. "
        "If no function is needed, answer normally, without this format."
    )


class ToolStream:
    """A streamed output's content as it may be sent, and its calls at the end. Text from where a call
    section may begin is held back, and so is trailing whitespace (parse() drops the whitespace before a
    call), so that what feed() gave plus finish()'s content is exactly parse()'s content."""

    def __init__(self, parser: ToolParser) -> None:
        self.parser = parser
        self._text = ""
        self._sent = 0  # text[:sent] was streamed as content
        self._in_call = False  # a whole marker was seen: the rest is held until the end

    def feed(self, delta: str) -> str:
        self._text += delta
        if self._in_call:
            return ""
        start = self.parser.starts_call(self._text)
        self._in_call = start is not None and self.parser._section_start(self._text) == start
        safe = max(self._sent, len(self._text[:start].rstrip()))
        out, self._sent = self._text[self._sent : safe], safe
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        content, calls = self.parser.parse(self._text)
        if not calls:
            return self._text[self._sent :], []
        return (content or "")[self._sent :], calls
