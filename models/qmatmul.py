"""`export.paged_llm --cpu-matmul`: the kept GGUF weights' matmul (models.qlinear) as an x86 kernel.

IREE 3.13 has no matmul over 4-bit or group-scaled 8-bit weights: dequantized in the graph, a decode step
reads the weights as float32 (or writes and rereads a float copy). This kernel (C, built with gcc, linked
as a custom dispatch like models.amx) reads the packed bytes once: y[M, N] from int8 activations q [M, K]
with per-group (s, s * sum q) and the weight tiles of models.gguf_quant.pack.

One workgroup takes a run of 16-row weight tiles, two at a time, and every activation row, four at a time.
Per group of 32 inputs it accumulates integer dot products of the 32 weight rows with each activation row
(AVX-512 VNNI `vpdpbusd`: 64 weight bytes = 16 rows x 4 inputs against 4 broadcast activation bytes, each
broadcast serving both tiles; the 4-bit build unpacks nibbles first), then adds d * dot * s - m * (s * sum
q) in float32 lanes, one per output row, so nothing is summed horizontally. The AVX2 build does the same in
two 8-row halves with `vpmaddubsw` (4-bit: 8 products summed in 16 bits cannot overflow, 8 * 2 * 15 * 127 <
2**15; 8-bit: on the weights less their offset of 128, with the sign moved onto the activations, as
llama.cpp's Q8_0 dot product does).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from iree.turbine.runtime.op_reg import CustomOp, KernelBuilder, KernelSelection, impl_helper
from iree.turbine.support.ir_imports import RankedTensorType

from . import ckernel
from .cpu import MATMUL_ISAS
from .page_gather import LIBRARY, _AsmLoader, _specialize_static_dims
from .qlinear import FORMATS, GROUP, ROW_TILE, QLinear, reference_matmul

ISAS = {isa: MATMUL_ISAS[isa] for isa in ("avx2", "avx512")}
_MARCH = {"avx512": ["-march=x86-64-v4", "-mavx512vnni"], "avx2": ["-march=x86-64-v3"]}
MAX_WORKGROUPS = 32

_SOURCE = r"""
#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>

#define MEMREF(T, n) const T *n##_base, const T *n, size_t n##_off, size_t n##_size, size_t n##_stride
#define INLINE static inline __attribute__((always_inline))

/* Per group: symmetric formats (SYM) have m = C * d with C = 2**(BITS - 1), so
   y += d * (s * dot - C * (s * sum q)); otherwise y += d * s * dot - m * (s * sum q). */
#define C ((float)(1 << (BITS - 1)))
#define SP (SYM ? 16 : 32)  /* scales per group and tile: d (and m) for 16 rows */

#ifdef __AVX512F__
#define MR 4
/* rows (<= MR) activation rows against NT (1 or 2) consecutive 16-row tiles: y[r][0 .. 16 NT). Two tiles
   share each broadcast activation word and scalar; each (row, tile) is its own dependency chain. */
