"""The tokenizer the server loads: an HF-style folder (tokenizer.json, tokenizer_config.json, ...) and
`TokenizerInfo`, the special ids and flags the server needs besides the `tokenizers.Tokenizer`.

Torch-free and GGUF-free (the server imports this): stdlib and tokenizers only. Building a tokenizer from
a GGUF's vocabulary, and writing the folder, is models.gguf_tokenizer (export and sharding use it).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

# Tokens that end a turn, besides EOS, when the vocabulary has them as special tokens.
EOT_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|endoftext|>", "<|end|>", "<end_of_turn>")


@dataclass
class TokenizerInfo:
    """What the server needs besides the `tokenizers.Tokenizer`."""

    bos_id: int | None
    eos_id: int | None
    eot_ids: list[int] = field(default_factory=list)  # every id that ends generation, eos included
    pad_id: int | None = None
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def _token_str(value: Any) -> str | None:
    """A special token as tokenizer_config.json spells it: a string or an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


def _ids(value: Any) -> list[int]:
    return [int(v) for v in (value if isinstance(value, list) else [value]) if v is not None]


def _chat_template(folder: Path, config: dict[str, Any]) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default", next(iter(named.values()), None))
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    return template


def load_tokenizer(path_or_dir: str | os.PathLike[str]) -> tuple[Tokenizer, TokenizerInfo]:
    """Load what `models.gguf_tokenizer.save_tokenizer` wrote, a plain HF tokenizer folder or its
    tokenizer.json. A .gguf file's vocabulary is models.gguf_tokenizer's to convert."""
    path = Path(path_or_dir)
    if path.is_file() and path.suffix == ".gguf":
        raise ValueError(
            f"{path}: a GGUF file, not a tokenizer folder; hint: pass the folder an export wrote "
            "(python -m export.paged_llm --output-dir), which holds its tokenizer.json"
        )
    folder = path.parent if path.is_file() else path
    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{folder}: no tokenizer.json (expected a tokenizer folder or its tokenizer.json)")
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    config = _read_json(folder / "tokenizer_config.json")
    model_config, gen_config = _read_json(folder / "config.json"), _read_json(folder / "generation_config.json")
    specials = {**_read_json(folder / "special_tokens_map.json"), **{k: v for k, v in config.items() if v is not None}}
    bos_token, eos_token, pad_token = (_token_str(specials.get(k)) for k in ("bos_token", "eos_token", "pad_token"))

    def token_id(token: str | None, config_key: str) -> int | None:
        found = tok.token_to_id(token) if token is not None else None
        return found if found is not None else next(iter(_ids(model_config.get(config_key))), None)

    bos_id, pad_id = token_id(bos_token, "bos_token_id"), token_id(pad_token, "pad_token_id")
    eos_ids = _ids(token_id(eos_token, "eos_token_id")) + _ids(gen_config.get("eos_token_id"))
    eos_ids += _ids(model_config.get("eos_token_id")) + _ids(config.get("eot_token_ids", []))
    added = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    eos_ids += [i for t in EOT_TOKENS if t in added and (i := tok.token_to_id(t)) is not None]
    eot_ids = list(dict.fromkeys(eos_ids))
    eos_id = eot_ids[0] if eot_ids else None

    # Without explicit flags, what the post-processor does is the truth (e.g. Llama-3 adds BOS there).
    with_specials, without = tok.encode("a").ids, tok.encode("a", add_special_tokens=False).ids
    add_bos = config.get("add_bos_token", bos_id is not None and with_specials[:1] == [bos_id] != without[:1])
    add_eos = config.get("add_eos_token", eos_id is not None and with_specials[-1:] == [eos_id] != without[-1:])
    return tok, TokenizerInfo(
        bos_id=bos_id,
        eos_id=eos_id,
        eot_ids=eot_ids,
        pad_id=pad_id,
        add_bos=bool(add_bos),
        add_eos=bool(add_eos),
        chat_template=_chat_template(folder, config),
        bos_token=bos_token if bos_token is not None or bos_id is None else tok.id_to_token(bos_id),
        eos_token=eos_token if eos_token is not None or eos_id is None else tok.id_to_token(eos_id),
    )
