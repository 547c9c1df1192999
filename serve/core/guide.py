"""Constrained decoding: a request's constraint (JSON schema, JSON object, regex, choice, GBNF / Lark
grammar) compiled once by llguidance, and each sequence's matcher, whose token mask the sampler applies.

`Guides` (one per engine) holds llguidance's view of the tokenizer and a cache of compiled matchers keyed
by the constraint's text; a sequence gets a copy (`deep_copy` is microseconds, compiling is milliseconds
to seconds). Compiling runs off the event loop under a deadline (`prepare`). A `Guide` is one sequence's
state: `fill` writes the next token's mask, `allows` checks one token without a mask (the sampler needs a
mask only when that check fails, or when it filters with top-k/p or min-p: core/sampling.py), `advance`
consumes the sampled token, `stopped` says the grammar accepts and allows nothing more.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import llguidance
import numpy as np
from tokenizers import Tokenizer

log = logging.getLogger("aotllm.guide")

KINDS = ("json_object", "json_schema", "regex", "choice", "grammar", "lark")  # grammar: GBNF or Lark
COMPILE_TIMEOUT = 10.0  # seconds a constraint may take to compile before the request is refused
CACHE_SIZE = 256  # compiled constraints kept (LRU)
MAX_SPEC_CHARS = 1_000_000
# JSON layout: the model's own spacing, bounded as llama.cpp's schema grammars bound it, so a model cannot
# spend its tokens on whitespace between two JSON tokens.
JSON_OPTIONS: dict[str, Any] = {"whitespace_pattern": r"(?:[ ]|\n[ \t]{0,20})?"}
# Compile work bounds (llguidance's own units; its defaults are sized for vocabularies like ours).
LIMITS = llguidance.LLParserLimits(verbose_errors=False)


class ConstraintError(ValueError):
    """A constraint that cannot be used: a bad schema, regex or grammar (llguidance's message names the
    position), one that compiles too slowly, or a request field of the wrong shape."""


@dataclass(frozen=True)
class Constraint:
    """What a request constrains its output to. `spec` is text: JSON for a schema or a list of choices."""

    kind: str
    spec: str = ""

    @staticmethod
    def of(kind: str, value: Any) -> Constraint:
        """From a request field's value: a schema as an object or its JSON text, choices as a list of
        strings, a regex or grammar as text."""
        if kind not in KINDS:
            raise ConstraintError(f"unknown constraint kind {kind!r}; one of {', '.join(KINDS)}")
        if kind == "json_object":
            return Constraint(kind, '{"type": "object"}')
        if kind == "json_schema":
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError as e:
                    raise ConstraintError(f"the JSON schema is not valid JSON: {e}") from e
            if not isinstance(value, (dict, bool)):
                raise ConstraintError(f"a JSON schema must be an object, got {type(value).__name__}")
            spec = json.dumps(value)  # (not sorted: the properties' order is the order the output gives them)
        elif kind == "choice":
            if not (isinstance(value, list) and value and all(isinstance(v, str) and v for v in value)):
                raise ConstraintError("choices must be a non-empty list of non-empty strings")
            spec = json.dumps(value)
        else:
            if not (isinstance(value, str) and value):
                raise ConstraintError(f"a {kind} must be a non-empty string")
            spec = value
        if len(spec) > MAX_SPEC_CHARS:
            raise ConstraintError(f"the {kind} has {len(spec)} characters; at most {MAX_SPEC_CHARS}")
        return Constraint(kind, spec)

    def grammar(self) -> str:
        """llguidance's grammar text for this constraint."""
        if self.kind in ("json_object", "json_schema"):
            return llguidance.LLMatcher.grammar_from_json_schema(self.spec, defaults=JSON_OPTIONS)  # type: ignore[arg-type]
        try:
            return llguidance.grammar_from("grammar" if self.kind == "grammar" else self.kind, self.spec)  # type: ignore[arg-type]
        except ValueError as e:  # GBNF that does not convert (e.g. an undefined rule)
            raise ConstraintError(str(e)) from e


