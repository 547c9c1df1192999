"""`reasoning_content`: a thinking model's output split into its reasoning and its answer (vLLM's
`--reasoning-parser`), whole or as streamed deltas, the markers in neither part.

deepseek_r1: the template has usually opened `<think>` already, so the output starts in reasoning (an
optional leading `<think>` is dropped) up to `</think>`; without `</think>` all of it is reasoning.
qwen3: reasoning only when the output opens with `<think>` (after whitespace); all content otherwise.
The newlines right after `</think>` are not content.

One departure from vLLM, so that streaming can send reasoning as it comes and still agree with the whole
output's split: a qwen3 output that opens `<think>` but never closes it (cut off by max_tokens) is all
reasoning, where vLLM would make it content, `<think>` included.
"""

from __future__ import annotations

REASONING_PARSERS = ("deepseek_r1", "qwen3")


def _check(kind: str) -> None:
    if kind not in REASONING_PARSERS:
        raise ValueError(f"unknown reasoning parser {kind!r}: expected one of {', '.join(REASONING_PARSERS)}")


def split_reasoning(
    kind: str, text: str, start: str = "<think>", end: str = "</think>"
) -> tuple[str | None, str | None]:
    """A whole output as (reasoning_content, content); an empty part is None."""
    _check(kind)
    body = text.lstrip()
    if body.startswith(start):
        text = body[len(start) :]
    elif kind == "qwen3":
        return None, text or None
    reasoning, closed, content = text.partition(end)
    return reasoning or None, (content.lstrip("\n") or None) if closed else None


class ReasoningSplitter:
    """split_reasoning for a streamed output: each delta's (reasoning, content) parts, concatenating to
    exactly split_reasoning's parts however the output is cut into deltas. Text that may be the start of
    a marker, or the newlines after `</think>`, is held until the next delta decides it."""

    def __init__(self, kind: str, start: str = "<think>", end: str = "</think>") -> None:
        _check(kind)
        self.kind, self.start, self.end = kind, start, end
        self._held = ""
        self._state = "opening"  # -> "reasoning" -> "after" (newlines after the end marker) -> "content"

    def feed(self, delta: str) -> tuple[str, str]:
        self._held += delta
        reasoning = content = ""
        if self._state == "opening":
            body = self._held.lstrip()
            if body.startswith(self.start):
                self._held, self._state = body[len(self.start) :], "reasoning"
            elif self.start.startswith(body):  # (whitespace, or a start marker so far): undecided
                return "", ""
            else:
                self._state = "reasoning" if self.kind == "deepseek_r1" else "content"
        if self._state == "reasoning":
            end = self._held.find(self.end)
            if end < 0:
                keep = _partial_marker(self._held, self.end)
                reasoning, self._held = self._held[: len(self._held) - keep], self._held[len(self._held) - keep :]
                return reasoning, ""
            reasoning, self._held, self._state = self._held[:end], self._held[end + len(self.end) :], "after"
        if self._state == "after":
            self._held = self._held.lstrip("\n")
            if not self._held:
                return reasoning, ""
            self._state = "content"
        content, self._held = self._held, ""
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        held, self._held = self._held, ""
        if self._state == "opening":  # (only whitespace or part of a start marker came)
            return (held, "") if self.kind == "deepseek_r1" else ("", held)
        if self._state == "reasoning":  # (part of an end marker)
            return held, ""
        return "", ""


def _partial_marker(text: str, marker: str) -> int:
    """The length of the longest end of `text` that is a proper start of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
