"""GGUF's quantized blocks -> the kept formats the compiled matmuls read (models.qlinear), without floats.

A kept tensor [N, K] is `w = d * u - m` in groups of 32 consecutive inputs: u an unsigned 8- or 4-bit
integer, d and m one scale and one offset per (row, group). In the symmetric formats ("q8", "q4") m is
2**(bits - 1) * d and not stored; "q8m" and "q4m" store it. Every GGUF type our model family ships maps to
one from its integers:

| GGUF | kept | how |
|---|---|---|
| Q8_0 | q8 | u = q + 128 (exact) |
| Q4_0 | q4 | u = q (exact) |
| Q5_0 | q8 | u = q + 112 (exact) |
| Q4_1 | q4m | u = q, m = -min (exact) |
| Q5_1 | q8m | u = the 5-bit q, m = -min (exact) |
| Q4_K | q4m | u = q, d = d * sc, m = dmin * min per 32-group sub-block (exact but for f16 rounding of d, m) |
| Q5_K | q8m | as Q4_K with 5-bit q |
| Q6_K | q8 | its integers sc * (q - 32), two 16-blocks to a group, rescaled to 8 bits (near: 1/254 of a group's max) |
| other quantized (Q2_K, Q3_K, IQ*) | q8 | dequantized one row slab at a time, requantized like Q8_0 (near) |

d and m are stored as float16 (the GGUF's own scales are float16; K-quant products d * sc round to 11 bits).
Torch-free (numpy): the exporter streams tensors through here one row slab at a time.
"""

from __future__ import annotations

import numpy as np

GROUP = 32
ROW_TILE = 16  # output rows interleaved per tile (the kernel's register width in f32 lanes)
FORMATS = {"q8": (8, True), "q8m": (8, False), "q4": (4, True), "q4m": (4, False)}  # -> (bits, symmetric)


def _types():
    from gguf import GGMLQuantizationType as T

    return T


def kept_format(qtype) -> str | None:
    """The kept format of a quantized GGUF type (FORMATS), None for a float one (F32, F16, BF16)."""
    T = _types()
    if qtype in (T.F32, T.F16, T.BF16):
        return None
    if qtype in (T.Q4_1, T.Q4_K):
        return "q4m"
    if qtype in (T.Q5_1, T.Q5_K):
        return "q8m"
    return "q4" if qtype == T.Q4_0 else "q8"


def exact(qtype) -> bool:
    """Whether the kept format holds the GGUF's integers unchanged (scales to float16)."""
    T = _types()
    return qtype in (T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K)


def fits(rows: int, cols: int) -> bool:
    return rows % ROW_TILE == 0 and cols % GROUP == 0


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32).reshape(-1)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[n, 16] bytes -> [n, 32]: low nibbles are elements 0..15, high ones 16..31 (Q4_0/Q4_1/Q5_x)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """[n, 4] bytes -> [n, 32] the fifth bit of each element (Q5_0/Q5_1), as 0 or 16."""
    bits = np.ascontiguousarray(qh).view(np.uint32).reshape(-1, 1) >> np.arange(32, dtype=np.uint32)
    return ((bits & 1) << 4).astype(np.uint8)


