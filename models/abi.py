"""config.json: the contract between an exported program and the server (torch-free).

It carries shortfin's keys (so shortfin-style tools can read it) plus what our server needs.
Entry points, for each exported batch size N (all integer tensors are int64):
  prefill_bs{N}(tokens[N,S], start_positions[N], seq_lens[N], page_ids[N,P]) -> logits[N,V]
  decode_bs{N}(tokens[N,1], seq_lens[N], start_positions[N], page_ids[N,P]) -> logits[N,V]
     or, exported with top_k=K: (values[N,K] f32, indices[N,K] i64)
  embed_bs{N}(tokens[N,S], start_positions[N], seq_lens[N], page_ids[N,P]) -> hidden[N,S,H]
     prefill (it fills the cache too) returning every position's final-normed hidden states
  mixed(dec_tokens[Bd,1], dec_seq_lens[Bd], dec_page_ids[Bd,Pd], tokens[1,S], start_positions[1],
        seq_lens[1], page_ids[1,P]) -> logits[Bd+1,V]
     one step of decode (one token per row, at dec_seq_lens - 1) and one prefill chunk (as prefill's) in one
     call: each decode row's logits, then the chunk's last position's (full rows even with top_k); Bd, Pd,
     S and P dynamic
  score(tokens[N,S], start_positions[N], seq_lens[N], page_ids[N,P]) -> logits[N,S,V]
     prefill returning every position's logits (speculative verification, prompt logprobs); dynamic
  read_kv_cache() -> [device_block_count, E] (a copy, for tests and debugging; with tensor parallelism
     also read_kv_cache_{r}() for device r's slab)
(shortfin's argument order, less the cache.) Positions start_positions[b] .. seq_lens[b]-1 are new; in
decode start_positions = seq_lens - 1. prefill/embed dimensions are dynamic (the server pads N to an
exported batch size; S is the longest chunk of the call, positions past a sequence's seq_len are padding);
decode_bs{N} is static in N and its token column, prefill_bs1 in its batch, unless exported with
--no-static-batch; P is dynamic. The KV cache is a mutable global of the module (device_block_count pages
of E elements), updated in place: one cache per VM context, i.e. per device. A bfloat16 or float16
cache (kv_cache_dtype) is int32, each element two 16-bit values (models/llama.py).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

QUANTIZATIONS = ("none", "w8a8")  # export --quantization (models/quant.py), also serve's for its default model


@dataclass
class PagedKVCache:
    attention_head_count_kv: int
    block_seq_stride: int
    device_block_count: int
    kv_cache_dtype: str
    paged_kv_block_size_elements_per_device: list[int]


@dataclass
class ModelABI:
    module_name: str
    module_abi_version: int
    max_seq_len: int
    attn_head_dim: int
    prefill_batch_sizes: list[int]
    decode_batch_sizes: list[int]
    transformer_block_count: int
    has_prefill_position: bool
    logits_normalization: str
    top_k: int | None
    paged_kv_cache: PagedKVCache
    # ours
    vocab_size: int = 0
    activation_dtype: str = "float32"
    quantization: str = "none"  # "w8a8" (models.quant: int8 weights and activations), "gguf" (models.qlinear)
    cpu_features: list[str] = field(default_factory=list)  # what the CPU must have (models.cpu)
    attention_head_count: int = 0
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    add_bos_token: bool = False
    hidden_size: int = 0
    has_embed: bool = False  # embed_bs{N} exported for each prefill batch size
    has_mixed: bool = False  # mixed exported (one call for a step's decode and prefill)
    has_score: bool = False  # score exported (every position's logits)
    tensor_parallelism_size: int = 1  # > 1: one program over that many devices (one KV slab on each)
    parameter_files: list[str] = field(default_factory=list)  # next to config.json: model.irpa [+ rank files]
    tokenizer_files: list[str] = field(default_factory=list)
    source: str = ""

    @property
    def block_seq_stride(self) -> int:
        return self.paged_kv_cache.block_seq_stride

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> ModelABI:
        try:
            d = json.loads(Path(path).read_text())
            d["paged_kv_cache"] = PagedKVCache(**d["paged_kv_cache"])
            return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(
                f"{path}: not a model config written by export.paged_llm ({e}); "
                "hint: pass the config.json from the export's --output-dir"
            ) from e
