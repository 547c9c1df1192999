"""models/gguf_tokenizer.py (and models/tokenizer.py, the folder loader): GGUF vocabularies rebuilt as
`tokenizers.Tokenizer`, checked against transformers' own GGUF conversion
(`AutoTokenizer.from_pretrained(dir, gguf_file=...)`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from tokenizers import Regex, pre_tokenizers, processors

from models.gguf_tokenizer import load_tokenizer, save_tokenizer, tokenizer_from_gguf
from models.tokenizer import TokenizerInfo

REPO = Path(__file__).resolve().parents[1]
CHAT_PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
TEXTS = [
    "In 2024, 12345 apples cost $3.50",
    "café naïve résumé Ærøskøbing",
    "🎉🚀 👍🏽",
    "def f(x):\n\tif x > 10:\n\t\treturn x ** 2  # square\n    return None\n\n\nclass A:\n    pass\n",
    CHAT_PROMPT,
    "  leading and trailing spaces  ",
    "I'm sure they'LL say it's fine, don't you?",
    "<|endoftext|>after end<|im_end|>",
]


def write_gguf(
    path: Path,
    tokens: list[str],
    types: list[int],
    *,
    model: str = "llama",
    pre: str | None = None,
    scores: list[float] | None = None,
    merges: list[str] | None = None,
    bos: int | None = 1,
    eos: int | None = 2,
    unk: int | None = 0,
    add_bos: bool | None = None,
    chat_template: str | None = None,
    add_space_prefix: bool | None = None,
) -> Path:
    """A GGUF with tokenizer metadata, minimal llama metadata and one tiny tensor (enough for transformers)."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(4)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model(model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if scores is not None:
        w.add_token_scores(scores)
    if merges is not None:
        w.add_token_merges(merges)
    for value, add in ((bos, w.add_bos_token_id), (eos, w.add_eos_token_id), (unk, w.add_unk_token_id)):
        if value is not None:
            add(value)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    if add_space_prefix is not None:
        w.add_add_space_prefix(add_space_prefix)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def hf_gguf_tokenizer(path: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


# --- a tiny SentencePiece (llama) vocabulary --------------------------------------------------

SPM_PIECES = [
    "▁",
    "▁h",
    "▁he",
    "▁hel",
    "▁hell",
    "▁hello",
    "▁w",
    "▁wo",
    "▁wor",
    "▁world",
    "h",
    "e",
    "l",
    "o",
    "w",
    "r",
    "d",
    "ll",
    "lo",
    "or",
    "ld",
    "▁t",
    "▁th",
    "▁the",
    "t",
    "▁▁",
    "a",
    "▁a",
]
SPM_TEXTS = [
    "hello world",
    " hello  world",
    "héllo wörld ☃",
    "the<|im_end|>the",
    "",
    "日本 hello\tworld\n",
    "a a a",
    "unknown: ß∑😀",
]


@pytest.fixture(scope="module")
def spm_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{i:02X}>" for i in range(256)), *SPM_PIECES, "<|im_end|>"]
    types = [2, 3, 3, *[6] * 256, *[1] * len(SPM_PIECES), 3]
    scores = [0.0] * 259 + [-float(i) for i in range(len(SPM_PIECES))] + [0.0]
    return write_gguf(
        tmp_path_factory.mktemp("spm") / "spm.gguf", tokens, types, scores=scores, chat_template="{{ messages }}"
    )


def test_spm_matches_hf_conversion(spm_gguf: Path) -> None:
    tok, info = tokenizer_from_gguf(spm_gguf)
    hf = hf_gguf_tokenizer(spm_gguf)
    for text in SPM_TEXTS:
        ids = tok.encode(text).ids
        assert ids == hf.encode(text), text
        assert tok.encode(text, add_special_tokens=False).ids == hf.encode(text, add_special_tokens=False), text
        assert tok.decode(ids, skip_special_tokens=False) == hf.decode(ids), text
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True), text
    # Unknown characters fall back to their UTF-8 bytes.
    assert tok.encode("ß", add_special_tokens=False).tokens == ["▁", "<0xC3>", "<0x9F>"]
    assert tok.decode(tok.encode("héllo wörld ☃").ids) == "héllo wörld ☃"
    assert info == TokenizerInfo(
        bos_id=1,
        eos_id=2,
        eot_ids=[2, 287],
        pad_id=None,
        add_bos=True,
        add_eos=False,
        chat_template="{{ messages }}",
        bos_token="<s>",
        eos_token="</s>",
    )