INLINE void block(const uint8_t *w, const uint16_t *s, const int8_t *x, const float *xa, float *y,
                  size_t K, size_t N, const int rows, const int NT) {
  const size_t G = K / 32, tw = 16 * K * BITS / 8, ts = G * SP;  /* one tile's bytes, scales */
  __m512 acc[MR][2];
  for (int r = 0; r < rows; r++)
    for (int j = 0; j < NT; j++) acc[r][j] = _mm512_setzero_ps();
  for (size_t g = 0; g < G; g++) {
    __m512i ia[MR][2];
    for (int r = 0; r < rows; r++)
      for (int j = 0; j < NT; j++) ia[r][j] = _mm512_setzero_si512();
#if BITS == 8
    const uint8_t *wg = w + g * 512;
    for (int kk = 0; kk < 8; kk++) {
      __m512i wv[2];
      for (int j = 0; j < NT; j++) wv[j] = _mm512_loadu_si512(wg + j * tw + kk * 64);
      for (int r = 0; r < rows; r++) {
        const __m512i xb = _mm512_set1_epi32(((const int32_t *)(x + r * K + g * 32))[kk]);
        for (int j = 0; j < NT; j++) ia[r][j] = _mm512_dpbusd_epi32(ia[r][j], wv[j], xb);
      }
    }
#else
    const uint8_t *wg = w + g * 256;
    const __m512i lo4 = _mm512_set1_epi8(0x0F);
    for (int kk = 0; kk < 4; kk++) {
      __m512i lo[2], hi[2];
      for (int j = 0; j < NT; j++) {
        __m512i wv = _mm512_loadu_si512(wg + j * tw + kk * 64);
        lo[j] = _mm512_and_si512(wv, lo4);
        hi[j] = _mm512_and_si512(_mm512_srli_epi16(wv, 4), lo4);
      }
      for (int r = 0; r < rows; r++) {
        const int32_t *xr = (const int32_t *)(x + r * K + g * 32 + kk * 8);
        const __m512i x0 = _mm512_set1_epi32(xr[0]), x1 = _mm512_set1_epi32(xr[1]);
        for (int j = 0; j < NT; j++) {
          ia[r][j] = _mm512_dpbusd_epi32(ia[r][j], lo[j], x0);
          ia[r][j] = _mm512_dpbusd_epi32(ia[r][j], hi[j], x1);
        }
      }
    }
#endif
    __m512 d[2], m[2];
    for (int j = 0; j < NT; j++) {
      d[j] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(s + j * ts + g * SP)));
      m[j] = SYM ? d[j] : _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(s + j * ts + g * SP + 16)));
    }
    for (int r = 0; r < rows; r++) {
      const float *ar = xa + (r * G + g) * 2;
      const __m512 sx = _mm512_set1_ps(ar[0]), sq = _mm512_set1_ps(SYM ? C * ar[1] : ar[1]);
      for (int j = 0; j < NT; j++) {
        const __m512 dot = _mm512_cvtepi32_ps(ia[r][j]);
#if SYM
        acc[r][j] = _mm512_fmadd_ps(_mm512_fmsub_ps(dot, sx, sq), d[j], acc[r][j]);
#else
        acc[r][j] = _mm512_fmadd_ps(_mm512_mul_ps(dot, d[j]), sx, acc[r][j]);
        acc[r][j] = _mm512_fnmadd_ps(m[j], sq, acc[r][j]);
#endif
      }
    }
  }
  for (int r = 0; r < rows; r++)
    for (int j = 0; j < NT; j++) _mm512_storeu_ps(y + r * N + 16 * j, acc[r][j]);
}
#else
#define MR 4
/* AVX2: one 8-row half (h) of a tile at a time. */
INLINE void half(const uint8_t *w, const uint16_t *s, const int8_t *x, const float *xa, float *y,
                 size_t K, size_t N, const int rows, const int h) {
  const size_t G = K / 32;
  __m256 acc[MR];
  for (int r = 0; r < rows; r++) acc[r] = _mm256_setzero_ps();
  for (size_t g = 0; g < G; g++) {
    __m256i ia[MR];
#if BITS == 8
    /* The dot of w' = u - 128 (signed bytes, |w'| <= 128): vpmaddubsw of |w'| with x carrying w's sign
       cannot saturate (2 * 128 * 127 < 2**15); the epilogue adds back what the offset took. */
    for (int r = 0; r < rows; r++) ia[r] = _mm256_setzero_si256();
    const uint8_t *wg = w + g * 512 + h * 32;
    const __m256i flip = _mm256_set1_epi8((char)0x80), ones = _mm256_set1_epi16(1);
    for (int kk = 0; kk < 8; kk++) {
      const __m256i ws = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(wg + kk * 64)), flip);
      const __m256i wa = _mm256_abs_epi8(ws);
      for (int r = 0; r < rows; r++) {
        const __m256i xb = _mm256_set1_epi32(((const int32_t *)(x + r * K + g * 32))[kk]);
        const __m256i p = _mm256_maddubs_epi16(wa, _mm256_sign_epi8(xb, ws));
        ia[r] = _mm256_add_epi32(ia[r], _mm256_madd_epi16(p, ones));
      }
    }
