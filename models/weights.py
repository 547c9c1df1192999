"""Model weights from every source a user has: GGUF, Hugging Face safetensors folders, IRPA archives.

Whatever the source, `load_weights` returns a `ModelWeights`: the `LlamaConfig` and a mapping of numpy
arrays named the GGUF way (`token_embd.weight`, `blk.{i}.attn_q.weight`, ...), with Q/K rows in
GGUF's order (rotary pairs interleaved), which is the layout `models.llama` computes in.

The mapping is lazy (`LazyTensors`): a tensor is read (and a GGUF quantization dequantized) when asked
for and not kept, so an exporter that writes one tensor at a time (`IrpaWriter`) holds one at a time.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Iterator, Mapping
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


class LazyTensors(Mapping):
    """name -> array, each read by `load(name)` when asked for (not cached); shapes known up front."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], load: Callable[[str], np.ndarray]):
        self.shapes, self._load = shapes, load

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.shapes:
            raise KeyError(name)
        return self._load(name)

    def __contains__(self, name: object) -> bool:  # (Mapping's would read the tensor)
        return name in self.shapes

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def tensor_shape(tensors: Mapping[str, np.ndarray], name: str) -> tuple[int, ...]:
    return tuple(tensors.shapes[name]) if isinstance(tensors, LazyTensors) else tuple(tensors[name].shape)


@dataclass
class ModelWeights:
    config: LlamaConfig
    tensors: Mapping[str, np.ndarray] = field(repr=False)
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
            got = tensor_shape(self.tensors, name)
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


def gguf_rows(path: Path, t, first: int, count: int) -> np.ndarray:
    """Raw bytes of rows [first, first + count) of GGUF tensor `t` ([count, row bytes] uint8), read from the
    file rather than its memory map: pages of a map stay in the process's resident set after use."""
    rows = int(np.prod([int(d) for d in t.shape[1:]]))
    row_bytes = int(t.n_bytes) // rows
    with open(path, "rb") as f:
        f.seek(int(t.data_offset) + first * row_bytes)
        raw = np.fromfile(f, dtype=np.uint8, count=count * row_bytes)
    return raw.reshape(count, row_bytes)


def gguf_values(path: Path, t, raw: np.ndarray) -> np.ndarray:
    """Raw rows of GGUF tensor `t` (gguf_rows) as values: F32 and F16 as stored, anything else dequantized
    to float32; [rows, columns]."""
    import gguf

    T = gguf.GGMLQuantizationType
    if t.tensor_type in (T.F32, T.F16):
        return raw.view(np.float32 if t.tensor_type == T.F32 else np.float16)
    try:
        return gguf.quants.dequantize(raw, t.tensor_type)
    except NotImplementedError as e:
        raise ModelError(
            f"{path}: tensor {t.name!r} uses quantisation {t.tensor_type.name}, which cannot be "
            "dequantised; hint: re-quantise to Q8_0/Q4_K/F16"
        ) from e


def _gguf_tensor(path: Path, t) -> np.ndarray:
    shape = [int(d) for d in reversed(t.shape)]
    raw = gguf_rows(path, t, 0, int(np.prod(shape[:-1])) if len(shape) > 1 else 1)
    return gguf_values(path, t, raw).reshape(shape)


