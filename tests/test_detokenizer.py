"""serve/detokenizer.py: byte-correct incremental detokenization (SmolLM2's byte-level BPE and a tiny
SentencePiece-style BPE with byte fallback) and stop strings held back across pieces."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE

from serve.core.detokenizer import IncrementalDetokenizer, StopMatcher

FFFD = "\ufffd"
CHAT_PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
TEXTS = [
    "🎉🚀 👍🏽 家族 café",
    "def f(x):\n\tif x > 10:\n\t\treturn x ** 2  # square\n\n\nclass A:\n    pass\n",
    "Ünïcödé — “quotes” ✓ 日本語のテキスト 👨‍👩‍👧",
    "  leading and trailing spaces  \r\n",
]


def stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    return [detok.add(i) for i in ids] + [detok.flush()]


class CountingTokenizer:
    """A tokenizer whose decode calls are recorded (window sizes)."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok, self.sizes = tok, []

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        self.sizes.append(len(ids))
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


@pytest.fixture(scope="module")
def smol() -> Tokenizer:
    """SmolLM2's tokenizer, from its GGUF (fetched on first use): tests using it are marked slow."""
    from models.default_model import smollm2_gguf
    from models.gguf_tokenizer import tokenizer_from_gguf

    return tokenizer_from_gguf(smollm2_gguf())[0]


# --- SmolLM2 (byte-level BPE) -------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_pieces_are_byte_correct(smol, text):
    ids = smol.encode(text, add_special_tokens=False).ids
    pieces = stream(IncrementalDetokenizer(smol), ids)
    assert not any(FFFD in p for p in pieces)
    assert "".join(pieces) == smol.decode(ids) == text


@pytest.mark.slow
def test_smollm2_splits_characters_across_tokens(smol):
    """The emoji text really does exercise the hold-back: some of its tokens are partial characters."""
    ids = smol.encode(TEXTS[0], add_special_tokens=False).ids
    assert sum(FFFD in smol.decode([i]) for i in ids) >= 4
    pieces = stream(IncrementalDetokenizer(smol), ids)
    assert "" in pieces[:-1] and "🎉" in pieces


@pytest.mark.slow
def test_smollm2_special_tokens(smol):
    ids = smol.encode("Hello there!<|im_end|>", add_special_tokens=False).ids
    assert "".join(stream(IncrementalDetokenizer(smol), ids)) == "Hello there!" == smol.decode(ids)
    kept = stream(IncrementalDetokenizer(smol, skip_special_tokens=False), ids)
    assert "".join(kept) == "Hello there!<|im_end|>"


@pytest.mark.slow
def test_smollm2_after_a_prompt(smol):
    prompt = smol.encode(CHAT_PROMPT, add_special_tokens=False).ids
    gen = smol.encode("The capital of France is Paris 🇫🇷.", add_special_tokens=False).ids
    pieces = stream(IncrementalDetokenizer(smol, prompt), gen)
    assert not any(FFFD in p for p in pieces)
    full, head = smol.decode(prompt + gen), smol.decode(prompt)
    assert "".join(pieces) == full[len(head) :] == smol.decode(gen)


@pytest.mark.slow
def test_cost_is_per_window_not_per_total(smol):
    ids = smol.encode(" ".join(TEXTS) * 20, add_special_tokens=False).ids
    assert len(ids) > 500
    counting = CountingTokenizer(smol)
    prompt = smol.encode(CHAT_PROMPT, add_special_tokens=False).ids
    pieces = stream(IncrementalDetokenizer(counting, prompt), ids)
    assert "".join(pieces) == smol.decode(ids)
    assert max(counting.sizes) <= 12


# --- a tiny SentencePiece-style BPE with byte fallback --------------------------------------------


def sentencepiece(decoder: str) -> Tokenizer:
    """<unk> <s> </s>, <0x00>..<0xFF>, then the characters and merges of a few ▁words."""
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)] + ["▁"])}
    merges = []
    for word in ["▁The", "▁capital", "▁is", "▁Paris", "▁café", "."]:
        vocab.update((c, len(vocab)) for c in word if c not in vocab)
        for i in range(2, len(word) + 1):
            merges.append((word[: i - 1], word[i - 1]))
            vocab.setdefault(word[:i], len(vocab))
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    if decoder == "metaspace":
        tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(prepend_scheme="first")])
    else:  # what HF's Llama tokenizer.json (and models/tokenizer.py) use
        tok.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
    tok.add_special_tokens(specials)
    return tok


