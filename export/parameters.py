"""The program's parameter archive, written one tensor (and one row slab) at a time.

What the traced model declares (names, shapes, dtypes of `PagedLlama`'s state on the meta device) is what
gets written, each tensor converted from the source as it is read: kept GGUF quantizations repacked from
their integers (models.gguf_quant), everything else dequantized and cast. A GGUF tensor is read in slabs
of rows straight from the file, so the exporter's memory is bounded by a slab, not by the model.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator

import ml_dtypes
import numpy as np
import torch

from models import gguf_quant
from models.config import ModelError
from models.weights import IrpaWriter, ModelWeights, gguf_rows, gguf_tensor_info, gguf_values, tensor_shape

SLAB_VALUES = 1 << 25  # values per slab (128 MB as float32)
_NP = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: ml_dtypes.bfloat16, torch.int8: np.int8}


def kept_formats(weights: ModelWeights) -> dict[str, str]:
    """GGUF tensor name -> its kept format (models.gguf_quant.FORMATS), for every quantized matrix of a GGUF
    source that the kept formats can tile (rows % 16, columns % 32); others are dequantized (named on stderr)."""
    kept = {}
    for name, t in gguf_tensor_info(weights.source).items():
        shape = [int(d) for d in reversed(t.shape)]
        fmt = gguf_quant.kept_format(t.tensor_type)
        if len(shape) != 2 or fmt is None:
            continue
        if gguf_quant.fits(*shape):
            kept[name] = fmt
        else:
            print(f"[export] {name} {shape} {t.tensor_type.name}: dequantized (no kept tiling)", file=sys.stderr)
    return kept


def float16_matrices(weights: ModelWeights) -> bool:
    """Whether a GGUF source's matrices are mostly (by bytes) 16-bit floats (F16 / BF16)."""
    import gguf

    T = gguf.GGMLQuantizationType
    sizes = {True: 0, False: 0}
    for t in gguf_tensor_info(weights.source).values():
        if len(t.shape) == 2:
            sizes[t.tensor_type in (T.F16, T.BF16)] += int(t.n_bytes)
    return sizes[True] > sizes[False]


def requantized_types(weights: ModelWeights, kept: dict[str, str]) -> set[str]:
    info = gguf_tensor_info(weights.source)
    return {info[n].tensor_type.name for n in kept if not gguf_quant.exact(info[n].tensor_type)}


class Progress:
    """One stderr line every few seconds: bytes written, rate, time left."""

    def __init__(self, total: int, label: str = "parameters", every_s: float = 2.0):
        self.total, self.label, self.every_s = total, label, every_s
        self.done = 0
        self.t0 = self.last = time.perf_counter()

    def add(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.every_s or self.done >= self.total:
            self.last = now
            rate = self.done / max(now - self.t0, 1e-9)
            eta = (self.total - self.done) / rate if rate else 0.0
            print(
                f"[export] {self.label}: {self.done / 1e9:.2f}/{self.total / 1e9:.2f} GB "
                f"({100 * self.done / max(self.total, 1):.0f}%), {rate / 1e6:.0f} MB/s, ETA {eta:.0f} s",
                file=sys.stderr,
                flush=True,
            )


def _slabs(weights: ModelWeights, name: str, rows: int, cols: int, row_multiple: int = 1) -> Iterator[tuple]:
    """(raw bytes, GGUF type, row count) for slabs of a GGUF tensor's rows."""
    t = gguf_tensor_info(weights.source)[name]
    step = max(row_multiple, SLAB_VALUES // max(cols, 1) // row_multiple * row_multiple)
    for first in range(0, rows, step):
        count = min(step, rows - first)
        yield gguf_rows(weights.source, t, first, count), t.tensor_type, count


def _float_slabs(weights: ModelWeights, name: str, shape: tuple[int, ...], gguf: bool) -> Iterator[np.ndarray]:
    """The tensor as float values, slab by slab (a GGUF's rows from the file; other sources whole)."""
    if not gguf or len(shape) != 2:
        yield weights.tensors[name]
        return
    t = gguf_tensor_info(weights.source)[name]
    for raw, _, count in _slabs(weights, name, *shape):
        yield gguf_values(weights.source, t, raw).reshape(count, shape[1])


def write(
    weights: ModelWeights,
    model: torch.nn.Module,
    kept: dict[str, str],
    path,
    gguf: bool,
    extra: dict | None = None,
):
    """Write every parameter `model` (a PagedLlama, any device: only names, shapes and dtypes are read)
    declares, converted from `weights` (`gguf`: read from a GGUF file, a row slab at a time), to the IRPA at
    `path`."""
    state = model.state_dict()
    expected = {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
    total = sum(int(np.prod(s)) * torch.empty(0, dtype=d).element_size() for s, d in expected.values())
    progress = Progress(total)
    writer = IrpaWriter(path, weights.config, extra)
    try:
        for name, (shape, dtype) in expected.items():
            if name.endswith(".scales"):
                continue  # (written with its weight)
            if name in kept:
                scales = []

                def packed(name=name, shape=shape, scales=scales):
                    cols = tensor_shape(weights.tensors, name)[1]
                    for raw, qtype, count in _slabs(weights, name, shape[0], cols, gguf_quant.ROW_TILE):
                        try:
                            w, s = gguf_quant.convert(raw, qtype, count, cols)
                        except NotImplementedError as e:
                            raise ModelError(
                                f"{weights.source}: tensor {name!r} uses {qtype.name}, which has no kept format "
                                "and cannot be read; hint: re-quantise the model to Q8_0/Q4_K_M/F16"
                            ) from e
                        scales.append(s)
                        progress.add(w.nbytes + s.nbytes)
                        yield w

                writer.add_chunks(name, np.int8, shape, packed())
                scale_name = name.removesuffix(".weight") + ".scales"
                writer.add(scale_name, _checked(scale_name, np.concatenate(scales), expected[scale_name]))
                continue
            np_dtype = _NP[dtype]

            def cast(name=name, shape=shape, np_dtype=np_dtype):
                for x in _float_slabs(weights, name, shape, gguf):
                    out = np.asarray(x).astype(np_dtype, copy=False)
                    progress.add(out.nbytes)
                    yield out

            writer.add_chunks(name, np_dtype, shape, cast())
        writer.close()
    except BaseException:
        writer.abort()
        raise


def _checked(name: str, arr: np.ndarray, want: tuple) -> np.ndarray:
    shape, dtype = want
    if tuple(arr.shape) != shape or arr.dtype != _NP[dtype]:
        raise ModelError(
            f"{name}: converted to {arr.dtype}{list(arr.shape)}, the program declares {dtype}{list(shape)}"
        )
    return arr
