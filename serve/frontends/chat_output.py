"""One chat choice's output text as the assistant message's parts: `reasoning_content` (with a reasoning
parser), `content` and `tool_calls` (with a tool-call parser), whole or streamed. Reasoning is split off
first; tool calls are parsed out of what remains."""

from __future__ import annotations

from dataclasses import dataclass, field

from .reasoning import ReasoningSplitter, split_reasoning
from .tool_calls import ToolCall, ToolParser, ToolStream


@dataclass
class Parts:
    reasoning: str | None = None
    content: str | None = None
    calls: list[ToolCall] = field(default_factory=list)


class ChatOutput:
    def __init__(self, tools: ToolParser | None, reasoning: str | None) -> None:
        self.tools, self.reasoning = tools, reasoning
        self._split = ReasoningSplitter(reasoning) if reasoning else None
        self._calls = ToolStream(tools) if tools else None

    def parse(self, text: str) -> Parts:
        """A whole output's parts."""
        reasoning, content = split_reasoning(self.reasoning, text) if self.reasoning else (None, text)
        if self.tools is None or content is None:
            return Parts(reasoning, content)
        content, calls = self.tools.parse(content)
        return Parts(reasoning, content, calls)

    def feed(self, delta: str) -> Parts:
        """A streamed delta's parts that may be sent now (text that may begin a call is held back)."""
        reasoning, content = self._split.feed(delta) if self._split else ("", delta)
        return Parts(reasoning, self._calls.feed(content) if self._calls else content)

    def finish(self) -> Parts:
        """What was held back, and the calls, at the end of the stream."""
        reasoning, content = self._split.finish() if self._split else ("", "")
        if self._calls is None:
            return Parts(reasoning, content)
        content = self._calls.feed(content)
        tail, calls = self._calls.finish()
        return Parts(reasoning, content + tail, calls)
