"""Attention over the paged KV cache as a hand-written CPU dispatch (`export.paged_llm --cpu-attention`).

The graph attention in models.llama gathers every page of the context into a copy, then multiplies
(scores [S, T]), normalises and multiplies again: a decode step reads the context three times and
writes it once (docs/iree-findings.md). This kernel (C, AVX2 + FMA, built with gcc into an object the
program links, as models.amx does) reads each page of K and V once, where the page table says it is,
in tiles of 16 keys with an online softmax (flash attention): no gathered copy, no score matrix, tiles
past a query's last visible key never read, memory per workgroup O(rows x head_dim).

Work is split into workgroups of (sequence, KV head, tile of query positions, split of the context):
the rows of a workgroup are its query positions x the query heads of its KV head (GQA without repeated
K/V). A split holds an unnormalised partial result: acc = sum_t exp(s_t - m) v_t, m = max_t s_t,
l = sum_t exp(s_t - m); `combine` merges the splits (decode at batch 1 has too few (sequence, KV head)
pairs to keep every core busy, so its context is split). A row with no visible key has m = NEG, l = 0.

The kernel reads the cache in its stored type: float32, or bfloat16 / float16 values packed two per
int32 word (models.llama PagedLlama.cache_dtype), widened to float32 in registers.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from iree.turbine.runtime.op_reg import CustomOp, KernelBuilder, KernelSelection, impl_helper
from iree.turbine.support.ir_imports import RankedTensorType

from .cache import cache_dir
from .config import LlamaConfig
from .cpu import X86_64_V3
from .page_gather import LIBRARY, _AsmLoader, _specialize_static_dims

CPU_FEATURE = X86_64_V3  # AVX2, FMA, F16C
KEY_TILE = 16
NEG = -3.0e38  # m of a row that has seen no key (finite: exp(NEG - m) is 0, never NaN)
KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

_SOURCE = r"""
#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>

/* Compiled with -DHD=<head dim> -DKIND=<0 f32, 1 bf16, 2 f16> -DNAME=<symbol>. */
#define NV (HD / 8)
#define KT 16
#define MAXR (HD >= 128 ? 16 : 32)  /* (bounded stack: acc is MAXR x HD floats) */
#define NEG (-3.0e38f)

