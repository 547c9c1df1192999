"""Linear layers over weights kept in their GGUF quantization (`export.paged_llm --weights auto`).

A kept weight [N, K] is `w = d * u - m` per group of 32 inputs (models.gguf_quant: formats q8, q8m, q4, q4m;
symmetric ones have m = 2**(bits - 1) * d), stored packed the way the kernel reads it: `weight` int8
[N, K * bits / 8] and `scales` float16 [N/16, K] (symmetric: [N/16, K/2]). Two ways to multiply:
- `kernel` set (models.qmatmul.enable, for `export.paged_llm --cpu-matmul`): each input row is quantized to
  int8 per group of 32
  (`quantize_rows`, as llama.cpp quantizes activations for its Q8_0/Q4 dot products) and the product runs
  in integers in models.qmatmul's x86 kernel, which reads the packed bytes as they are:
  y = sum_g s_x * (d * sum(u * q_x) - m * sum(q_x)).
- otherwise the weight is dequantized in the graph and multiplied in float32 (any target; for GPUs IREE
  fuses the dequantization into the matmul).
`lookup` reads embedding rows out of the packed layout, so a tied head and the embedding share one tensor.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .gguf_quant import FORMATS, GROUP, ROW_TILE

_ROUND = 12582912.0  # 1.5 * 2**23: (v + _ROUND) - _ROUND rounds an f32 |v| < 2**22 to nearest even


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q int8 [M, K], a f32 [M, K/32, 2]): per group of 32, q = round(x / s) with
    s = max|x| / 127, and a = (s, s * sum(q))."""
    M, K = x.shape
    g = x.to(torch.float32).view(M, K // GROUP, GROUP)
    amax = g.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = (g * inv + _ROUND) - _ROUND
    s = amax.squeeze(-1) / 127.0
    a = torch.stack([s, s * q.sum(-1)], -1)
    return q.to(torch.int8).view(M, K), a


def unpack(weight: torch.Tensor, scales: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The packed tensors -> (u int32 [N, K], d f32 [N, K/32], m f32 [N, K/32])."""
    bits, symmetric = FORMATS[fmt]
    N = weight.shape[0]
    K = weight.shape[1] * 8 // bits
    t = N // ROW_TILE
    b = weight.to(torch.int32) & 0xFF
    if bits == 8:
        u = b.view(t, K // 4, ROW_TILE, 4).permute(0, 2, 1, 3).reshape(N, K)
    else:
        q = b.view(t, K // 8, ROW_TILE, 4)
        u = torch.stack([q & 0x0F, q >> 4], 3).permute(0, 2, 1, 3, 4).reshape(N, K)
    parts = 1 if symmetric else 2
    s = scales.to(torch.float32).view(t, K // GROUP, parts, ROW_TILE).permute(0, 3, 1, 2).reshape(N, K // GROUP, parts)
    d = s[..., 0]
    return u, d, d * float(1 << (bits - 1)) if symmetric else s[..., 1]


def dequantize(weight: torch.Tensor, scales: torch.Tensor, fmt: str) -> torch.Tensor:
    u, d, m = unpack(weight, scales, fmt)
    N, K = u.shape
    w = d.unsqueeze(-1) * u.view(N, K // GROUP, GROUP).to(torch.float32) - m.unsqueeze(-1)
    return w.reshape(N, K)


def reference_matmul(q: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, fmt: str):
    """The kernel's arithmetic in torch: y [M, N] from quantize_rows' (q, a). Integer sums are exact in
    float64, so only the float accumulation order differs from the kernel."""
    u, d, m = unpack(weight, scales, fmt)
    N, K = u.shape
    G = K // GROUP
    uq = u.view(N, G, GROUP).to(torch.float64)
    d64, m64 = d.to(torch.float64), m.to(torch.float64)
    out = []
    for rows, ar in zip(q.split(16), a.split(16)):  # bounded memory: [16, N, G] dot products at a time
        dots = torch.einsum("mgk,ngk->mng", rows.view(-1, G, GROUP).to(torch.float64), uq)
        ar = ar.to(torch.float64)
        out.append((dots * d64 * ar[:, None, :, 0]).sum(-1) - (m64 * ar[:, None, :, 1]).sum(-1))
    return torch.cat(out).to(torch.float32)


class QLinear(nn.Module):
    """y = x W^T (no bias) for a kept weight; `kernel` (set by models.qmatmul.enable): the x86 kernel's op,
    (q, a, weight, scales, fmt) -> y."""

    def __init__(self, in_features: int, out_features: int, fmt: str):
        super().__init__()
        if out_features % ROW_TILE or in_features % GROUP or fmt not in FORMATS:
            raise ValueError(f"no kept format {fmt!r} for a [{out_features}, {in_features}] weight")
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        self.bits, symmetric = FORMATS[fmt]
        self.kernel: Callable | None = None
        self.weight = nn.Parameter(
            torch.zeros(out_features, in_features * self.bits // 8, dtype=torch.int8), requires_grad=False
        )
        parts = 1 if symmetric else 2
        self.scales = nn.Parameter(
            torch.zeros(out_features // ROW_TILE, parts * in_features // GROUP * ROW_TILE, dtype=torch.float16),
            requires_grad=False,
        )

    def forward(self, x: torch.Tensor, quantized: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """`quantized`: quantize_rows(x) already computed for another projection of the same input."""
        rows = x.reshape(-1, self.in_features)
        if self.kernel is not None:
            q, a = quantized if quantized is not None else quantize_rows(rows)
            y = self.kernel(q, a, self.weight, self.scales, self.fmt)
        else:
            y = F.linear(rows.to(torch.float32), dequantize(self.weight, self.scales, self.fmt))
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of the dequantized weight (an embedding table): [*ids.shape, K] float32.

        Reads only those rows: the packed bytes of one row are one int32 word per 4 (8-bit) or 8 (4-bit)
        inputs, at a stride of 16 words; the scales likewise."""
        K, G = self.in_features, self.in_features // GROUP
        flat = ids.reshape(-1)
        tile, lane = torch.div(flat, ROW_TILE, rounding_mode="floor"), flat.remainder(ROW_TILE)
        per_tile = K * self.bits // 32  # int32 words of one row in one tile
        cols = torch.arange(per_tile, dtype=flat.dtype)
        words = self.weight.view(torch.int32).reshape(-1)
        w = words[((tile.unsqueeze(1) * per_tile + cols) * ROW_TILE + lane.unsqueeze(1)).reshape(-1)]
        w = w.view(-1, per_tile, 1)
        # (shift amounts made with arange: a torch.tensor constant traces as an op IREE cannot lower)
        j = torch.arange(32 // self.bits, dtype=torch.int32)
        if self.bits == 8:
            u = torch.bitwise_right_shift(w, j * 8) & 0xFF  # byte j: input 4c + j
        else:
            u = (
                torch.bitwise_right_shift(w, (j % 4) * 8 + (j // 4) * 4) & 0x0F
            )  # low nibbles: inputs 8c + 0..3, high: 8c + 4..7
        parts = self.scales.shape[1] // (G * ROW_TILE)  # d (and m)
        gcols = torch.arange(parts * G, dtype=flat.dtype)
        s = self.scales.reshape(-1)[
            ((tile.unsqueeze(1) * parts * G + gcols) * ROW_TILE + lane.unsqueeze(1)).reshape(-1)
        ]
        s = s.to(torch.float32).view(-1, G, parts, 1)
        d = s[:, :, 0]
        m = d * float(1 << (self.bits - 1)) if parts == 1 else s[:, :, 1]
        rows = d * u.reshape(-1, G, GROUP).to(torch.float32) - m
        return rows.view(*ids.shape, K)


def quantized_input(x: torch.Tensor, *projections: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """quantize_rows(x) once for several kernel projections of the same input (None when none is one)."""
    if any(isinstance(p, QLinear) and p.kernel is not None for p in projections):
        return quantize_rows(x.reshape(-1, x.shape[-1]))
    return None
