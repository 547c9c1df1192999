"""Hyper-parameters of a Llama-family model, read from GGUF metadata or a Hugging Face config.json."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path


class ModelError(ValueError):
    """A model file that we cannot use; the message names the file and what to do."""


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Per-frequency divisors of the rotary inverse frequencies (Llama-3.1 "llama3" rope scaling;
    # GGUF's rope_freqs.weight). None: no scaling.
    rope_freq_factors: list[float] | None = field(default=None, repr=False)
    tied_embeddings: bool = False
    max_seq_len: int = 4096

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ModelError(f"attention heads ({self.num_heads}) must be a multiple of KV heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ModelError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> LlamaConfig:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def llama3_rope_factors(head_dim: int, theta: float, scaling: dict) -> list[float]:
    """Divisors of inv_freq for rope_type=llama3 (as llama.cpp's converter writes rope_freqs)."""
    factor = float(scaling["factor"])
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    factors = []
    for i in range(0, head_dim, 2):
        freq = 1.0 / theta ** (i / head_dim)
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return factors


def config_from_hf(config_path: Path) -> LlamaConfig:
    try:
        c = json.loads(Path(config_path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"{config_path}: cannot read Hugging Face config ({e})") from e
    arch = c.get("model_type", "llama")
    if arch not in ("llama", "mistral"):
        raise ModelError(
            f"{config_path}: model_type {arch!r} is not supported; aotllm serves llama-architecture models"
        )
    heads = c["num_attention_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    theta = float(c.get("rope_theta", (c.get("rope_parameters") or {}).get("rope_theta", 10000.0)))
    scaling = c.get("rope_scaling") or c.get("rope_parameters")
    factors = None
    if scaling and scaling.get("rope_type", scaling.get("type")) == "llama3":
        factors = llama3_rope_factors(head_dim, theta, scaling)
    elif scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        raise ModelError(f"{config_path}: rope scaling {scaling!r} is not supported (only llama3)")
    return LlamaConfig(
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"],
        num_layers=c["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=c.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        rms_norm_eps=float(c.get("rms_norm_eps", 1e-5)),
        rope_theta=theta,
        rope_freq_factors=factors,
        tied_embeddings=bool(c.get("tie_word_embeddings", False)),
        max_seq_len=int(c.get("max_position_embeddings", 4096)),
    )