def read_gguf(path: Path) -> ModelWeights:
    path = Path(path)
    reader = open_gguf(path)
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ModelError(f"{path}: architecture {arch!r} is not supported (only 'llama'-family GGUFs)")
    by_name = dict(gguf_tensor_info(path))
    factors = _gguf_tensor(path, by_name.pop("rope_freqs.weight")) if "rope_freqs.weight" in by_name else None
    shapes = {name: tuple(int(d) for d in reversed(t.shape)) for name, t in by_name.items()}
    tensors = LazyTensors(shapes, lambda name: _gguf_tensor(path, by_name[name]))
    heads = int(_field(reader, "llama.attention.head_count"))
    hidden = int(_field(reader, "llama.embedding_length"))
    head_dim = int(_field(reader, "llama.attention.key_length", hidden // heads))
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
        tied_embeddings="output.weight" not in shapes,
        max_seq_len=int(_field(reader, "llama.context_length", 4096)),
    )
    return ModelWeights(config, tensors, path)


@functools.lru_cache(maxsize=2)
def gguf_tensor_info(path: Path) -> dict:
    """name -> the GGUF's tensor record (type, shape, offset) for raw reads (models.gguf_quant); do not
    modify (shared)."""
    return {t.name: t for t in open_gguf(Path(path)).tensors}


# ---------------------------------------------------------------- Hugging Face


def read_hf(folder: Path) -> ModelWeights:
    from safetensors import safe_open

    folder = Path(folder)
    config = config_from_hf(folder / "config.json")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ModelError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    where: dict[str, tuple[Path, str]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for name in files:
        with safe_open(folder / name, framework="pt") as f:
            for key in f.keys():
                gname = _hf_name(key, folder)
                where[gname] = (folder / name, key)
                shapes[gname] = tuple(f.get_slice(key).get_shape())
    if config.tied_embeddings:
        shapes.pop("output.weight", None)
    heads = {}
    for i in range(config.num_layers):
        heads[f"blk.{i}.attn_q.weight"] = config.num_heads
        heads[f"blk.{i}.attn_k.weight"] = config.num_kv_heads

    def load(name: str) -> np.ndarray:
        import torch

        file, key = where[name]
        with safe_open(file, framework="pt") as f:
            t = f.get_tensor(key)
        arr = (t if t.dtype in (torch.float32, torch.float16) else t.to(torch.float32)).numpy()
        return permute_qk(arr, heads[name]) if name in heads else arr

    return ModelWeights(config, LazyTensors(shapes, load), folder)


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


class IrpaWriter:
    """An IREE parameter archive written one tensor at a time: `add` appends a tensor's bytes to a data file
    next to the archive (so nothing accumulates in memory); `close` writes the archive from that file
    (IREE copies the spans) with the config and tensor table as one JSON entry, and removes the data file."""

    def __init__(self, path: Path, config: LlamaConfig, extra: dict | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.meta = {"config": config.to_json(), "tensors": {}, **(extra or {})}
        self.data_path = self.path.with_name(self.path.name + ".data")
        self.data = open(self.data_path, "wb")
        self.spans: list[tuple[str, int, int]] = []
        self.bytes = 0

    def add(self, name: str, arr: np.ndarray) -> None:
        self.add_chunks(name, arr.dtype, arr.shape, [arr])

    def add_chunks(self, name: str, dtype, shape, chunks) -> None:
        """One tensor of `dtype` and `shape` from consecutive chunks of its row-major data."""
        dtype = np.dtype(dtype)
        pad = -self.bytes % 64
        self.data.write(b"\0" * pad)
        self.bytes += pad
        start = self.bytes
        for chunk in chunks:
            chunk = np.ascontiguousarray(chunk)
            if chunk.dtype != dtype:
                raise ValueError(f"{name}: a {chunk.dtype} chunk for a {dtype} tensor")
            self.data.write(chunk.reshape(-1).view(np.uint8).data)
            self.bytes += chunk.nbytes
        want = int(np.prod(shape)) * dtype.itemsize
        if self.bytes - start != want:
            raise ValueError(f"{name}: {self.bytes - start} bytes written for {dtype.name}{list(shape)} ({want})")
        self.meta["tensors"][name] = {"dtype": dtype.name, "shape": [int(d) for d in shape]}
        self.spans.append((name, start, want))

    def abort(self) -> None:
        """Remove what was written (a failed export leaves no partial archive behind)."""
        self.data.close()
        self.data_path.unlink(missing_ok=True)
        self.path.unlink(missing_ok=True)

    def close(self) -> None:
        import iree.runtime as rt

        self.data.close()
        fd = os.open(self.data_path, os.O_RDONLY)
        try:
            handle = rt.FileHandle.wrap_fd(fd, readable=True, writable=False)
            index = rt.ParameterIndex()
            for name, offset, length in self.spans:
                if length:
                    index.add_from_file_handle(name, handle, length, offset)
                else:
                    index.add_buffer(name, np.zeros(0, np.uint8))
            index.add_buffer(CONFIG_KEY, np.frombuffer(json.dumps(self.meta).encode(), dtype=np.uint8))
            index.create_archive_file(str(self.path))
        except BaseException:
            self.path.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
            self.data_path.unlink()


def write_irpa(weights: ModelWeights, path: Path, extra: dict | None = None) -> None:
    """Write tensors (and the config, as one JSON blob) to an IREE parameter archive."""
    writer = IrpaWriter(path, weights.config, extra)
    for name, arr in weights.tensors.items():
        writer.add(name, arr)
    writer.close()


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
