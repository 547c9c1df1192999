"""Model weights from every source a user has: GGUF, Hugging Face safetensors folders, IRPA archives.

Whatever the source, `load_weights` returns a `ModelWeights`: the `LlamaConfig` and a dict of numpy
arrays named the GGUF way (`token_embd.weight`, `blk.{i}.attn_q.weight`, ...), with Q/K rows in
GGUF's order (rotary pairs interleaved), which is the layout `models.llama` computes in.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np

from .config import LlamaConfig, ModelError, config_from_hf
from .tp import shard_config

CONFIG_KEY = "__aotllm_config__"

HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
HF_LAYER_TO_GGUF = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
LAYER_TENSORS = [v for v in HF_LAYER_TO_GGUF.values()]


@dataclass
class ModelWeights:
    config: LlamaConfig
    tensors: dict[str, np.ndarray] = field(repr=False)
    source: Path
    tp: int = 1  # > 1: tensor-parallel names and slices (sharding.shard_tensors): rank.{r}.blk.{i}.*

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        c = self.config
        shapes = {"token_embd.weight": (c.vocab_size, c.hidden_size), "output_norm.weight": (c.hidden_size,)}
        if not c.tied_embeddings:
            shapes["output.weight"] = (c.vocab_size, c.hidden_size)
        ranks = [("", c)] if self.tp == 1 else [(f"rank.{r}.", shard_config(c, self.tp)) for r in range(self.tp)]
        for prefix, rc in ranks:
            q, kv = rc.num_heads * rc.head_dim, rc.num_kv_heads * rc.head_dim
            per_layer = {
                "attn_norm.weight": (c.hidden_size,),
                "ffn_norm.weight": (c.hidden_size,),
                "attn_q.weight": (q, c.hidden_size),
                "attn_k.weight": (kv, c.hidden_size),
                "attn_v.weight": (kv, c.hidden_size),
                "attn_output.weight": (c.hidden_size, q),
                "ffn_gate.weight": (rc.intermediate_size, c.hidden_size),
                "ffn_up.weight": (rc.intermediate_size, c.hidden_size),
                "ffn_down.weight": (c.hidden_size, rc.intermediate_size),
            }
            for i in range(c.num_layers):
                shapes.update({f"{prefix}blk.{i}.{k}": v for k, v in per_layer.items()})
        return shapes

    def validate(self) -> None:
        if any(k.endswith(".weight_scale") for k in self.tensors):  # (an export's IRPA of a w8a8 program)
            raise ModelError(
                f"{self.source} holds w8a8-quantized weights; hint: export from the float "
                "model (GGUF or HF folder) with --quantization w8a8"
            )
        for name, shape in self.expected_shapes().items():
            if name not in self.tensors:
                raise ModelError(f"{self.source}: missing tensor {name!r} (expected shape {list(shape)})")
            got = tuple(self.tensors[name].shape)
            if got != shape:
                raise ModelError(
                    f"{self.source}: tensor {name!r} has shape {list(got)}, the config implies {list(shape)}"
                )


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rotate-half row order -> GGUF interleaved pairs (what llama.cpp's converter does)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---------------------------------------------------------------- GGUF


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


@functools.lru_cache(maxsize=2)
def open_gguf(path: Path):
    """A GGUFReader (parsing the metadata takes seconds on a real vocabulary: open each file once)."""
    import gguf

    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the gguf package raises ValueError/struct errors on a bad file
        raise ModelError(f"{path}: not a readable GGUF file ({e}); hint: pass a .gguf model file") from e


def read_gguf(path: Path) -> ModelWeights:
    import gguf

    path = Path(path)
    reader = open_gguf(path)
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ModelError(f"{path}: architecture {arch!r} is not supported (only 'llama'-family GGUFs)")
    tensors: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            arr = np.asarray(t.data).reshape([int(d) for d in reversed(t.shape)])
        else:
            try:
                arr = gguf.quants.dequantize(t.data, t.tensor_type)
            except NotImplementedError as e:
                raise ModelError(
                    f"{path}: tensor {t.name!r} uses quantisation {t.tensor_type.name}, which cannot be "
                    "dequantised; hint: re-quantise to Q8_0/Q4_K/F16"
                ) from e
        tensors[t.name] = arr
    heads = int(_field(reader, "llama.attention.head_count"))
    hidden = int(_field(reader, "llama.embedding_length"))
    head_dim = int(_field(reader, "llama.attention.key_length", hidden // heads))
    factors = tensors.pop("rope_freqs.weight", None)
    vocab = _field(reader, "llama.vocab_size")
    if vocab is None:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    config = LlamaConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, "llama.feed_forward_length")),
        num_layers=int(_field(reader, "llama.block_count")),
        num_heads=heads,
        num_kv_heads=int(_field(reader, "llama.attention.head_count_kv", heads)),
        head_dim=head_dim,
        rms_norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        rope_freq_factors=[float(x) for x in factors] if factors is not None else None,
        tied_embeddings="output.weight" not in tensors,
        max_seq_len=int(_field(reader, "llama.context_length", 4096)),
    )
    return ModelWeights(config, tensors, path)


# ---------------------------------------------------------------- Hugging Face


def read_hf(folder: Path) -> ModelWeights:
    from safetensors.numpy import load_file

    folder = Path(folder)
    config = config_from_hf(folder / "config.json")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ModelError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        for key, arr in _load_safetensors(folder / name, load_file).items():
            tensors[_hf_name(key, folder)] = arr
    c = config
    for i in range(c.num_layers):
        for name, heads in ((f"blk.{i}.attn_q.weight", c.num_heads), (f"blk.{i}.attn_k.weight", c.num_kv_heads)):
            if name in tensors:
                tensors[name] = permute_qk(tensors[name], heads)
    if c.tied_embeddings:
        tensors.pop("output.weight", None)
    return ModelWeights(config, tensors, folder)


def _load_safetensors(path: Path, load_file) -> dict[str, np.ndarray]:
    try:
        return load_file(path)
    except TypeError:  # bf16 has no numpy dtype in safetensors.numpy: go through torch
        import torch
        from safetensors.torch import load_file as load_torch

        return {k: v.to(torch.float32).numpy() for k, v in load_torch(path).items()}


def _hf_name(key: str, folder: Path) -> str:
    if key in HF_TO_GGUF:
        return HF_TO_GGUF[key]
    parts = key.split(".")
    if key.startswith("model.layers.") and ".".join(parts[3:]) in HF_LAYER_TO_GGUF:
        return f"blk.{parts[2]}.{HF_LAYER_TO_GGUF['.'.join(parts[3:])]}"
    if key.endswith("rotary_emb.inv_freq"):
        return key
    raise ModelError(f"{folder}: unexpected tensor {key!r} for a llama model")


# ---------------------------------------------------------------- IRPA


def _np_dtype(name: str):
    return ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)


def write_irpa(weights: ModelWeights, path: Path, extra: dict | None = None) -> None:
    """Write tensors (and the config, as one JSON blob) to an IREE parameter archive."""
    import iree.runtime as rt

    index = rt.ParameterIndex()
    meta = {"config": weights.config.to_json(), "tensors": {}, **(extra or {})}
    for name, arr in weights.tensors.items():
        arr = np.ascontiguousarray(arr)
        meta["tensors"][name] = {"dtype": arr.dtype.name, "shape": list(arr.shape)}
        index.add_buffer(name, arr.reshape(-1).view(np.uint8))
    index.add_buffer(CONFIG_KEY, np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    index.create_archive_file(str(path))


def read_irpa_meta(path: Path):
    import iree.runtime as rt

    index = rt.ParameterIndex()
    try:
        index.load(str(path))
    except Exception as e:
        raise ModelError(f"{path}: not a readable IRPA archive ({e})") from e
    entries = dict(index.items())
    if CONFIG_KEY not in entries:
        raise ModelError(f"{path}: IRPA has no aotllm config entry; hint: write it with export.paged_llm")
    meta = json.loads(bytes(np.asarray(entries[CONFIG_KEY].file_view)).decode())
    return index, entries, meta


def rank_paths(path: Path, tp: int) -> list[Path]:
    """model.irpa -> [model.rank0.irpa, ...]: where a tensor-parallel model's rank slices are."""
    path = Path(path)
    return [path.with_name(f"{path.stem}.rank{r}{path.suffix}") for r in range(tp)]


