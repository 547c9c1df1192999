"""A tokenizer from a GGUF's vocabulary, and the HF-style folder it is saved as (export and sharding).

A GGUF has no `tokenizer.json`: it stores llama.cpp's view of the vocabulary (`tokenizer.ggml.*`).
`tokenizer_from_gguf` rebuilds a `tokenizers.Tokenizer` from it, the way transformers' GGUF
conversion does (`transformers/integrations/gguf/gguf_tokenizer_mapping.py`), with llama.cpp's
pre-tokenizer split per `tokenizer.ggml.pre` (`llama-vocab.cpp`). Its post-processor adds BOS/EOS as
the file says, so `tok.encode(text)` matches HF's `tokenizer.encode(text)`; pass
`add_special_tokens=False` for a chat-templated prompt that already starts with its own tokens.
`save_tokenizer` writes the folder that models.tokenizer (the server's loader) reads.

Torch-free: stdlib, gguf, numpy and tokenizers.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import gguf
from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from .tokenizer import EOT_TOKENS, TokenizerInfo
from .tokenizer import load_tokenizer as load_tokenizer_folder
from .weights import open_gguf

CONTROL, USER_DEFINED = int(gguf.TokenType.CONTROL), int(gguf.TokenType.USER_DEFINED)
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
# `tokenizer.ggml.pre` -> the pre-tokenizer family, grouped as llama.cpp's llm_tokenizer_bpe does.
_PRE_FAMILIES = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "dbrx", "smaug-bpe", "falcon3", "pixtral"), "llama3"),
    **dict.fromkeys(("qwen2", "stablelm2", "deepseek-r1-qwen", "hunyuan", "megrez"), "qwen2"),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"), "digits"),
    **dict.fromkeys(("gpt-2", "gpt2", "default", "mpt", "olmo", "jais"), "gpt2"),
}


# --- GGUF -> tokenizers ------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the ByteLevel alphabet)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


def _byte_level_pre_tokenizer(pre: str, source: str) -> pre_tokenizers.PreTokenizer:
    family = _PRE_FAMILIES.get(pre)
    if family is None:
        warnings.warn(f"{source}: unknown tokenizer.ggml.pre {pre!r}; using the GPT-2 split", stacklevel=3)
        family = "gpt2"
    if family == "digits":  # llama.cpp: "\p{N}" then the GPT-2 regex; HF: Digits then ByteLevel's regex
        digits = pre_tokenizers.Digits(individual_digits=True)
        return pre_tokenizers.Sequence([digits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    if family == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    split = _LLAMA3_SPLIT if family == "llama3" else _QWEN2_SPLIT
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _byte_level_bpe(meta: dict[str, Any], source: str) -> Tokenizer:
    """`gpt2`: byte-level BPE with the file's merges; tokens outside the byte alphabet get respelled."""
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {
        tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode("utf-8")): i
        for i, tok in enumerate(meta["tokens"])
    }
    if "merges" not in meta:
        raise ValueError(f"{source}: a gpt2 (byte-level BPE) vocabulary needs tokenizer.ggml.merges")
    merges = [tuple(m.split(" ", 1)) for m in meta["merges"]]
    pre = meta.get("pre", "default")
    ignore_merges = _PRE_FAMILIES.get(pre) == "llama3"  # as llama.cpp (and Llama-3's tokenizer.json)
    tok = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            ignore_merges=ignore_merges,
        )
    )
    tok.pre_tokenizer = _byte_level_pre_tokenizer(pre, source)
    tok.decoder = decoders.ByteLevel()
    return tok


def _spm_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Merges a SentencePiece-BPE vocabulary implies: transformers' `generate_merges` (with scores)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    candidates = []
    for piece, score in dict(zip(tokens, scores)).items():
        splits = ((piece[:k], piece[k:]) for k in range(1, len(piece)))
        local = [(left, right, score) for left, right in splits if left in vocab and right in vocab]
        candidates.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    candidates.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in candidates]


def _sentencepiece_bpe(meta: dict[str, Any], source: str) -> Tokenizer:
    """`llama`: SentencePiece BPE as HF's LlamaTokenizer (byte fallback, ▁ metaspace)."""
    tokens: list[str] = meta["tokens"]
    if "merges" in meta:
        merges = [tuple(m.split(" ", 1)) for m in meta["merges"]]
    elif "scores" in meta:
        merges = _spm_merges(tokens, meta["scores"])
    else:
        raise ValueError(f"{source}: a llama (SentencePiece) vocabulary needs tokenizer.ggml.scores or .merges")
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
    # HF ignores add_space_prefix (and prefixes only the text's start, "first"); we follow the file when it says no.
    prefix = bool(meta.get("add_space_prefix", True))
    scheme = "first" if prefix else "never"
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1)] if prefix else []))
    return tok


_BUILDERS = {"gpt2": _byte_level_bpe, "llama": _sentencepiece_bpe}
_DEFAULT_ADD_BOS = {"gpt2": False, "llama": True}


def _gguf_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    prefix = "tokenizer.ggml."
    meta = {key[len(prefix) :]: f.contents() for key, f in reader.fields.items() if key.startswith(prefix)}
    if (template := reader.get_field("tokenizer.chat_template")) is not None:
        meta["chat_template"] = template.contents()
    return meta