class Guide:
    """One sequence's matcher. Not thread-safe: the scheduler touches it from one thread at a time."""

    def __init__(self, matcher: llguidance.LLMatcher, eos_id: int) -> None:
        self.matcher, self.eos_id = matcher, eos_id

    def fill(self, row: np.ndarray) -> None:
        """Write the allowed next tokens into `row` (int32 bitmask, 32 ids per word, low bit first)."""
        self.matcher.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)
        if self.matcher.is_error():  # cannot happen for a grammar that compiled; end the sequence, never hang
            log.warning("constraint failed mid-sequence: %s", self.matcher.get_error())
            row[:] = 0
            row.view(np.uint32)[self.eos_id // 32] = 1 << (self.eos_id % 32)

    def allows(self, token: int) -> bool:
        """Whether the grammar takes `token` next (microseconds: no mask)."""
        return bool(self.matcher.validate_tokens([token]))

    def mask(self, vocab_size: int) -> np.ndarray:
        row = np.zeros(mask_words(vocab_size), np.int32)
        self.fill(row)
        return row

    def advance(self, token: int) -> None:
        self.matcher.consume_token(token)

    @property
    def stopped(self) -> bool:
        """The grammar accepts what was generated and allows no more tokens (not even the end token)."""
        return self.matcher.is_stopped()


def allowed(mask_row: np.ndarray, vocab_size: int) -> np.ndarray:
    """A bitmask row as booleans over the vocabulary."""
    return np.unpackbits(mask_row.view(np.uint8), bitorder="little", count=vocab_size).view(bool)


def mask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


class Guides:
    """llguidance's tokenizer (built on first use: ~0.15 s for a 49k vocabulary) and the compiled cache."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_ids: list[int]) -> None:
        self._tokenizer, self.vocab_size, self.eos_ids = tokenizer, vocab_size, eos_ids
        self._lltok: llguidance.LLTokenizer | None = None
        self._cache: OrderedDict[Constraint, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    def _ll_tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._lltok is None:
                eos = self.eos_ids or None
                try:
                    self._lltok = llguidance.LLTokenizer(
                        self._tokenizer.to_str(), n_vocab=self.vocab_size, eos_token=eos
                    )
                except ValueError:  # a decoder llguidance cannot read (e.g. Fuse): it gets each token's bytes
                    vocab = llguidance.TokenizerWrapper(_Vocabulary(self._tokenizer, self.vocab_size, self.eos_ids))
                    self._lltok = llguidance.LLTokenizer(vocab, n_vocab=self.vocab_size, eos_token=eos)
            return self._lltok

    def compile(self, c: Constraint) -> llguidance.LLMatcher:
        """The constraint's compiled matcher (cached by content). Raises ConstraintError."""
        with self._lock:
            if c in self._cache:
                self._cache.move_to_end(c)
                return self._cache[c]
        matcher = llguidance.LLMatcher(self._ll_tokenizer(), c.grammar(), log_level=0, limits=LIMITS)
        if matcher.is_error():
            raise ConstraintError(f"invalid {c.kind.replace('_', ' ')}: {matcher.get_error().strip()}")
        with self._lock:
            self._cache[c] = matcher
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return matcher

    async def prepare(self, c: Constraint, timeout: float = COMPILE_TIMEOUT) -> None:
        """Compile off the event loop, within `timeout` seconds (llguidance's work limits bound a compile
        that goes on in its thread after the deadline)."""
        try:
            await asyncio.wait_for(asyncio.to_thread(self.compile, c), timeout)
        except asyncio.TimeoutError as e:
            raise ConstraintError(
                f"the {c.kind.replace('_', ' ')} took longer than {timeout:g} s to compile; simplify it"
            ) from e

    def guide(self, c: Constraint) -> Guide:
        return Guide(self.compile(c).deep_copy(), self.eos_ids[0] if self.eos_ids else 0)


class _Vocabulary:
    """A tokenizer as llguidance's TokenizerWrapper reads one: every id's bytes, the special ids, encode."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_ids: list[int]) -> None:
        self._tokenizer = tokenizer
        self.eos_token_id = eos_ids[0] if eos_ids else 0
        self.bos_token_id = None
        size = min(vocab_size, tokenizer.get_vocab_size(with_added_tokens=True))
        decode = tokenizer.decode
        self.tokens = [decode([i], skip_special_tokens=False).encode() for i in range(size)]
        self.tokens += [b""] * (vocab_size - size)
        self.special_token_ids = [i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special]

    def __call__(self, text: str) -> list[int]:
        if not isinstance(text, str):  # (TokenizerWrapper probes with bytes: this one takes text)
            raise TypeError("text only")
        return self._tokenizer.encode(text, add_special_tokens=False).ids
