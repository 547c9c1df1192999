"""Tiny random Llamas that the tests build themselves: an HF folder and the GGUF llama.cpp would write."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.weights import HF_LAYER_TO_GGUF, HF_TO_GGUF, permute_qk


@dataclass(frozen=True)
class Variant:
    name: str
    heads: int = 4
    kv_heads: int = 2
    hidden: int = 64
    head_dim: int | None = None
    layers: int = 2
    vocab: int = 128
    tied: bool = False
    llama3_rope: bool = False
    theta: float = 10000.0
    intermediate: int = 96


VARIANTS = [
    Variant("mha", heads=4, kv_heads=4),
    Variant("gqa", heads=4, kv_heads=2),
    Variant("mqa", heads=4, kv_heads=1, tied=True),
    Variant("head_dim", heads=4, kv_heads=2, hidden=48, head_dim=32, theta=500000.0),
    Variant("llama31", heads=4, kv_heads=2, llama3_rope=True, theta=500000.0),
]


def hf_model(v: Variant, seed: int = 0):
    import transformers

    kw = dict(
        vocab_size=v.vocab,
        hidden_size=v.hidden,
        intermediate_size=v.intermediate,
        num_hidden_layers=v.layers,
        num_attention_heads=v.heads,
        num_key_value_heads=v.kv_heads,
        head_dim=v.head_dim or v.hidden // v.heads,
        rms_norm_eps=1e-5,
        max_position_embeddings=512,
        tie_word_embeddings=v.tied,
        rope_theta=v.theta,
    )
    if v.llama3_rope:
        kw["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
    cfg = transformers.LlamaConfig(**kw)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # HF initialises norms to 1: randomise them so they are really tested
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    return model


def save_hf(model, folder: Path) -> Path:
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def write_gguf(model, path: Path, quant: dict[str, str] | None = None) -> Path:
    """Write `model` as llama.cpp's convert_hf_to_gguf would: permuted Q/K, rope_freqs for llama3.

    quant: tensor (blk.* by short name: attn_q, ...; others by full name) -> a GGUF type. The gguf package
    cannot quantise K-quants: those tensors get random valid blocks instead (bench.random_gguf). A tensor
    whose row does not divide into the type's blocks stays F32, as llama.cpp's quantizer leaves it."""
    import gguf

    cfg = model.config
    c = config_from_hf_dict(cfg)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_layers)
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_heads)
    w.add_head_count_kv(c.num_kv_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    if c.rope_freq_factors is not None:
        w.add_tensor("rope_freqs.weight", np.array(c.rope_freq_factors, dtype=np.float32))
    quant = quant or {}
    for key, t in model.state_dict().items():
        if key.endswith("rotary_emb.inv_freq") or (c.tied_embeddings and key == "lm_head.weight"):
            continue
        if key in HF_TO_GGUF:
            name = HF_TO_GGUF[key]
        else:
            parts = key.split(".")
            name = f"blk.{parts[2]}.{HF_LAYER_TO_GGUF['.'.join(parts[3:])]}"
        arr = t.detach().float().numpy()
        if name.endswith("attn_q.weight"):
            arr = permute_qk(arr, c.num_heads)
        elif name.endswith("attn_k.weight"):
            arr = permute_qk(arr, c.num_kv_heads)
        qtype = quant.get(name.split(".")[-2] if name.startswith("blk.") else name)
        block = gguf.constants.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][0] if qtype else 1
        if qtype and arr.ndim == 2 and arr.shape[1] % block == 0:
            qt = gguf.GGMLQuantizationType[qtype]
            if qtype.endswith("_K"):
                from bench.random_gguf import random_kquant

                rng = np.random.default_rng(len(name) * 7 + arr.shape[0])
                w.add_tensor(name, random_kquant(arr.shape[0], arr.shape[1], qtype, rng, 0.002), raw_dtype=qt)
            else:
                w.add_tensor(name, gguf.quants.quantize(arr, qt), raw_dtype=qt)
        else:
            w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def rewrite_gguf(src: Path, dst: Path, replace) -> Path:
    """A copy of GGUF `src` at `dst` with some tensors replaced: replace(index, tensor record, rows, cols)
    returns (raw data, GGML type) for a tensor to replace, None to copy it."""
    import gguf

    reader = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(str(dst), "llama")
    for key, field in reader.fields.items():
        if not key.startswith(("GGUF.", "general.architecture")):
            w.add_key_value(key, field.contents(), field.types[0], field.types[-1] if len(field.types) > 1 else None)
    for i, t in enumerate(reader.tensors):
        new = replace(i, t, int(t.shape[1]) if len(t.shape) > 1 else 1, int(t.shape[0]))
        data, qtype = new if new is not None else (np.asarray(t.data), t.tensor_type)
        w.add_tensor(t.name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def config_from_hf_dict(cfg):
    import json
    import tempfile

    from models.config import config_from_hf

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "config.json"
        p.write_text(json.dumps(cfg.to_dict()))
        return config_from_hf(p)


def char_tokenizer(vocab: int = 128):
    """A character-level tokenizer for the tiny models: ids 0-2 are <unk> <s> </s>, then printable ASCII."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from models.tokenizer import TokenizerInfo

    chars = [chr(c) for c in range(32, 127)][: vocab - 3]
    table = {"<unk>": 0, "<s>": 1, "</s>": 2, **{ch: i + 3 for i, ch in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(table, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    info = TokenizerInfo(bos_id=1, eos_id=2, eot_ids=[2], bos_token="<s>", eos_token="</s>")
    return tok, info