#else
    __m256i p[MR];
    for (int r = 0; r < rows; r++) p[r] = _mm256_setzero_si256();
    const uint8_t *wg = w + g * 256 + h * 32;
    const __m256i lo4 = _mm256_set1_epi8(0x0F);
    for (int kk = 0; kk < 4; kk++) {
      __m256i wv = _mm256_loadu_si256((const __m256i *)(wg + kk * 64));
      __m256i w0 = _mm256_and_si256(wv, lo4), w1 = _mm256_and_si256(_mm256_srli_epi16(wv, 4), lo4);
      for (int r = 0; r < rows; r++) {
        const int32_t *xr = (const int32_t *)(x + r * K + g * 32 + kk * 8);
        p[r] = _mm256_add_epi16(p[r], _mm256_maddubs_epi16(w0, _mm256_set1_epi32(xr[0])));
        p[r] = _mm256_add_epi16(p[r], _mm256_maddubs_epi16(w1, _mm256_set1_epi32(xr[1])));
      }
    }
    for (int r = 0; r < rows; r++) ia[r] = _mm256_madd_epi16(p[r], _mm256_set1_epi16(1));
#endif
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + g * SP + h * 8)));
#if !SYM
    const __m256 m = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + g * SP + 16 + h * 8)));
#endif
    for (int r = 0; r < rows; r++) {
      const float *ar = xa + (r * G + g) * 2;
      __m256 dot = _mm256_cvtepi32_ps(ia[r]);
#if BITS == 8 && SYM  /* dot is over u - C already: d * s * dot */
      acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(dot, _mm256_set1_ps(ar[0])), d, acc[r]);
#elif BITS == 8  /* d * s * (dot + C sum q) - m * s sum q */
      acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(dot, d), _mm256_set1_ps(ar[0]), acc[r]);
      acc[r] = _mm256_fmadd_ps(_mm256_fmsub_ps(d, _mm256_set1_ps(C), m), _mm256_set1_ps(ar[1]), acc[r]);
#elif SYM
      acc[r] = _mm256_fmadd_ps(_mm256_fmsub_ps(dot, _mm256_set1_ps(ar[0]), _mm256_set1_ps(C * ar[1])), d, acc[r]);
#else
      acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(dot, d), _mm256_set1_ps(ar[0]), acc[r]);
      acc[r] = _mm256_fnmadd_ps(m, _mm256_set1_ps(ar[1]), acc[r]);
#endif
    }
  }
  for (int r = 0; r < rows; r++) _mm256_storeu_ps(y + r * N + h * 8, acc[r]);
}
INLINE void block(const uint8_t *w, const uint16_t *s, const int8_t *x, const float *xa, float *y,
                  size_t K, size_t N, const int rows, const int NT) {
  const size_t tw = 16 * K * BITS / 8, ts = K / 32 * SP;
  for (int j = 0; j < NT; j++) {
    half(w + j * tw, s + j * ts, x, xa, y + 16 * j, K, N, rows, 0);
    half(w + j * tw, s + j * ts, x, xa, y + 16 * j, K, N, rows, 1);
  }
}
#endif