def _set_post_processor(tok: Tokenizer, info: TokenizerInfo) -> None:
    """BOS/EOS as HF's `update_post_processor` puts them."""
    bos = [info.bos_token] if info.add_bos and info.bos_token is not None else []
    eos = [info.eos_token] if info.add_eos and info.eos_token is not None else []

    def template(seq: str, type_id: int) -> list[str]:
        return [f"{t}:{type_id}" for t in bos] + [f"${seq}:{type_id}"] + [f"{t}:{type_id}" for t in eos]

    specials = [(t, info.bos_id) for t in bos] + [(t, info.eos_id) for t in eos]
    tok.post_processor = processors.TemplateProcessing(
        single=template("A", 0), pair=template("A", 0) + template("B", 1), special_tokens=list(dict.fromkeys(specials))
    )


def tokenizer_from_gguf(
    reader_or_path: gguf.GGUFReader | str | os.PathLike[str],
) -> tuple[Tokenizer, TokenizerInfo]:
    """The tokenizer a GGUF file describes, and its special ids / flags / chat template."""
    reader = reader_or_path if isinstance(reader_or_path, gguf.GGUFReader) else open_gguf(Path(reader_or_path))
    source = str(getattr(reader.data, "filename", None) or reader_or_path)
    meta = _gguf_metadata(reader)
    model = meta.get("model")
    if model not in _BUILDERS:
        raise ValueError(
            f"{source}: unsupported tokenizer model tokenizer.ggml.model={model!r}; supported: {sorted(_BUILDERS)}"
        )
    if "tokens" not in meta:
        raise ValueError(f"{source}: no tokenizer.ggml.tokens in the file")
    tok = _BUILDERS[model](meta, source)

    tokens: list[str] = meta["tokens"]
    types: list[int] = meta.get("token_type") or [1] * len(tokens)
    name: dict[str, str | None] = {}
    for key in ("bos", "eos", "unknown", "padding"):
        token_id = meta.get(f"{key}_token_id")
        if token_id is not None and not 0 <= token_id < len(tokens):
            raise ValueError(f"{source}: tokenizer.ggml.{key}_token_id={token_id} is outside the {len(tokens)} tokens")
        name[key] = tokens[token_id] if token_id is not None else None
    # As HF: control tokens (plus the named bos/eos/unk/pad) whole and special, user-defined ones whole.
    in_vocab = tok.get_vocab()
    special = [t for t, ty in zip(tokens, types) if ty == CONTROL] + [t for t in name.values() if t is not None]
    special = [t for t in dict.fromkeys(special) if t in in_vocab]
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special])
    tok.add_tokens(
        [
            AddedToken(t, normalized=False, special=False)
            for t, ty in zip(tokens, types)
            if ty == USER_DEFINED and t in in_vocab
        ]
    )

    eos_id, eot_ids = meta.get("eos_token_id"), []
    for extra in (eos_id, meta.get("eot_token_id"), meta.get("eom_token_id")):
        if extra is not None and extra not in eot_ids:
            eot_ids.append(int(extra))
    for t in EOT_TOKENS:
        i = tok.token_to_id(t)
        if i is not None and types[i] in (CONTROL, USER_DEFINED) and i not in eot_ids:
            eot_ids.append(i)
    template = meta.get("chat_template")
    # llama.cpp adds BOS for SentencePiece and Llama-3 vocabularies unless the file says otherwise.
    add_bos = meta.get("add_bos_token", _DEFAULT_ADD_BOS[model] or _PRE_FAMILIES.get(meta.get("pre", "")) == "llama3")
    info = TokenizerInfo(
        bos_id=meta.get("bos_token_id"),
        eos_id=eos_id,
        eot_ids=eot_ids,
        pad_id=meta.get("padding_token_id"),
        add_bos=bool(add_bos),
        add_eos=bool(meta.get("add_eos_token", False)),
        chat_template=template if isinstance(template, str) else None,
        bos_token=name["bos"],
        eos_token=name["eos"],
    )
    _set_post_processor(tok, info)
    return tok, info


def save_tokenizer(tok: Tokenizer, info: TokenizerInfo, out_dir: str | os.PathLike[str]) -> None:
    """Write tokenizer.json, tokenizer_config.json (HF keys plus "eot_token_ids") and special_tokens_map.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    pad = tok.id_to_token(info.pad_id) if info.pad_id is not None else None
    specials = {"bos_token": info.bos_token, "eos_token": info.eos_token, "pad_token": pad}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "add_bos_token": info.add_bos,
        "add_eos_token": info.add_eos,
        "chat_template": info.chat_template,
        "clean_up_tokenization_spaces": False,
        "eot_token_ids": info.eot_ids,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    special_map = {k: v for k, v in specials.items() if v is not None}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2, ensure_ascii=False) + "\n")


def tokenizer_near_weights(gguf_file=None, hf_dir=None, irpa_file=None) -> tuple[Tokenizer, TokenizerInfo] | None:
    """The tokenizer that goes with a model's weights: the GGUF's vocabulary, the HF folder's files, or the
    files next to an IRPA (export and sharding write them there); None when there is none."""
    if gguf_file:
        reader = open_gguf(Path(gguf_file))
        return tokenizer_from_gguf(reader) if "tokenizer.ggml.model" in reader.fields else None
    folder = Path(hf_dir) if hf_dir else Path(irpa_file).parent if irpa_file else None
    return load_tokenizer_folder(folder) if folder and (folder / "tokenizer.json").is_file() else None


def load_tokenizer(path_or_dir: str | os.PathLike[str]) -> tuple[Tokenizer, TokenizerInfo]:
    """A .gguf file's tokenizer (`tokenizer_from_gguf`), else models.tokenizer.load_tokenizer's folder."""
    path = Path(path_or_dir)
    if path.is_file() and path.suffix == ".gguf":
        return tokenizer_from_gguf(path)
    return load_tokenizer_folder(path)