def test_spm_add_space_prefix_false_is_honoured(tmp_path: Path, spm_gguf: Path) -> None:
    """HF ignores tokenizer.ggml.add_space_prefix; llama.cpp (and we) add no leading ▁ when it is false."""
    fields = gguf.GGUFReader(spm_gguf).fields
    tokens, types, scores = (fields[f"tokenizer.ggml.{key}"].contents() for key in ("tokens", "token_type", "scores"))
    path = write_gguf(tmp_path / "nospace.gguf", tokens, types, scores=scores, add_space_prefix=False)
    tok, _ = tokenizer_from_gguf(path)
    assert tok.encode("hello world", add_special_tokens=False).tokens == ["h", "e", "ll", "o", "▁world"]
    assert tok.decode(tok.encode(" hello").ids) == " hello"


# --- a tiny byte-level BPE (gpt2) vocabulary --------------------------------------------------


def byte_level_gguf(path: Path, pre: str) -> Path:
    from models.gguf_tokenizer import _bytes_to_unicode

    alphabet = list(_bytes_to_unicode().values())
    merges = ["1 2", "12 3", "4 5", "h e", "l l", "ll o", "he llo", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d"]
    merged = [m.replace(" ", "") for m in merges]
    tokens = ["<|begin_of_text|>", "<|eot_id|>", *alphabet, *merged, "<think>"]
    types = [3, 3, *[1] * (len(alphabet) + len(merged)), 4]
    return write_gguf(path, tokens, types, model="gpt2", pre=pre, merges=merges, bos=0, eos=1, unk=None, add_bos=True)


def test_llama_bpe_groups_digits_by_three(tmp_path: Path) -> None:
    path = byte_level_gguf(tmp_path / "llama3.gguf", "llama-bpe")
    tok, info = tokenizer_from_gguf(path)
    assert [piece for piece, _ in tok.pre_tokenizer.pre_tokenize_str("12345")] == ["123", "45"]
    assert tok.encode("12345", add_special_tokens=False).tokens == ["123", "45"]
    assert info.bos_id == 0 and info.add_bos and info.eot_ids == [1]
    hf = hf_gguf_tokenizer(path)
    for text in ["12345 hello world", "hello<|eot_id|> world 9876543", "<think>hello</think>", "héllo"]:
        assert tok.encode(text).ids == hf.encode(text), text
        assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == "<|begin_of_text|>" + text


def test_smollm_pre_splits_like_llama_cpp(tmp_path: Path) -> None:
    """llama.cpp's smollm split is the regex list ["\\p{N}", gpt-2 regex]; ours is Digits then ByteLevel."""
    tok, _ = tokenizer_from_gguf(byte_level_gguf(tmp_path / "smollm.gguf", "smollm"))
    gpt2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
    llama_cpp = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r"\p{N}"), "isolated"), pre_tokenizers.Split(Regex(gpt2), "isolated")]
    )
    for text in [*TEXTS, " ½ ¼ x² ⅞ ٣٤ 一二", "a1b22 333\n\n 4"]:
        ours = [span for _, span in tok.pre_tokenizer.pre_tokenize_str(text)]
        assert ours == [span for _, span in llama_cpp.pre_tokenize_str(text)], text


@pytest.mark.parametrize("pre", ["gpt-2", "default", "qwen2"])
def test_other_pre_types_match_hf(tmp_path: Path, pre: str) -> None:
    path = byte_level_gguf(tmp_path / f"{pre}.gguf", pre)
    tok, _ = tokenizer_from_gguf(path)
    hf = hf_gguf_tokenizer(path)
    for text in ["12345 hello world", "hello<|eot_id|> world's 9876543\n\n  x"]:
        assert tok.encode(text).ids == hf.encode(text), (pre, text)


# --- errors, saving, loading ------------------------------------------------------------------


def test_unsupported_model_type(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "rwkv.gguf", ["<s>", "a"], [3, 1], model="rwkv", bos=0, eos=None, unk=None)
    with pytest.raises(ValueError, match=r"rwkv\.gguf.*'rwkv'"):
        tokenizer_from_gguf(path)