__attribute__((visibility("hidden")))
void NAME(MEMREF(int8_t, x), MEMREF(float, xa), MEMREF(uint8_t, w), MEMREF(uint16_t, s),
          float *y_base, float *y, size_t y_off, size_t y_size, size_t y_stride,
          size_t M, size_t N, size_t K, size_t per_wg, size_t wg) {
  x += x_off; xa += xa_off; w += w_off; s += s_off; y += y_off;
  const size_t G = K / 32, tiles = N / 16;
  const size_t t1 = (wg + 1) * per_wg < tiles ? (wg + 1) * per_wg : tiles;
  for (size_t t = wg * per_wg; t < t1; t += 2) {
    const uint8_t *wt = w + t * 16 * K * BITS / 8;
    const uint16_t *st = s + t * G * SP;
    const int two = t + 1 < t1;
    for (size_t m0 = 0; m0 < M; m0 += MR) {
      const int8_t *xr = x + m0 * K;
      const float *ar = xa + m0 * G * 2;
      float *yr = y + m0 * N + t * 16;
#define CASE(R) \
  case R: if (two) block(wt, st, xr, ar, yr, K, N, R, 2); else block(wt, st, xr, ar, yr, K, N, R, 1); break;
      switch (M - m0 < MR ? M - m0 : MR) { CASE(1) CASE(2) CASE(3) CASE(4) }
#undef CASE
    }
  }
}
"""


class KernelError(RuntimeError):
    pass


def symbol(fmt: str, isa: str) -> str:
    return f"aotllm_qmm_{fmt}_{isa}"


def build(fmt: str, isa: str, shared: bool = False) -> Path:
    """The kernel for one kept format and ISA (gcc, cached): an object the program links, or (`shared`) a
    library the tests call directly."""
    name = symbol(fmt, isa)
    bits, symmetric = FORMATS[fmt]
    return ckernel.build(
        _SOURCE,
        [*_MARCH[isa], f"-DBITS={bits}", f"-DSYM={int(symmetric)}", f"-DNAME={name}"],
        name,
        KernelError,
        "--cpu-matmul builds its kernel with gcc, which is not on PATH; hint: install gcc, or export without it",
        "gcc failed to build the quantized matmul kernel: {stderr}",
        shared,
    )


def per_workgroup(out_features: int) -> int:
    """16-row tiles per workgroup: an even count (the kernel takes tiles two at a time), at most
    MAX_WORKGROUPS workgroups (enough to spread over the cores)."""
    tiles = out_features // ROW_TILE
    per = -(-tiles // MAX_WORKGROUPS)
    return per + per % 2


def enable(model: torch.nn.Module, isa: str) -> None:
    """Every QLinear of `model` runs the kernel built for `isa` (built now: a failure shows before the trace)."""
    for mod in model.modules():
        if isinstance(mod, QLinear):
            build(mod.fmt, isa)
            mod.kernel = functools.partial(qmatmul, isa=isa)


def qmatmul(q: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, fmt: str, isa: str):
    return qmm(q, a, weight, scales, list(FORMATS).index(fmt), list(ISAS).index(isa))


@CustomOp.register(library=LIBRARY)
class qmm(CustomOp):
    """q [M, K] int8, a [M, K/32, 2] f32 (models.qlinear.quantize_rows), weight [N, K * bits / 8] int8,
    scales [N/16, K or K/2] f16 (models.gguf_quant.pack); fmt, isa: indices into FORMATS, ISAS -> y [M, N] f32."""

    signature = "qmm(Tensor q, Tensor a, Tensor w, Tensor s, int fmt, int isa) -> (Tensor)"

    def select(self, ksel: KernelSelection):
        ts = [ksel.arg_tensor(i) for i in range(4)]
        ksel.attr_int(4)
        ksel.attr_int(5)
        for t in ts:
            _specialize_static_dims(t)
        out = ksel.return_new_tensor([ts[0].t.shape[0], ts[2].t.shape[0]], torch.float32)
        _specialize_static_dims(out)

    def eager_execute(self, q, a, w, s, fmt, isa):
        return reference_matmul(q, a, w, s, list(FORMATS)[fmt])

    def generate(self, ksel: KernelSelection, kb: KernelBuilder):
        qt, _, wt, st = (RankedTensorType(kb.arg_value(i).type) for i in range(4))
        fmt, isa = list(FORMATS)[ksel.arg_descs[4].v], list(ISAS)[ksel.arg_descs[5].v]
        (M, K), (N, KB) = qt.shape, wt.shape
        G = K // GROUP
        SC = st.shape[1] * st.shape[0]  # scale values
        obj, sym = build(fmt, isa), symbol(fmt, isa)
        per_wg = per_workgroup(N)
        groups = -(-(N // ROW_TILE) // per_wg)
        ms = "?" if M < 0 else str(M)
        name = f"aotllm_qmm_{ms.replace('?', 'D')}x{N}x{K}_{fmt}_{isa}"
        flat = lambda n: "?" if M < 0 else str(M * n)  # noqa: E731
        tie = lambda v: f"{{%{v}}}" if M < 0 else ""  # noqa: E731
        q_t, a_t, o_t = f"tensor<{ms}x{K}xi8>", f"tensor<{ms}x{G}x2xf32>", f"tensor<{ms}x{N}xf32>"
        w_t, s_t = f"tensor<{N}x{KB}xi8>", f"tensor<{N // ROW_TILE}x{st.shape[1]}xf16>"
        out_shape = f"%m, {N}" if M < 0 else f"{M}, {N}"
        asm = f"""module {{
stream.executable private @{name}_exe attributes {{
  hal.executable.objects = #hal.executable.objects<{{
    #hal.executable.target<"llvm-cpu", "embedded-elf-x86_64", {{target_triple = "x86_64-unknown-unknown-eabi-elf"}}> = [
      #hal.executable.object<{{path = "{obj}"}}>]
  }}>
}} {{
  stream.executable.export public @{name}_entry workgroups(%g: index) -> (index, index, index) {{
    %c1 = arith.constant 1 : index
    stream.return %g, %c1, %c1 : index, index, index
  }}
  builtin.module {{
    func.func private @{sym}(memref<?xi8>, memref<?xf32>, memref<?xi8>, memref<?xi16>, memref<?xf32>,
        index, index, index, index, index) attributes {{hal.import.static}}
    func.func @{name}_entry(%bq: !stream.binding, %ba: !stream.binding, %bw: !stream.binding,
                            %bs: !stream.binding, %by: !stream.binding, %m: index) {{
      %c0 = arith.constant 0 : index
      %n = arith.constant {N} : index
      %k = arith.constant {K} : index
      %per = arith.constant {per_wg} : index
      %nq = arith.constant {K} : index
      %na = arith.constant {2 * G} : index
      %nw = arith.constant {N * KB} : index
      %ns = arith.constant {SC} : index
      %mq = arith.muli %m, %nq : index
      %ma = arith.muli %m, %na : index
      %my = arith.muli %m, %n : index
      %wg = hal.interface.workgroup.id[0] : index
      %q = stream.binding.subspan %bq[%c0] : !stream.binding -> memref<?xi8>{{%mq}}
      %a = stream.binding.subspan %ba[%c0] : !stream.binding -> memref<?xf32>{{%ma}}
      %w = stream.binding.subspan %bw[%c0] : !stream.binding -> memref<?xi8>{{%nw}}
      %s = stream.binding.subspan %bs[%c0] : !stream.binding -> memref<?xi16>{{%ns}}
      %y = stream.binding.subspan %by[%c0] : !stream.binding -> memref<?xf32>{{%my}}
      func.call @{sym}(%q, %a, %w, %s, %y, %m, %n, %k, %per, %wg)
          : (memref<?xi8>, memref<?xf32>, memref<?xi8>, memref<?xi16>, memref<?xf32>,
             index, index, index, index, index) -> ()
      return
    }}
  }}
}}
util.func private @{name}(%q: {q_t}, %a: {a_t}, %w: {w_t}, %s: {s_t}) -> {o_t} {{
  %c0 = arith.constant 0 : index
  %m = tensor.dim %q, %c0 : {q_t}
  %cq = arith.constant {K} : index
  %ca = arith.constant {2 * G} : index
  %cy = arith.constant {N} : index
  %mq = arith.muli %m, %cq : index
  %ma = arith.muli %m, %ca : index
  %my = arith.muli %m, %cy : index
  %qf = tensor.collapse_shape %q [[0, 1]] : {q_t} into tensor<{flat(K)}xi8>
  %af = tensor.collapse_shape %a [[0, 1, 2]] : {a_t} into tensor<{flat(2 * G)}xf32>
  %wf = tensor.collapse_shape %w [[0, 1]] : {w_t} into tensor<{N * KB}xi8>
  %s16 = tensor.bitcast %s : {s_t} to tensor<{N // ROW_TILE}x{st.shape[1]}xi16>
  %sf = tensor.collapse_shape %s16 [[0, 1]] : tensor<{N // ROW_TILE}x{st.shape[1]}xi16> into tensor<{SC}xi16>
  %ng = arith.constant {groups} : index
  %yf = flow.dispatch @{name}_exe::@{name}_entry[%ng](%qf, %af, %wf, %sf, %m)
      : (tensor<{flat(K)}xi8>{tie("mq")}, tensor<{flat(2 * G)}xf32>{tie("ma")}, tensor<{N * KB}xi8>,
         tensor<{SC}xi16>, index) -> tensor<{flat(N)}xf32>{tie("my")}
  %r = tensor.expand_shape %yf [[0, 1]] output_shape [{out_shape}] : tensor<{flat(N)}xf32> into {o_t}
  util.return %r : {o_t}
}}
}}
"""
        func = _AsmLoader().inline_template_function(kb, name, name, asm=asm)
        kb.yield_results(*impl_helper.call_function(func, *kb.arg_bindings[:4]))
