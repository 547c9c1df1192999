"""Tokenizing what clients send without stalling the event loop, and refusing texts that cannot fit the
context before tokenizing them.

`tokenizers`' `Tokenizer.encode` holds the GIL for the whole text (a 7 MB prompt: seconds during which no
other request, stream or health probe is served, even with the call in a thread); `encode_batch` and
`decode_batch` release it. So long texts are tokenized with those, on a few threads of their own (not the
default executor, whose threads run the scheduler's steps); short ones inline, where a thread hop would
cost more than the work. Before a long text is tokenized, its length is compared with what the context
can hold (`max_chars_per_token`); after, the token count is checked before the ids become a Python list.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from tokenizers import Tokenizer

from serve.core.engine import ContextOverflow, Engine

T = TypeVar("T")

# Work on fewer characters (or token ids) than this runs on the event loop: at most a few milliseconds.
INLINE_SIZE = 4096
# Tokenization is CPU-bound: more threads than cores would only slow each other (and the model's steps).
_POOL = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="tokenize")


async def off_loop(work: Callable[[], T], size: int) -> T:
    """`work()`, on the loop when `size` (the characters or ids it goes through) is small, else on the
    tokenizing threads (its exceptions propagate either way)."""
    if size < INLINE_SIZE:
        return work()
    return await asyncio.get_running_loop().run_in_executor(_POOL, work)


def max_chars_per_token(tokenizer: Tokenizer) -> int | None:
    """An upper bound on the characters of text one token stands for, or None where the tokenizer gives
    none. A text of more than k times the bound has more than k tokens.

    The bound is the longest vocabulary entry, which holds when nothing in the pipeline drops or merges
    characters: no normalizer or pre-tokenizer that removes text (whitespace splitting, accent stripping,
    NFC composition...), no added token that swallows the whitespace around it, no unknown-token that
    stands for a whole word or a run of unknown characters, no truncation. Byte-level BPE (Llama 3,
    SmolLM2) and SentencePiece BPE with byte fallback (Llama 2, Mistral) qualify; a vocabulary entry is
    never shorter than the text it covers (a byte-level symbol is one byte, at most one character)."""
    key = id(tokenizer)
    if key not in _bounds:
        _bounds[key] = (tokenizer, _bound(json.loads(tokenizer.to_str())))
    return _bounds[key][1]


_bounds: dict[int, tuple[Tokenizer, int | None]] = {}  # id(tokenizer) -> (the tokenizer, kept alive; bound)

_KEEPING_NORMALIZERS = {"Prepend", "NFD", "NFKD", "Lowercase"}  # (each character becomes one or more)
_KEEPING_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Digits", "UnicodeScripts", "Punctuation", "Split"}


def _keeps_characters(step: dict[str, Any] | None, keeping: set[str]) -> bool:
    if step is None:
        return True
    kind = step.get("type")
    if kind == "Sequence":
        parts = step.get("normalizers") or step.get("pretokenizers") or []
        return all(_keeps_characters(p, keeping) for p in parts)
    if kind == "Replace":  # a fixed string by one at least as long
        pattern = step.get("pattern") or {}
        return "String" in pattern and len(step.get("content", "")) >= len(pattern["String"])
    return kind in keeping and step.get("behavior") != "Removed"


def _bound(spec: dict[str, Any]) -> int | None:
    model = spec.get("model") or {}
    unknowns_per_char = model.get("unk_token") is None or model.get("byte_fallback") or not model.get("fuse_unk", True)
    if (
        model.get("type") != "BPE"
        or not unknowns_per_char
        or spec.get("truncation") is not None
        or not _keeps_characters(spec.get("normalizer"), _KEEPING_NORMALIZERS)
        or not _keeps_characters(spec.get("pre_tokenizer"), _KEEPING_PRE_TOKENIZERS)
        or any(t.get("lstrip") or t.get("rstrip") for t in spec.get("added_tokens") or [])
    ):
        return None
    entries = [*(model.get("vocab") or {}), *(t.get("content", "") for t in spec.get("added_tokens") or [])]
    return max((len(e) for e in entries), default=None) or None


def encode_text(
    tokenizer: Tokenizer, text: str, add_special_tokens: bool, limit: int, what: str = "prompt"
) -> list[int]:
    """The token ids of `text`; `BadRequest` when it has `limit` tokens or more (the engine's rule for a
    prompt), found from its length alone where the tokenizer allows (see `max_chars_per_token`). Blocking:
    run it through `off_loop`."""
    # (a text shorter than the context in characters cannot be refused by its length: skip the bound)
    per_token = max_chars_per_token(tokenizer) if len(text) >= limit else None
    if per_token is not None and len(text) > (limit - 1) * per_token:
        at_least = -(-len(text) // per_token)
        raise ContextOverflow(
            f"the {what} has {len(text)} characters, so at least {at_least} tokens; the context holds {limit}: "
            "shorten it",
            at_least,
            limit,
        )
    encoding = tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0]  # (releases the GIL)
    if len(encoding) >= limit:
        raise ContextOverflow(
            f"the {what} has {len(encoding)} tokens; the context holds {limit}: shorten it", len(encoding), limit
        )
    return encoding.ids


Prompt = str | list[int] | list[int | str]  # text, token ids, or llama.cpp's mix of ids and texts


def prompt_ids(eng: Engine, prompt: Prompt) -> list[int]:
    """A prompt as the engine takes it: text tokenized with the special tokens (refused early when it cannot
    fit the context), ids checked against the vocabulary (`Engine.submit` checks their count); in a mixed
    list each text is tokenized alone, without special tokens, as llama-server does. Blocking: see
    `off_loop`."""
    if isinstance(prompt, str):
        return encode_text(eng.tokenizer, prompt, True, eng.abi.max_seq_len)
    ids: list[int] = []
    for part in prompt:
        if isinstance(part, str):
            ids += encode_text(eng.tokenizer, part, False, eng.abi.max_seq_len)
        else:
            ids.append(part)
    return eng.check_ids(ids)


def prompt_items(value: Any, what: str) -> list[Prompt]:
    """The prompts of a llama.cpp-style input: a text; token ids; a list mixing ids and texts (one prompt);
    or a list of prompts, each a text, ids (possibly mixed), `{"prompt_string": text}` or `{"content": text
    or text parts}`. ValueError names what is wrong."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value:
        raise ValueError(f"{what} must be a text, token ids or a non-empty list of them")
    if any(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return [_mixed(value, what)]
    return [_item(v, f"{what}[{i}]") for i, v in enumerate(value)]


def _mixed(value: list[Any], what: str) -> list[int | str]:
    if not all(isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool)) for v in value):
        raise ValueError(f"{what}: a list of token ids may mix in texts, nothing else")
    return value


def _item(value: Any, what: str) -> Prompt:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return _mixed(value, what)
    if isinstance(value, dict):
        text = value.get("prompt_string", value.get("content"))
        if isinstance(text, list):  # text parts
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in text
            ):
                raise ValueError(f"{what}.content: only text parts are supported")
            text = "".join(p["text"] for p in text)
        if isinstance(text, str):
            return text
    raise ValueError(f'{what}: expected a text, token ids, {{"prompt_string": ...}} or {{"content": ...}}')


async def encode_prompts(eng: Engine, prompts: Sequence[Prompt]) -> list[list[int]]:
    """Every prompt of a request, tokenized off the loop when they are long (`BadRequest` for the first one
    that cannot be served)."""
    return await off_loop(lambda: [prompt_ids(eng, p) for p in prompts], sum(len(p) for p in prompts))


def decode_ids(tokenizer: Tokenizer, ids: list[int], skip_special_tokens: bool) -> str:
    """`tokenizer.decode`, with the GIL released (decode holds it; decode_batch does not)."""
    return tokenizer.decode_batch([ids], skip_special_tokens=skip_special_tokens)[0]
