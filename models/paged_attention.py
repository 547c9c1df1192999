"""Attention over the paged KV cache as a hand-written CPU dispatch (`export.paged_llm --cpu-attention`).

The graph attention in models.llama gathers every page of the context into a copy, then multiplies
(scores [S, T]), normalises and multiplies again: a decode step reads the context three times and
writes it once (docs/iree-findings.md). This kernel (C with vector extensions, built with gcc
for AVX2 or AVX-512 into an object the program links, as models.amx does) reads each page of K and V once,
where the page table says it is, in tiles of 32 keys (16 at head_dim 128) with an online softmax (flash
attention): no gathered copy, no score matrix, keys past a query's last visible one never read, memory per
workgroup O(rows x head_dim).

Work is split into workgroups of (sequence, KV head, tile of query positions, split of the context):
the rows of a workgroup are its query positions x the query heads of its KV head (GQA without repeated
K/V). A split holds an unnormalised partial result: acc = sum_t exp(s_t - m) v_t, m = max_t s_t,
l = sum_t exp(s_t - m); `combine` merges the splits (decode at batch 1 has too few (sequence, KV head)
pairs to keep every core busy, so its context is split). A row with no visible key has m = NEG, l = 0.

The kernel reads the cache in its stored type: float32, or bfloat16 / float16 values packed two per
int32 word (models.llama PagedLlama.cache_dtype), widened to float32 in registers.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from iree.turbine.runtime.op_reg import CustomOp, KernelBuilder, KernelSelection, impl_helper
from iree.turbine.support.ir_imports import RankedTensorType

from . import ckernel
from .config import LlamaConfig
from .cpu import ATTENTION_ISAS
from .page_gather import LIBRARY, _AsmLoader, _specialize_static_dims

# --cpu-attention's choices -> the CPU feature they need (the op's `isa` attribute indexes this order)
ISAS = {isa: ATTENTION_ISAS[isa] for isa in ("avx2", "avx512")}
NEG = -3.0e38  # m of a row that has seen no key (finite: exp(NEG - m) is 0, never NaN)
KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

_SOURCE = r"""
#include <stddef.h>
#include <stdint.h>

/* Compiled with -DHD=<head dim> -DKIND=<0 f32, 1 bf16, 2 f16> -DNAME=<symbol>, for x86-64-v3 (AVX2) or
   x86-64-v4 (AVX-512): the vector width follows the target. */
#if defined(__AVX512F__) && HD % 16 == 0
#define VW 16
#else
#define VW 8
#endif
typedef float vf __attribute__((vector_size(VW * 4)));
typedef int32_t vi __attribute__((vector_size(VW * 4)));
typedef float vfu __attribute__((vector_size(VW * 4), aligned(4)));
#define NV (HD / VW)     /* vectors per head row */
#define KT (HD >= 128 ? 16 : 32)  /* keys per tile (they may come from several pages) */
#define TV (KT / VW)     /* vectors per tile row of scores */
#define RB (8 / TV)      /* rows per register block: 8 FMA chains in the score loop */
#define MAXR (HD >= 128 ? 16 : 32)
#define DB (NV % 2 ? 1 : 2)  /* head vectors per PV register block */
#define NEG (-3.0e38f)
#ifndef PREFETCH
#define PREFETCH 1  /* prefetch the next key tile's rows (one-token steps: ~1.4x the read rate) */
#endif

static inline vf splat(float x) { return x - (vf){}; }  /* (x + 0 would cost an add: -0 + 0 is +0) */
static inline vf vsel(vi m, vf a, vf b) { return (vf)(((vi)a & m) | ((vi)b & ~m)); }
static inline vf vmax(vf a, vf b) { return vsel(a > b, a, b); }

static inline vf vexp(vf x) {
  /* Cephes expf: relative error ~1e-7 over the clamped range; n rounded by the 1.5 * 2^23 trick. */
  x = vmax(x, splat(-87.33654f));
  x = vsel(x < 88.37626f, x, splat(88.37626f));
  vf n = (x * 1.44269504089f + 12582912.0f) - 12582912.0f;
  vf r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + (r + 1.0f);
  vi e = (__builtin_convertvector(n, vi) + 127) << 23;
  return p * (vf)e;
}

