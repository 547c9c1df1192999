"""Streaming text out of generated token ids (torch-free: stdlib and tokenizers only).

`IncrementalDetokenizer` turns ids into text pieces with the prefix-offset / read-offset technique of
vLLM and TGI: decode a small window of recent ids twice (without and with the new ones) and emit the
difference once it no longer ends in U+FFFD, i.e. once every byte-level or byte-fallback piece of a
character has arrived. `StopMatcher` holds back text that could still become a stop string.
"""

from __future__ import annotations

from tokenizers import Tokenizer

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns a stream of token ids into text pieces, byte-correct.

    A character split across byte-level (or SentencePiece byte-fallback) tokens is never emitted as
    U+FFFD. Without `prompt_ids` the pieces concatenate to `tokenizer.decode(ids, skip_special_tokens)`;
    with them, the last few prompt ids are the initial context, so the pieces are what decoding
    prompt + ids adds after the prompt (a SentencePiece "▁Paris" right after the prompt gives " Paris",
    where decoding the generated ids alone would strip that space).

    Each `add` decodes a window of a few ids (O(window), not O(total)). Ids that add no text (skipped
    special tokens) are dropped from the window; and a window still ending in U+FFFD after
    `MAX_PENDING` ids is taken as genuinely invalid bytes and emitted, so the window stays bounded
    even when the model produces garbage.
    """

    CONTEXT = 5  # prompt ids kept as initial context (vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET)
    MAX_PENDING = 16  # ids held back at most while the text ends in U+FFFD (a character has <= 4 bytes)

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None, skip_special_tokens: bool = True
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        # The window: ids[:prefix] is gone; ids[prefix:read] was emitted (context); ids[read:] is pending.
        self._ids: list[int] = list(prompt_ids[-self.CONTEXT :]) if prompt_ids else []
        self._prefix = 0
        self._read = len(self._ids)

    def add(self, token_id: int) -> str:
        """Append one generated id; return the text that became final (may be "")."""
        self._ids.append(int(token_id))
        prefix_text, new_text = self._texts()
        if len(self._ids) - self._read <= self.MAX_PENDING:
            if new_text.endswith(REPLACEMENT) or len(new_text) < len(prefix_text):
                return ""  # a character is still incomplete: wait for its remaining bytes
            if new_text == prefix_text:
                del self._ids[self._read :]  # text-neutral ids (skipped special tokens): forget them
                return ""
        return self._advance(new_text[len(prefix_text) :])

    def flush(self) -> str:
        """Whatever is still held back, at the end of generation (even if it decodes to U+FFFD)."""
        if len(self._ids) == self._read:
            return ""
        prefix_text, new_text = self._texts()
        return self._advance(new_text[len(prefix_text) :])

    def _texts(self) -> tuple[str, str]:
        decode = self.tokenizer.decode
        skip = self.skip_special_tokens
        window = self._ids[self._prefix :]
        prefix_text = (
            decode(window[: self._read - self._prefix], skip_special_tokens=skip) if self._read > self._prefix else ""
        )
        return prefix_text, decode(window, skip_special_tokens=skip)

    def _advance(self, text: str) -> str:
        """The pending ids are emitted: they become the context of the next window."""
        del self._ids[: self._read]
        self._prefix, self._read = 0, len(self._ids)
        return text


class StopMatcher:
    """Holds back text that could be the start of a stop string; never emits the stop string itself.

    `feed` returns the text that is safe to emit: everything except the longest tail that is a proper
    prefix of some stop string. Once a stop string appears (the earliest one, if several), the emitted
    text ends right before it and the matcher stays stopped.
    """

    def __init__(self, stops: list[str]) -> None:
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        self.stops = list(stops)
        self.stopped = False
        self.matched: str | None = None  # the stop string that stopped it
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Add newly decoded text; return (text safe to emit now, stopped?)."""
        if self.stopped:
            return "", True
        buf = self._held + text
        found = [(i, s) for s in self.stops if (i := buf.find(s)) >= 0]
        if found:
            at, self.matched = min(found, key=lambda f: f[0])
            self.stopped, self._held = True, ""
            return buf[:at], True
        keep = max((self._partial(buf, s) for s in self.stops), default=0)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """The held-back text, when generation ends for another reason ("" once stopped)."""
        held, self._held = self._held, ""
        return held

    @staticmethod
    def _partial(buf: str, stop: str) -> int:
        """Length of the longest tail of `buf` that is a proper prefix of `stop`."""
        for n in range(min(len(stop) - 1, len(buf)), 0, -1):
            if buf.endswith(stop[:n]):
                return n
        return 0