static inline __m256 exp256(__m256 x) {
  /* Cephes expf: relative error ~1e-7 over the clamped range. */
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.33654f));
  x = _mm256_min_ps(x, _mm256_set1_ps(88.37626f));
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504089f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* [sum(a0), ..., sum(a7)] */
static inline __m256 hsum8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5, __m256 a6,
                           __m256 a7) {
  __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

static inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

static inline float hsum(__m256 v) {
  __m128 m = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_add_ps(m, _mm_movehl_ps(m, m));
  m = _mm_add_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

#if KIND == 0
typedef float elem_t;
static inline __m256 load8(const elem_t *p) { return _mm256_loadu_ps(p); }
#elif KIND == 1
typedef uint16_t elem_t;
static inline __m256 load8(const elem_t *p) {
  __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
#else
typedef uint16_t elem_t;
static inline __m256 load8(const elem_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
#endif

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
  const size_t row_elems = stride * KV * HD;  /* one K (or V) row of a page */
  const float scale = 1.0f / __builtin_sqrtf((float)HD);

  float acc[MAXR][HD] __attribute__((aligned(32)));
  float m[MAXR], l[MAXR];
  int64_t lastv[MAXR];
  int64_t maxvis = -1;
  for (size_t r = 0; r < rows; r++) {
    for (size_t d = 0; d < HD; d++) acc[r][d] = 0.0f;
    m[r] = NEG; l[r] = 0.0f;
    lastv[r] = last[b * S + s0 + r / rep];
    if (lastv[r] > maxvis) maxvis = lastv[r];
  }
  /* pages that hold a visible key, then this split's share of them */
  size_t np = maxvis < 0 ? 0 : (size_t)maxvis / stride + 1;
  if (np > P) np = P;
  const size_t p0 = sp * np / NS, p1 = (sp + 1) * np / NS;

  float kt[KT][HD] __attribute__((aligned(32)));
  float vt[KT][HD] __attribute__((aligned(32)));
  for (size_t pg = p0; pg < p1; pg++) {
    const elem_t *kpage = cache + (size_t)pages[b * P + pg] * row_elems + kv * HD;
    const elem_t *vpage = kpage + row_elems;
    for (size_t j0 = 0; j0 < stride; j0 += KT) {
      const int64_t pos0 = (int64_t)(pg * stride + j0);
      if (pos0 > maxvis) break;
      const size_t n = stride - j0 < KT ? stride - j0 : KT;
      for (size_t j = 0; j < KT; j++)
        for (size_t v = 0; v < NV; v++) {
          __m256 kk = _mm256_setzero_ps(), vv = _mm256_setzero_ps();
          if (j < n) {
            kk = load8(kpage + (j0 + j) * KV * HD + v * 8);
            vv = load8(vpage + (j0 + j) * KV * HD + v * 8);
          }
          _mm256_store_ps(&kt[j][v * 8], kk);
          _mm256_store_ps(&vt[j][v * 8], vv);
        }
      const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      for (size_t r = 0; r < rows; r++) {
        if (lastv[r] < pos0) continue;
        const float *qr = q + ((b * S + s0 + r / rep) * H + kv * rep + r % rep) * HD;
        __m256 qv[NV];
        for (size_t v = 0; v < NV; v++) qv[v] = _mm256_mul_ps(_mm256_loadu_ps(qr + v * 8), _mm256_set1_ps(scale));
        __m256 sc[2], ok[2];
        for (int g = 0; g < 2; g++) {
          __m256 a[8];
          for (int i = 0; i < 8; i++) a[i] = _mm256_setzero_ps();
          for (size_t v = 0; v < NV; v++)
            for (int i = 0; i < 8; i++) a[i] = _mm256_fmadd_ps(qv[v], _mm256_load_ps(&kt[g * 8 + i][v * 8]), a[i]);
          sc[g] = hsum8(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]);
          /* visible: key j0 + g*8 + lane < n and its position <= lastv[r] */
          __m256i j = _mm256_add_epi32(lane, _mm256_set1_epi32(g * 8));
          __m256i lim = _mm256_set1_epi32((int)((int64_t)n < lastv[r] - pos0 + 1 ? (int64_t)n : lastv[r] - pos0 + 1));
          ok[g] = _mm256_castsi256_ps(_mm256_cmpgt_epi32(lim, j));
          sc[g] = _mm256_blendv_ps(_mm256_set1_ps(NEG), sc[g], ok[g]);
        }
        const float mx = hmax(_mm256_max_ps(sc[0], sc[1]));
        const float mnew = mx > m[r] ? mx : m[r];
        const float corr = _mm256_cvtss_f32(exp256(_mm256_set1_ps(m[r] - mnew)));
        __m256 pr[2];
        for (int g = 0; g < 2; g++)
          pr[g] = _mm256_and_ps(exp256(_mm256_sub_ps(sc[g], _mm256_set1_ps(mnew))), ok[g]);
        l[r] = l[r] * corr + hsum(_mm256_add_ps(pr[0], pr[1]));
        m[r] = mnew;
        float pj[KT] __attribute__((aligned(32)));
        _mm256_store_ps(pj, pr[0]);
        _mm256_store_ps(pj + 8, pr[1]);
        __m256 ac[NV];
        for (size_t v = 0; v < NV; v++) ac[v] = _mm256_mul_ps(_mm256_load_ps(&acc[r][v * 8]), _mm256_set1_ps(corr));
        for (size_t j = 0; j < n; j++) {
          const __m256 pb = _mm256_set1_ps(pj[j]);
          for (size_t v = 0; v < NV; v++) ac[v] = _mm256_fmadd_ps(pb, _mm256_load_ps(&vt[j][v * 8]), ac[v]);
        }
        for (size_t v = 0; v < NV; v++) _mm256_store_ps(&acc[r][v * 8], ac[v]);
      }
    }
  }
  for (size_t r = 0; r < rows; r++) {
    float *o = out + (((b * NS + sp) * S + s0 + r / rep) * H + kv * rep + r % rep) * (HD + 2);
    for (size_t d = 0; d < HD; d++) o[d] = acc[r][d];
    o[HD] = m[r];
    o[HD + 1] = l[r];
  }
}
"""

_GCC_FLAGS = [
    "-O3",
    "-march=x86-64-v3",
    "-ffreestanding",
    "-fno-tree-loop-distribute-patterns",  # (no memset / memcpy calls: the program links no libc)
    "-fPIC",
    "-fno-stack-protector",
    "-fno-plt",
    "-fvisibility=hidden",
    "-ffunction-sections",
    "-fdata-sections",
]


class KernelError(RuntimeError):
    pass


def symbol(head_dim: int, kind: int) -> str:
    return f"aotllm_paged_attention_d{head_dim}_k{kind}"


def build(head_dim: int, kind: int, shared: bool = False) -> Path:
    """The kernel for one head dimension and cache type, built with gcc once (cached by source and flags):
    an object for the program to link, or (`shared`) a library for tests to call directly."""
    if head_dim % 8:
        raise KernelError(f"--cpu-attention needs a head dimension divisible by 8 (this model's: {head_dim})")
    name = symbol(head_dim, kind)
    flags = [*_GCC_FLAGS, f"-DHD={head_dim}", f"-DKIND={kind}", f"-DNAME={name}"]
    flags += ["-shared", "-fvisibility=default"] if shared else ["-c"]
    key = hashlib.sha256((_SOURCE + " ".join(flags)).encode()).hexdigest()[:16]
    root = cache_dir() / "kernels"
    out = root / f"{name}_{key}.{'so' if shared else 'o'}"
    if not out.is_file():
        cc = shutil.which(os.environ.get("CC", "gcc"))
        if cc is None:
            raise KernelError("--cpu-attention builds its kernel with gcc, which is not on PATH; hint: install gcc")
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            src = Path(tmp) / "paged_attention.c"
            src.write_text(_SOURCE.replace('__attribute__((visibility("hidden")))', "") if shared else _SOURCE)
            r = subprocess.run([cc, *flags, str(src), "-o", str(Path(tmp) / "o")], capture_output=True, text=True)
            if r.returncode:
                raise KernelError(f"gcc failed to build the attention kernel: {r.stderr.strip()[:2000]}")
            os.replace(Path(tmp) / "o", out)
    return out


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


def enable(model: torch.nn.Module) -> None:
    """Every attention block of `model` (a models.llama.PagedLlama) runs `attend`; the kernel is built now,
    so a failure shows before the trace."""
    for blk in model.modules():
        if hasattr(blk, "cpu_attention"):
            check(blk.c, blk.kv_dtype)
            build(blk.c.head_dim, KINDS[blk.kv_dtype])
            blk.cpu_attention = True


def attend(q, cache_rows, pages, last, c: LlamaConfig, kv_dtype: torch.dtype) -> torch.Tensor:
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
    part = paged_attention(q32, cache_rows, pages, last, c.num_kv_heads, stride, KINDS[kv_dtype], tile, splits)
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
    position each query sees) -> [B, splits, S, H, D + 2] partial results (module docstring)."""

    signature = (
        "paged_attention(Tensor q, Tensor cache, Tensor pages, Tensor last, int kv_heads, int stride, "
        "int kind, int query_tile, int splits) -> (Tensor)"
    )

    def select(self, ksel: KernelSelection):
        q, cache, pages, last = (ksel.arg_tensor(i) for i in range(4))
        for i in range(4, 9):
            ksel.attr_int(i)
        for t in (q, cache, pages, last):
            _specialize_static_dims(t)
        B, S, H, D = q.t.shape
        out = ksel.return_new_tensor([B, ksel.arg_descs[8].v, S, H, D + 2], torch.float32)
        _specialize_static_dims(out)

    def eager_execute(self, q, cache, pages, last, kv_heads, stride, kind, query_tile, splits):
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
        kv_heads, stride, kind, query_tile, splits = (ksel.arg_descs[i].v for i in range(4, 9))
        B, S, H, D = qt.shape
        N, R = ct.shape
        P = pt.shape[1]
        obj = build(D, kind)
        dyn = lambda d: "?" if d < 0 else str(d)  # noqa: E731
        ident = "_".join(dyn(d).replace("?", "D") for d in (B, S, H, D, N, R, P))
        name = f"aotllm_paged_attention_{ident}_k{kind}_q{query_tile}_s{splits}"
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
  %b = tensor.dim %q, %c0 : {q_t}
  %s = tensor.dim %q, %c1 : {q_t}
  %p = tensor.dim %pg, %c1 : {p_t}
  %bs = arith.muli %b, %s : index
  %nq = arith.muli %bs, %c{H * D}_ : index
  %n = tensor.dim %c, %c0 : {c_t}
  %nc = arith.muli %n, %c{R}_ : index
  %np = arith.muli %b, %p : index
  %nl = arith.addi %bs, %c0 : index
  %no = arith.muli %bs, %c{splits * H * (D + 2)}_ : index
  %qtm1 = arith.addi %s, %c{query_tile - 1}_ : index
  %nqt = arith.divui %qtm1, %c{query_tile}_ : index
  %bkv = arith.muli %b, %c{kv_heads * splits}_ : index
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
  %r = tensor.expand_shape %of [[0, 1, 2, 3, 4]] output_shape [{"%b" if B < 0 else B}, {splits}, {"%s" if S < 0 else S}, {H}, {D + 2}]
      : tensor<{flat(sizes["o"])}xf32> into {o_t}
  util.return %r : {o_t}
}}
}}
"""
        consts = {f"%c{v}_" for v in (R, H * D, splits * H * (D + 2), query_tile - 1, query_tile, kv_heads * splits)}
        decl = "".join(f"  {c} = arith.constant {c[2:-1]} : index\n" for c in sorted(consts))
        asm = asm.replace("  %b = tensor.dim", decl + "  %b = tensor.dim", 1)
        func = _AsmLoader().inline_template_function(kb, name, name, asm=asm)
        kb.yield_results(*impl_helper.call_function(func, *kb.arg_bindings[:4]))


def combine(part: torch.Tensor) -> torch.Tensor:
    """[B, splits, S, H, D + 2] partial results -> attention output [B, S, H, D] (0 where nothing is
    visible: padding rows)."""
    acc, m, l = part[..., :-2], part[..., -2], part[..., -1]
    if part.shape[1] == 1:
        return (acc[:, 0] / torch.clamp(l[:, 0], min=1e-30).unsqueeze(-1))
    w = torch.exp(m - m.amax(1, keepdim=True))
    den = torch.clamp((w * l).sum(1), min=1e-30)
    return (w.unsqueeze(-1) * acc).sum(1) / den.unsqueeze(-1)