#if VW == 16
#define HALVES(v) __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7)
#define QUARTERS(v) __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11)
#define PAIRS(v) __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13)
#define ONES(v) __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14)
#else
#define HALVES(v) __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3)
#define QUARTERS(v) __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5)
#define PAIRS(v) __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6)
#define ONES(v) (v)
#endif
/* reductions over the lanes, as trees */
static inline float hmax(vf v) {
  v = vmax(v, HALVES(v)); v = vmax(v, QUARTERS(v)); v = vmax(v, PAIRS(v));
  return vmax(v, ONES(v))[0];
}
static inline float hsum(vf v) {
  v += HALVES(v); v += QUARTERS(v); v += PAIRS(v);
  if (VW == 16) v += ONES(v);
  return v[0];
}

#if KIND == 0
typedef float elem_t;
static inline vf load(const elem_t *p) { return *(const vfu *)p; }
#elif KIND == 1
typedef uint16_t elem_t;
typedef uint16_t vhu __attribute__((vector_size(VW * 2), aligned(2)));
static inline vf load(const elem_t *p) { return (vf)(__builtin_convertvector(*(const vhu *)p, vi) << 16); }
#else
typedef uint16_t elem_t;
typedef _Float16 vhf __attribute__((vector_size(VW * 2), aligned(2)));
static inline vf load(const elem_t *p) { return __builtin_convertvector(*(const vhf *)p, vf); }
#endif

/* Key `pos` of KV head `kv` in a sequence's pages (its value is row_elems further). */
static inline const elem_t *key_row(const elem_t *cache, const int64_t *pages, size_t pos, size_t stride,
                                    size_t row_elems, size_t KV, size_t kv) {
  return cache + (size_t)pages[pos / stride] * row_elems + (pos % stride * KV + kv) * HD;
}

/* MLIR passes each memref as (base, aligned, offset, size, stride).
   q [B, S, H, HD] f32; cache: rows of `stride` tokens x KV heads x HD (a K row, then its V row);
   pages [B, P] i64: each sequence's K row per page of this layer; last [B, S] i64: the last key position
   each query sees (-1: none); out [B, NS, S, H, HD + 2]: acc, m, l. */