def read_irpa(path: Path) -> ModelWeights:
    """An IRPA written by export.paged_llm or sharding (then with its rank files, found next to it)."""
    _, entries, meta = read_irpa_meta(path)
    tp = int(meta.get("tensor_parallelism_size", 1))
    tensors = {}
    for file in [Path(path)] + (rank_paths(path, tp) if tp > 1 else []):
        if file != Path(path):
            if not file.is_file():
                raise ModelError(
                    f"{path} is sharded {tp} ways but {file} is missing; hint: keep the "
                    "model.rank*.irpa files `python -m sharding` wrote next to it"
                )
            _, entries, meta = read_irpa_meta(file)
        for name, info in meta["tensors"].items():
            if name not in entries:
                raise ModelError(f"{file}: missing tensor {name!r}")
            raw = np.asarray(entries[name].file_view)
            tensors[name] = raw.view(_np_dtype(info["dtype"])).reshape(info["shape"])
    return ModelWeights(LlamaConfig.from_json(meta["config"]), tensors, Path(path), tp)


def load_weights(gguf_file=None, hf_dir=None, irpa_file=None) -> ModelWeights:
    given = [x for x in (gguf_file, hf_dir, irpa_file) if x]
    if len(given) != 1:
        raise ModelError("give exactly one of --gguf-file, --hf-dir, --irpa-file")
    for value, reader in ((gguf_file, read_gguf), (hf_dir, read_hf), (irpa_file, read_irpa)):
        if value:
            if not Path(value).exists():
                raise ModelError(f"{value}: no such file or directory")
            weights = reader(Path(value))
    weights.validate()
    return weights