@pytest.fixture(scope="module", params=["metaspace", "llama"])
def sp(request) -> Tokenizer:
    return sentencepiece(request.param)


def test_sentencepiece_byte_fallback(sp):
    ids = sp.encode("The 家 café.").ids
    tokens = [sp.id_to_token(i) for i in ids]
    assert tokens == ["▁The", "▁", "<0xE5>", "<0xAE>", "<0xB6>", "▁café", "."]  # 家 is three byte tokens
    pieces = stream(IncrementalDetokenizer(sp), ids)
    assert pieces == ["The", " ", "", "", "家", " café", ".", ""]
    assert "".join(pieces) == sp.decode(ids) == "The 家 café."


def test_sentencepiece_leading_space_after_a_prompt(sp):
    prompt, gen = sp.encode("The capital is").ids, sp.encode("Paris.").ids
    assert sp.id_to_token(gen[0]) == "▁Paris" and sp.decode(gen) == "Paris."  # alone, the space is stripped
    assert stream(IncrementalDetokenizer(sp, prompt), gen) == [" Paris", ".", ""]
    assert "".join(stream(IncrementalDetokenizer(sp), gen)) == "Paris."  # no prompt: as decode(ids)


def test_sentencepiece_special_tokens_in_the_stream(sp):
    ids = sp.encode("The capital").ids + [sp.token_to_id("</s>")] + sp.encode("is Paris").ids
    pieces = stream(IncrementalDetokenizer(sp), ids)
    assert "".join(pieces) == sp.decode(ids) == "The capital is Paris"


def test_invalid_bytes_are_flushed_and_the_window_stays_bounded(sp):
    lone = sp.token_to_id("<0x80>")  # a continuation byte with no lead: never a character
    counting = CountingTokenizer(sp)
    detok = IncrementalDetokenizer(counting)
    pieces = stream(detok, [lone] * 50)
    assert "".join(pieces) == sp.decode([lone] * 50) == FFFD * 50
    assert max(counting.sizes) <= 2 * (IncrementalDetokenizer.MAX_PENDING + 1)
    start = sp.token_to_id("<0xE5>")  # a character cut off by the end of generation
    detok = IncrementalDetokenizer(sp)
    assert detok.add(start) == "" and detok.flush() == FFFD


# --- StopMatcher ----------------------------------------------------------------------------------


def test_stop_split_across_feeds():
    m = StopMatcher(["lo W"])
    assert m.feed("Hel") == ("He", False)  # "l" could start the stop string
    assert m.feed("lo Wo") == ("l", True)  # all in all "Hel", and never the stop string
    assert m.feed("rld") == ("", True)
    assert m.flush() == ""


def test_stop_across_many_small_feeds():
    m = StopMatcher(["lo W"])
    out = [m.feed(c) for c in "Hello World"]
    assert "".join(t for t, _ in out) == "Hel" and out[-1][1] and not out[5][1] and out[6][1]


def test_lookalike_prefix_is_released():
    m = StopMatcher(["lo W"])
    assert m.feed("Hello") == ("Hel", False)  # "lo" could start the stop string
    assert m.feed(" X") == ("lo X", False)
    assert m.flush() == ""


def test_multiple_stops_the_earliest_wins():
    m = StopMatcher(["\n\n", "END", "Q:"])
    assert m.feed("answer: 42 E") == ("answer: 42 ", False)
    assert m.feed("NQ:") == ("EN", True)
    m = StopMatcher(["abcd", "bc"])
    assert m.feed("xab") == ("x", False)  # "ab" could still become "abcd"
    assert m.feed("cX") == ("a", True)  # ... but "bc" completes first


def test_flush_returns_held_text_and_no_stops_pass_through():
    m = StopMatcher(["</answer>"])
    assert m.feed("42 </ans") == ("42 ", False)
    assert m.flush() == "</ans"
    assert StopMatcher([]).feed("anything <") == ("anything <", False)
    with pytest.raises(ValueError):
        StopMatcher([""])