def test_save_load_round_trip(tmp_path: Path, spm_gguf: Path) -> None:
    tok, info = tokenizer_from_gguf(gguf.GGUFReader(spm_gguf))
    save_tokenizer(tok, info, tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
    assert config["eot_token_ids"] == [2, 287] and config["add_bos_token"] is True
    assert json.loads((tmp_path / "saved" / "special_tokens_map.json").read_text())["eos_token"] == "</s>"
    for where in (tmp_path / "saved", tmp_path / "saved" / "tokenizer.json"):
        loaded, loaded_info = load_tokenizer(where)
        assert loaded_info == info
        for text in SPM_TEXTS:
            assert loaded.encode(text).ids == tok.encode(text).ids
    # transformers reads the folder too.
    hf = pytest.importorskip("transformers").AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
    assert [hf.encode(t) for t in SPM_TEXTS] == [tok.encode(t).ids for t in SPM_TEXTS]
    assert load_tokenizer(spm_gguf)[1] == info


def test_load_plain_hf_folder(tmp_path: Path, spm_gguf: Path) -> None:
    tok, _ = tokenizer_from_gguf(spm_gguf)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<s>",
                "eos_token": {"content": "</s>", "special": True},
                "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}],
            }
        )
    )
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 287]}))
    _, info = load_tokenizer(tmp_path)
    assert info == TokenizerInfo(
        bos_id=1,
        eos_id=2,
        eot_ids=[2, 287],
        pad_id=None,
        add_bos=True,
        add_eos=False,
        chat_template="D",
        bos_token="<s>",
        eos_token="</s>",
    )
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path / "missing")


def test_module_is_torch_free() -> None:
    code = "import sys, models.tokenizer; assert not {'torch', 'transformers'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


# --- the real model: SmolLM2-135M-Instruct -----------------------------------------------------


@pytest.fixture(scope="module")
def smollm2() -> tuple[Path, object, TokenizerInfo, object]:
    from models.default_model import smollm2_gguf

    path = smollm2_gguf()
    tok, info = tokenizer_from_gguf(path)
    return path, tok, info, hf_gguf_tokenizer(path)


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_ids_match_hf(smollm2, text: str) -> None:
    _, tok, _, hf = smollm2
    ids = tok.encode(text).ids
    assert ids == hf.encode(text)
    assert tok.decode(ids, skip_special_tokens=False) == text


@pytest.mark.slow
def test_smollm2_special_tokens_and_info(smollm2) -> None:
    path, tok, info, _ = smollm2
    reader = gguf.GGUFReader(path)
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert info.eos_id == field("tokenizer.ggml.eos_token_id") == tok.token_to_id("<|im_end|>") == 2
    assert info.bos_id == field("tokenizer.ggml.bos_token_id") == 1 and info.bos_token == "<|im_start|>"
    assert info.eos_token == "<|im_end|>" and info.pad_id == 2 and not info.add_bos and not info.add_eos
    assert info.eot_ids == [2, tok.token_to_id("<|endoftext|>")]
    assert info.chat_template == field("tokenizer.chat_template") and "<|im_start|>" in info.chat_template
    assert tok.encode(CHAT_PROMPT).tokens[:3] == ["<|im_start|>", "user", "Ċ"]
    assert tok.encode(CHAT_PROMPT).ids.count(2) == 1  # <|im_end|> is one id
    # Same pre-tokenizer as HF's SmolLM2 tokenizer.json: individual digits, then ByteLevel's GPT-2 regex.
    pre = json.loads(tok.to_str())["pre_tokenizer"]
    assert [p["type"] for p in pre["pretokenizers"]] == ["Digits", "ByteLevel"]
    assert pre["pretokenizers"][0]["individual_digits"] and pre["pretokenizers"][1]["use_regex"]


@pytest.mark.slow
def test_smollm2_save_load_round_trip(smollm2, tmp_path: Path) -> None:
    _, tok, info, _ = smollm2
    save_tokenizer(tok, info, tmp_path)
    loaded, loaded_info = load_tokenizer(tmp_path)
    assert loaded_info == info
    assert [loaded.encode(t).ids for t in TEXTS] == [tok.encode(t).ids for t in TEXTS]