def _scale_min_k4(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes of 6-bit (scale, min) pairs -> [n, 8] each (llama.cpp get_scale_min_k4)."""
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=1)
    return sc, mn


def _requantize(v: np.ndarray, unit: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Groups of values v [n, 32] (times `unit` [n]) -> 8-bit (u, d, m) with d = unit * max|v| / 127."""
    amax = np.abs(v).max(axis=1)
    safe = np.where(amax > 0, amax, 1).astype(np.float32)
    u = (np.rint(v * (127 / safe)[:, None]) + 128).astype(np.uint8)
    d = (unit * amax / 127).astype(np.float32)
    return u, d, 128 * d


def groups(blocks: np.ndarray, qtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw GGUF blocks [n_blocks, type_size] uint8 -> (u [g, 32] uint8, d [g] f32, m [g] f32), the groups
    of 32 in order, `w = d * u - m`."""
    T = _types()
    b = blocks
    if qtype == T.Q8_0:
        d = _f16(b[:, :2])
        return (b[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8), d, 128 * d
    if qtype == T.Q4_0:
        d = _f16(b[:, :2])
        return _nibbles(b[:, 2:]), d, 8 * d
    if qtype == T.Q4_1:
        return _nibbles(b[:, 4:]), _f16(b[:, :2]), -_f16(b[:, 2:4])
    if qtype == T.Q5_0:
        d = _f16(b[:, :2])
        return (_nibbles(b[:, 6:]) | _high_bits(b[:, 2:6])) + 112, d, 128 * d
    if qtype == T.Q5_1:
        return _nibbles(b[:, 8:]) | _high_bits(b[:, 4:8]), _f16(b[:, :2]), -_f16(b[:, 2:4])
    if qtype in (T.Q4_K, T.Q5_K):
        n = b.shape[0]
        d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
        sc, mn = _scale_min_k4(b[:, 4:16])
        gd = (d[:, None] * sc).reshape(-1)
        gm = (dmin[:, None] * mn).reshape(-1)
        if qtype == T.Q4_K:  # 4 chunks of 32 bytes: sub-block 2j the low nibbles, 2j + 1 the high ones
            qs = b[:, 16:].reshape(n, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
            return (qs & 0x0F).reshape(-1, 32), gd, gm
        qh, qs = b[:, 16:48], b[:, 48:]
        ql = qs.reshape(n, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
        hi = qh.reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
        q = (ql & 0x0F).reshape(n, 8, 32) | ((hi & 1) << 4)
        return q.reshape(-1, 32), gd, gm
    if qtype == T.Q6_K:
        n = b.shape[0]
        ql, qh, scales, d = b[:, :128], b[:, 128:192], b[:, 192:208], _f16(b[:, 208:210])
        lo = ql.reshape(n, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
        lo = (lo & 0x0F).reshape(n, 8, 32)
        hi = qh.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
        hi = (hi & 0x03).reshape(n, 8, 32)
        q = (lo | (hi << 4)).astype(np.int16) - 32  # [n, 8 groups, 32], groups as two 16-element blocks
        sc = scales.view(np.int8).astype(np.int16).reshape(n, 8, 2, 1)
        v = (q.reshape(n, 8, 2, 16) * sc).reshape(-1, 32).astype(np.float32)
        return _requantize(v, np.repeat(d, 8))
    from gguf.quants import dequantize

    x = dequantize(b, qtype).reshape(-1, GROUP)  # (raises NotImplementedError for types gguf cannot read)
    return _requantize(x, np.ones(x.shape[0], np.float32))


def pack(u: np.ndarray, d: np.ndarray, m: np.ndarray, fmt: str) -> tuple[np.ndarray, np.ndarray]:
    """u [N, K] uint8, d and m [N, K/32] -> (weight int8 [N, K * bits / 8], scales float16 [N/16, K] or,
    symmetric, [N/16, K/2]) in the kernel's order (models.qmatmul):
      8-bit: [N/16][K/4][16 rows][4 consecutive k]: 64 bytes are 16 rows x 4 inputs (one VNNI step);
      4-bit: [N/16][K/8][16 rows][4 bytes], byte j = u[k0 + j] | u[k0 + 4 + j] << 4;
      scales: [N/16][K/32][d, m][16 rows] (symmetric: [N/16][K/32][d][16 rows]).
    Row tiles are contiguous, so packing row slabs (multiples of 16) and concatenating them is the same."""
    bits, symmetric = FORMATS[fmt]
    N, K = u.shape
    t = N // ROW_TILE
    if bits == 8:
        w = u.reshape(t, ROW_TILE, K // 4, 4).transpose(0, 2, 1, 3).reshape(N, K)
    else:
        q = u.reshape(t, ROW_TILE, K // 8, 2, 4)
        w = (q[:, :, :, 0] | (q[:, :, :, 1] << 4)).transpose(0, 2, 1, 3).reshape(N, K // 2)
    tiles = [a.reshape(t, ROW_TILE, K // GROUP).transpose(0, 2, 1) for a in ((d,) if symmetric else (d, m))]
    scales = np.stack(tiles, axis=2).astype(np.float16).reshape(t, -1)
    return np.ascontiguousarray(w).view(np.int8), scales


def convert(raw: np.ndarray, qtype, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """A slab of `rows` rows of a GGUF tensor (its raw bytes) -> (packed weight, packed scales) in its
    kept_format."""
    from gguf.constants import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[qtype]
    u, d, m = groups(raw.reshape(-1, size), qtype)
    return pack(u.reshape(rows, cols), d.reshape(rows, -1), m.reshape(rows, -1), kept_format(qtype) or "q8")