__attribute__((visibility("hidden")))
void NAME(const float *q_base, const float *q, size_t q_off, size_t q_size, size_t q_stride,
          const elem_t *c_base, const elem_t *cache, size_t c_off, size_t c_size, size_t c_stride,
          const int64_t *p_base, const int64_t *pages, size_t p_off, size_t p_size, size_t p_stride,
          const int64_t *l_base, const int64_t *last, size_t l_off, size_t l_size, size_t l_stride,
          float *o_base, float *out, size_t o_off, size_t o_size, size_t o_stride,
          size_t S, size_t P, size_t H, size_t KV, size_t stride, size_t QT, size_t NS, size_t wg) {
  q += q_off; cache += c_off; pages += p_off; last += l_off; out += o_off;
  const size_t rep = H / KV, nqt = (S + QT - 1) / QT;
  const size_t sp = wg % NS, qt = (wg / NS) % nqt, kv = (wg / NS / nqt) % KV, b = wg / NS / nqt / KV;
  const size_t s0 = qt * QT, s1 = s0 + QT < S ? s0 + QT : S, rows = (s1 - s0) * rep;
  const size_t nrows = (rows + RB - 1) / RB * RB;  /* padded to whole register blocks */
  const size_t row_elems = stride * KV * HD;       /* one K (or V) row of a page */
  const float scale = 1.0f / __builtin_sqrtf((float)HD);

  vf qs[MAXR][NV], acc[MAXR][NV];  /* scaled queries; unnormalised outputs */
  float m[MAXR], l[MAXR];
  int64_t lastv[MAXR];
  int64_t maxvis = -1;
  for (size_t r = 0; r < nrows; r++) {
    const float *qr = q + ((b * S + s0 + r / rep) * H + kv * rep + r % rep) * HD;
    for (size_t v = 0; v < NV; v++) {
      qs[r][v] = r < rows ? *(const vfu *)(qr + v * VW) * scale : splat(0.0f);
      acc[r][v] = splat(0.0f);
    }
    m[r] = NEG; l[r] = 0.0f;
    lastv[r] = r < rows ? last[b * S + s0 + r / rep] : -1;
    if (lastv[r] > maxvis) maxvis = lastv[r];
  }
  /* keys up to the last visible one, then this split's share of them in whole tiles */
  const size_t nk = maxvis < 0 ? 0 : ((size_t)maxvis + 1 < P * stride ? (size_t)maxvis + 1 : P * stride);
  const size_t ntile = (nk + KT - 1) / KT, t0 = sp * ntile / NS * KT, t1 = (sp + 1) * ntile / NS * KT;

  /* Few rows (one-token steps): scores as dot products of the keys as stored; more rows: as broadcast
     query elements times the keys transposed (no reductions across lanes, the transpose amortised). */
  const int few = rows <= 8;
  float kt[HD][KT] __attribute__((aligned(64)));  /* the tile's keys, transposed */
  vf kn[KT][NV];                                  /* or as stored */
  vf vt[KT][NV];                                  /* its values */
  vf lv[MAXR];                                    /* l[r] as lanes, summed at the end */
  for (size_t r = 0; r < nrows; r++) lv[r] = splat(0.0f);
  vi lane[TV];
  for (int t = 0; t < TV; t++)
    for (int i = 0; i < VW; i++) lane[t][i] = t * VW + i;
  for (size_t pos0 = t0; pos0 < t1; pos0 += KT) {
    const size_t n = nk - pos0 < KT ? nk - pos0 : KT;
    for (size_t j = 0; j < KT; j++) {
      const size_t pos = pos0 + j;
      const elem_t *kp = j < n ? key_row(cache, pages + b * P, pos, stride, row_elems, KV, kv) : 0;
      if (PREFETCH && pos + KT < nk) {  /* the next tile's rows, while this one computes */
        const char *next = (const char *)key_row(cache, pages + b * P, pos + KT, stride, row_elems, KV, kv);
        for (size_t o = 0; o < HD * sizeof(elem_t); o += 64) {
          __builtin_prefetch(next + o);
          __builtin_prefetch(next + row_elems * sizeof(elem_t) + o);
        }
      }
      for (size_t v = 0; v < NV; v++) {
        vf kk = splat(0.0f), vv = splat(0.0f);
        if (j < n) {
          kk = load(kp + v * VW);
          vv = load(kp + row_elems + v * VW);
        }
        if (few)
          kn[j][v] = kk;
        else
          for (int i = 0; i < VW; i++) kt[v * VW + i][j] = kk[i];
        vt[j][v] = vv;
      }
    }
    for (size_t r0 = 0; r0 < nrows; r0 += RB) {
      int any = 0;
      for (int i = 0; i < RB; i++) any |= lastv[r0 + i] >= (int64_t)pos0;
      if (!any) continue;
      /* scores of RB rows x KT keys */
      vf sc[RB][TV];
      for (int i = 0; i < RB; i++)
        for (int t = 0; t < TV; t++) sc[i][t] = splat(0.0f);
      if (few) {
        float s[RB][KT] __attribute__((aligned(64)));
        for (size_t j = 0; j < n; j++)
          for (size_t i = 0; i < RB && r0 + i < rows; i++) {
            vf a = qs[r0 + i][0] * kn[j][0];
            for (size_t v = 1; v < NV; v++) a += qs[r0 + i][v] * kn[j][v];
            s[i][j] = hsum(a);
          }
        for (int i = 0; i < RB; i++)
          for (int t = 0; t < TV; t++) sc[i][t] = *(const vf *)&s[i][t * VW];
      } else for (size_t d = 0; d < HD; d++) {
        vf k[TV];
        for (int t = 0; t < TV; t++) k[t] = *(const vf *)&kt[d][t * VW];
        for (int i = 0; i < RB; i++) {
          const vf qd = splat(qs[r0 + i][d / VW][d % VW]);
          for (int t = 0; t < TV; t++) sc[i][t] += qd * k[t];
        }
      }
      /* online softmax: each row's new max, then one exp for every row's correction */
      float pj[RB][KT] __attribute__((aligned(64)));
      vf dm = splat(0.0f), mn = splat(0.0f);
      vi ok[RB][TV];
      for (int i = 0; i < RB; i++) {
        const int64_t vis = lastv[r0 + i] - (int64_t)pos0 + 1;  /* keys of the tile this row sees */
        const int lim = vis < (int64_t)n ? (int)vis : (int)n;
        vf mx = splat(NEG);
        for (int t = 0; t < TV; t++) {
          ok[i][t] = lane[t] < lim;
          sc[i][t] = vsel(ok[i][t], sc[i][t], splat(NEG));
          mx = vmax(mx, sc[i][t]);
        }
        const float tmax = hmax(mx), mnew = tmax > m[r0 + i] ? tmax : m[r0 + i];
        dm[i % VW] = m[r0 + i] - mnew;
        mn[i % VW] = mnew;
        m[r0 + i] = mnew;
      }
      const vf corr = vexp(dm);
      for (int i = 0; i < RB; i++) {
        vf sum = lv[r0 + i] * corr[i];
        for (int t = 0; t < TV; t++) {
          vf p = vsel(ok[i][t], vexp(sc[i][t] - mn[i]), splat(0.0f));
          sum += p;
          *(vf *)&pj[i][t * VW] = p;
        }
        lv[r0 + i] = sum;
      }
      /* acc = acc * corr + p V, DB head vectors at a time */
      for (size_t v0 = 0; v0 < NV; v0 += DB) {
        vf a[RB][DB];
        for (int i = 0; i < RB; i++)
          for (int u = 0; u < DB; u++) a[i][u] = acc[r0 + i][v0 + u] * corr[i];
        for (size_t j = 0; j < n; j++)
          for (int i = 0; i < RB; i++) {
            const vf pb = splat(pj[i][j]);
            for (int u = 0; u < DB; u++) a[i][u] += pb * vt[j][v0 + u];
          }
        for (int i = 0; i < RB; i++)
          for (int u = 0; u < DB; u++) acc[r0 + i][v0 + u] = a[i][u];
      }
    }
  }
  for (size_t r = 0; r < rows; r++) l[r] = hsum(lv[r]);
  for (size_t r = 0; r < rows; r++) {
    float *o = out + (((b * NS + sp) * S + s0 + r / rep) * H + kv * rep + r % rep) * (HD + 2);
    for (size_t v = 0; v < NV; v++) *(vfu *)(o + v * VW) = acc[r][v];
    o[HD] = m[r];
    o[HD + 1] = l[r];
  }
}
"""


class KernelError(RuntimeError):
    pass


def symbol(head_dim: int, kind: int) -> str:
    return f"aotllm_paged_attention_d{head_dim}_k{kind}"


def build(head_dim: int, kind: int, isa: str, shared: bool = False) -> Path:
    """The kernel for one head dimension, cache type and ISA, built with gcc once (cached by source and
    flags): an object for the program to link, or (`shared`) a library for tests to call directly."""
    if head_dim % 8:
        raise KernelError(f"--cpu-attention needs a head dimension divisible by 8 (this model's: {head_dim})")
    name = symbol(head_dim, kind)
    return ckernel.build(
        _SOURCE,
        [f"-march={ISAS[isa]}", f"-DHD={head_dim}", f"-DKIND={kind}", f"-DNAME={name}"],
        name,
        KernelError,
        "--cpu-attention builds its kernel with gcc, which is not on PATH; hint: install gcc",
        "gcc failed to build the attention kernel: {stderr}",
        shared,
    )


def max_rows(head_dim: int) -> int:
    """Rows of one workgroup (query positions x query heads per KV head): the kernel's MAXR."""
    return 16 if head_dim >= 128 else 32


