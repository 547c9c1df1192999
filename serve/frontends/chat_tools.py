"""A chat request's tools (OpenAI `tools`, `tool_choice`, `parallel_tool_calls`): how the prompt shows them
and the calls of earlier turns, the parser of the model's calls, and the constraint that forces a call.

Templates that render `tools` get them as a variable; for the others the tools become a system prompt in
the parser's format. Earlier calls (assistant messages' `tool_calls`) are written into the message's
content in that format when the template does not render `tool_calls` itself."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from serve.core.guide import Constraint

from .tool_calls import FunctionTool, ToolCall, ToolError, ToolParser, forced_tools, pick_parser, tools_system_prompt


class ToolRequestError(ToolError):
    """A bad tools field: `param` names it (the front-end's 400)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class ChatTools:
    tools: list[FunctionTool]
    parser: ToolParser | None  # the model's call format (None: no tools and no earlier calls)
    active: bool  # the output is parsed for calls (tools given, tool_choice not "none")
    forced: Constraint | None  # tool_choice "required" or a named function: the grammar of a call
    template: str

    @staticmethod
    def of(
        tools_field: list[Any] | None,
        tool_choice: Any,
        parallel: bool | None,
        messages: list[dict[str, Any]],
        template: str,
        parser_name: str | None,
        token_id: Callable[[str], int | None],
    ) -> ChatTools:
        """`token_id`: the vocabulary's id of a text that is one token, else None."""
        try:
            tools = FunctionTool.from_openai(tools_field) if tools_field else []
        except ToolError as e:
            raise ToolRequestError("tools", str(e)) from e
        if not tools and tool_choice not in (None, "none", "auto"):
            raise ToolRequestError("tool_choice", "tool_choice needs tools")
        history = any(m.get("role") == "assistant" and m.get("tool_calls") for m in messages)
        if not tools and not history:
            return ChatTools([], None, False, None, template)
        parser = pick_parser(parser_name, template)
        active = bool(tools) and tool_choice != "none"
        try:
            forced = forced_tools(tools, tool_choice) if active else None
        except ToolError as e:
            raise ToolRequestError("tool_choice", str(e)) from e
        constraint = None
        if forced is not None:
            # a literal the vocabulary holds as one token is that token in the grammar (llguidance matches
            # no added token by its text)
            ids = {t: i for t in parser.token_texts if (i := token_id(t)) is not None}
            constraint = Constraint.of("lark", parser.grammar(forced, parallel=parallel is not False, token_ids=ids))
        return ChatTools(tools, parser, active, constraint, template)

    def show(self, messages: list[dict[str, Any]], variables: dict[str, Any]) -> list[dict[str, Any]]:
        """The messages (and template variables) that show the model its tools and its earlier calls."""
        if self.parser is None:
            return messages
        if self.active and "tools" in self.template:
            variables["tools"] = [t.openai() for t in self.tools]
        elif self.active:
            prompt = tools_system_prompt(self.tools, self.parser)
            if messages and messages[0]["role"] == "system":
                messages = [{**messages[0], "content": f"{prompt}\n\n{messages[0]['content'] or ''}"}, *messages[1:]]
            else:
                messages = [{"role": "system", "content": prompt}, *messages]
        if "tool_calls" in self.template:
            return messages
        shown = []
        for m in messages:
            if m["role"] == "assistant" and m.get("tool_calls"):
                try:
                    calls = self.parser.render_calls(ToolCall.from_openai(m["tool_calls"]))
                except ToolError as e:
                    raise ToolRequestError("messages", str(e)) from e
                m = {**m, "content": f"{m.get('content') or ''}{calls}"}
            elif m["role"] == "tool":  # a result, as Hermes / Qwen templates show one: a user turn, tagged
                m = {"role": "user", "content": f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"}
            shown.append(m)
        return shown