def check(c: LlamaConfig, kv_dtype: torch.dtype) -> None:
    """Raise KernelError unless the kernel can serve this (rank's) config."""
    rep = c.num_heads // c.num_kv_heads
    if c.head_dim % 8 or kv_dtype not in KINDS or rep > max_rows(c.head_dim):
        raise KernelError(
            f"--cpu-attention serves head dimensions divisible by 8, at most {max_rows(c.head_dim)} query heads "
            f"per KV head and float32 / bfloat16 / float16 caches; this model has head_dim {c.head_dim}, "
            f"{rep} query heads per KV head, a {str(kv_dtype).removeprefix('torch.')} cache: export without it"
        )


def enable(model: torch.nn.Module, isa: str) -> None:
    """Every attention block of `model` (a models.llama.PagedLlama) runs `attend` built for `isa`; the kernel
    is built now, so a failure shows before the trace."""
    for blk in model.modules():
        if hasattr(blk, "cpu_attention"):
            check(blk.c, blk.kv_dtype)
            build(blk.c.head_dim, KINDS[blk.kv_dtype], isa)
            blk.cpu_attention = isa


def attend(q, cache_rows, pages, last, c: LlamaConfig, kv_dtype: torch.dtype, isa: str) -> torch.Tensor:
    """Attention output [B, S, H, D] (float32) of queries q [B, S, H, D] (roped) over the cache, viewed
    as rows of one page's K or V (`cache_rows` [N, R]); pages [B, P]: this layer's K row of each page."""
    B, S, H, D = q.shape
    static = lambda n: n if isinstance(n, int) else None  # noqa: E731 (a traced dynamic size is a SymInt)
    tile = max(1, max_rows(D) // (H // c.num_kv_heads))
    tiles = None if static(S) is None else -(-S // tile)
    splits = splits_for(static(B), c.num_kv_heads, tiles)
    values_per_row = cache_rows.shape[1] * (2 if cache_rows.dtype == torch.int32 else 1)
    stride = values_per_row // (c.num_kv_heads * D)
    q32 = q if q.dtype == torch.float32 else q.float()
    kind = KINDS[kv_dtype]
    isa_id = list(ISAS).index(isa)
    part = paged_attention(q32, cache_rows, pages, last, c.num_kv_heads, stride, kind, isa_id, tile, splits)
    return combine(part)


def splits_for(batch: int | None, kv_heads: int, query_tiles: int | None) -> int:
    """Context splits per (sequence, KV head): enough workgroups (16) for the cores of a static-batch
    one-token step; one where the batch or the query tiles are dynamic (prefill: many workgroups)."""
    if batch is None or query_tiles is None:
        return 1
    return max(1, min(8, math.ceil(16 / (batch * kv_heads * query_tiles))))


@CustomOp.register(library=LIBRARY)
class paged_attention(CustomOp):
    """q [B, S, H, D] f32, cache [N, R] (the cache as rows of one page's K or V: f32, or int32 words of two
    16-bit values), pages [B, P] i64 (this layer's K row of each page), last [B, S] i64 (the last key
    position each query sees); kind: KINDS; isa: an index into ISAS -> [B, splits, S, H, D + 2] partial
    results (module docstring)."""

    signature = (
        "paged_attention(Tensor q, Tensor cache, Tensor pages, Tensor last, int kv_heads, int stride, "
        "int kind, int isa, int query_tile, int splits) -> (Tensor)"
    )

    def select(self, ksel: KernelSelection):
        q, cache, pages, last = (ksel.arg_tensor(i) for i in range(4))
        for i in range(4, 10):
            ksel.attr_int(i)
        for t in (q, cache, pages, last):
            _specialize_static_dims(t)
        B, S, H, D = q.t.shape
        out = ksel.return_new_tensor([B, ksel.arg_descs[9].v, S, H, D + 2], torch.float32)
        _specialize_static_dims(out)

    def eager_execute(self, q, cache, pages, last, kv_heads, stride, kind, isa, query_tile, splits):
        B, S, H, D = q.shape
        dtype = {v: k for k, v in KINDS.items()}[kind]
        rows = (cache if cache.dtype == dtype else cache.view(dtype)).float()
        keys, vals = (rows[pages + i].view(B, -1, kv_heads, D) for i in (0, 1))
        rep = H // kv_heads
        scores = torch.einsum("bskrd,btkd->bskrt", q.view(B, S, kv_heads, rep, D), keys) * D**-0.5
        visible = torch.arange(keys.shape[1]).view(1, 1, 1, 1, -1) <= last.view(B, S, 1, 1, 1)
        scores = scores.masked_fill(~visible, NEG)
        m = scores.amax(-1)
        p = torch.exp(scores - m.unsqueeze(-1)) * visible
        acc = torch.einsum("bskrt,btkd->bskrd", p, vals).reshape(B, S, H, D)
        part = torch.zeros(B, splits, S, H, D + 2)
        part[..., D] = NEG
        part[:, 0] = torch.cat([acc, m.reshape(B, S, H, 1), p.sum(-1).reshape(B, S, H, 1)], -1)
        return part

    def generate(self, ksel: KernelSelection, kb: KernelBuilder):
        qt, ct, pt, lt = (RankedTensorType(kb.arg_value(i).type) for i in range(4))
        kv_heads, stride, kind, isa, query_tile, splits = (ksel.arg_descs[i].v for i in range(4, 10))
        B, S, H, D = qt.shape
        N, R = ct.shape
        P = pt.shape[1]
        isa_name = list(ISAS)[isa]
        obj = build(D, kind, isa_name)
        dyn = lambda d: "?" if d < 0 else str(d)  # noqa: E731
        ident = "_".join(dyn(d).replace("?", "D") for d in (B, S, H, D, N, R, P))
        name = f"aotllm_paged_attention_{ident}_k{kind}_{isa_name}_q{query_tile}_s{splits}"
        sym = symbol(D, kind)
        cel = "f32" if ct.element_type == RankedTensorType(kb.arg_value(0).type).element_type else "i32"
        q_t = f"tensor<{dyn(B)}x{dyn(S)}x{H}x{D}xf32>"
        c_t = f"tensor<{dyn(N)}x{R}x{cel}>"
        p_t = f"tensor<{dyn(B)}x{dyn(P)}xi64>"
        l_t = f"tensor<{dyn(B)}x{dyn(S)}xi64>"
        o_t = f"tensor<{dyn(B)}x{splits}x{dyn(S)}x{H}x{D + 2}xf32>"
        # Every operand flattened to 1-D; its element count as an index (a dynamic size is tied with it).
        flat = lambda n: "?" if n is None else str(n)  # noqa: E731
        sizes = {
            "q": None if B < 0 or S < 0 else B * S * H * D,
            "p": None if B < 0 or P < 0 else B * P,
            "l": None if B < 0 or S < 0 else B * S,
            "o": None if B < 0 or S < 0 else B * splits * S * H * (D + 2),
            "c": None if N < 0 else N * R,
        }
        out_shape = f"{'%b' if B < 0 else B}, {splits}, {'%s' if S < 0 else S}, {H}, {D + 2}"
        tie = lambda k: "" if sizes[k] is not None else f"{{%n{k}}}"  # noqa: E731
        asm = f"""module {{
stream.executable private @{name}_exe attributes {{
  hal.executable.objects = #hal.executable.objects<{{
    #hal.executable.target<"llvm-cpu", "embedded-elf-x86_64", {{target_triple = "x86_64-unknown-unknown-eabi-elf"}}> = [
      #hal.executable.object<{{path = "{obj}"}}>]
  }}>
}} {{
  stream.executable.export public @{name}_entry workgroups(%n: index) -> (index, index, index) {{
    %c1 = arith.constant 1 : index
    stream.return %n, %c1, %c1 : index, index, index
  }}
  builtin.module {{
    func.func private @{sym}(memref<?xf32>, memref<?x{cel}>, memref<?xi64>, memref<?xi64>, memref<?xf32>,
        index, index, index, index, index, index, index, index) attributes {{hal.import.static}}
    func.func @{name}_entry(%bq: !stream.binding, %bc: !stream.binding, %bp: !stream.binding, %bl: !stream.binding,
                    %bo: !stream.binding, %nq: index, %nc: index, %np: index, %nl: index, %no: index,
                    %s: index, %p: index) {{
      %c0 = arith.constant 0 : index
      %h = arith.constant {H} : index
      %kv = arith.constant {kv_heads} : index
      %stride = arith.constant {stride} : index
      %qt = arith.constant {query_tile} : index
      %ns = arith.constant {splits} : index
      %wg = hal.interface.workgroup.id[0] : index
      %q = stream.binding.subspan %bq[%c0] : !stream.binding -> memref<?xf32>{{%nq}}
      %c = stream.binding.subspan %bc[%c0] : !stream.binding -> memref<?x{cel}>{{%nc}}
      %pg = stream.binding.subspan %bp[%c0] : !stream.binding -> memref<?xi64>{{%np}}
      %l = stream.binding.subspan %bl[%c0] : !stream.binding -> memref<?xi64>{{%nl}}
      %o = stream.binding.subspan %bo[%c0] : !stream.binding -> memref<?xf32>{{%no}}
      func.call @{sym}(%q, %c, %pg, %l, %o, %s, %p, %h, %kv, %stride, %qt, %ns, %wg)
          : (memref<?xf32>, memref<?x{cel}>, memref<?xi64>, memref<?xi64>, memref<?xf32>,
             index, index, index, index, index, index, index, index) -> ()
      return
    }}
  }}
}}
util.func private @{name}(%q: {q_t}, %c: {c_t}, %pg: {p_t}, %l: {l_t}) -> {o_t} {{
  %c0 = arith.constant 0 : index
  %c1 = arith.constant 1 : index
  %row = arith.constant {H * D} : index
  %crow = arith.constant {R} : index
  %orow = arith.constant {splits * H * (D + 2)} : index
  %qtile = arith.constant {query_tile} : index
  %qtile1 = arith.constant {query_tile - 1} : index
  %kvsplits = arith.constant {kv_heads * splits} : index
  %b = tensor.dim %q, %c0 : {q_t}
  %s = tensor.dim %q, %c1 : {q_t}
  %p = tensor.dim %pg, %c1 : {p_t}
  %bs = arith.muli %b, %s : index
  %nq = arith.muli %bs, %row : index
  %n = tensor.dim %c, %c0 : {c_t}
  %nc = arith.muli %n, %crow : index
  %np = arith.muli %b, %p : index
  %nl = arith.addi %bs, %c0 : index
  %no = arith.muli %bs, %orow : index
  %qtm1 = arith.addi %s, %qtile1 : index
  %nqt = arith.divui %qtm1, %qtile : index
  %bkv = arith.muli %b, %kvsplits : index
  %wgs = arith.muli %bkv, %nqt : index
  %qf = tensor.collapse_shape %q [[0, 1, 2, 3]] : {q_t} into tensor<{flat(sizes["q"])}xf32>
  %cf = tensor.collapse_shape %c [[0, 1]] : {c_t} into tensor<{flat(sizes["c"])}x{cel}>
  %pf = tensor.collapse_shape %pg [[0, 1]] : {p_t} into tensor<{flat(sizes["p"])}xi64>
  %lf = tensor.collapse_shape %l [[0, 1]] : {l_t} into tensor<{flat(sizes["l"])}xi64>
  %of = flow.dispatch @{name}_exe::@{name}_entry[%wgs](%qf, %cf, %pf, %lf, %nq, %nc, %np, %nl, %no, %s, %p)
      : (tensor<{flat(sizes["q"])}xf32>{tie("q")}, tensor<{flat(sizes["c"])}x{cel}>{tie("c")},
         tensor<{flat(sizes["p"])}xi64>{tie("p")},
         tensor<{flat(sizes["l"])}xi64>{tie("l")}, index, index, index, index, index, index, index)
      -> tensor<{flat(sizes["o"])}xf32>{tie("o")}
  %r = tensor.expand_shape %of [[0, 1, 2, 3, 4]] output_shape [{out_shape}]
      : tensor<{flat(sizes["o"])}xf32> into {o_t}
  util.return %r : {o_t}
}}
}}
"""
        func = _AsmLoader().inline_template_function(kb, name, name, asm=asm)
        kb.yield_results(*impl_helper.call_function(func, *kb.arg_bindings[:4]))


def combine(part: torch.Tensor) -> torch.Tensor:
    """[B, splits, S, H, D + 2] partial results -> attention output [B, S, H, D] (0 where nothing is
    visible: padding rows)."""
    acc, m, total = part[..., :-2], part[..., -2], part[..., -1]
    if part.shape[1] == 1:
        return acc[:, 0] / torch.clamp(total[:, 0], min=1e-30).unsqueeze(-1)
    w = torch.exp(m - m.amax(1, keepdim=True))
    den = torch.clamp((w * total).sum(1), min=1e-30)
    return (w.unsqueeze(-1) * acc).sum(1) / den.unsqueeze(-1)
