"""W8A8 matmuls on Intel AMX tiles (`export.paged_llm --amx`): a hand-written dispatch IREE links in.

IREE 3.13 has no AMX microkernel: its int8 matmul on x86 is an AVX-512 VNNI loop (16 x 16 x 2 tiles),
which leaves the AMX tiles of a CPU that has them unused and the W8A8 matmuls far from that CPU's peak.
One AMX `tdpbssd` multiplies a 16 x 64 int8 tile by a 64 x 16 one (16,384 multiply-adds). The kernel below
(C, built here with gcc into an object that the program links: `hal.executable.object`) computes
C[M, N] = A[M, K] B[N, K]^T (int8 in, int32 out) with one workgroup per 64 output columns, all rows, 16 at
a time. The weight is stored pre-packed in the tile layout AMX reads: for each 16 columns and 64-deep
slice of K, 16 rows of (16 columns x 4 consecutive k), 1 KB, contiguous; `pack` makes it at export.

Linux gives a process the AMX tile state only on request (`arch_prctl(ARCH_REQ_XCOMP_PERM)`): serve.core.runner
asks (models.cpu) before it loads a program whose config requires "amx-int8" (models.abi `cpu_features`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from iree.turbine.runtime.op_reg import CustomOp, KernelBuilder, KernelSelection, impl_helper
from iree.turbine.support.ir_imports import RankedTensorType

from . import ckernel
from .page_gather import LIBRARY, _AsmLoader, _specialize_static_dims
from .quant import Int8Linear

CPU_FEATURE = "amx-int8"
TILE_N, TILE_K = 64, 64  # one workgroup's columns; one tile's depth

_SOURCE = r"""
#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>

typedef struct { uint8_t palette, start_row, reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; } tile_config;

/* MLIR passes each memref as (base, aligned, offset, size, stride). */
__attribute__((visibility("hidden")))
void aotllm_amx_mm_s8(const int8_t *a_base, const int8_t *a, size_t a_off, size_t a_size, size_t a_stride,
                      const int8_t *b_base, const int8_t *b, size_t b_off, size_t b_size, size_t b_stride,
                      int32_t *c_base, int32_t *c, size_t c_off, size_t c_size, size_t c_stride,
                      size_t M, size_t N, size_t K, size_t workgroup) {
  a += a_off; b += b_off; c += c_off;
  const size_t kb = K / 64, n0 = workgroup * 64, slab = kb * 1024;
  const int8_t *w = b + (n0 / 16) * slab;
  for (size_t m0 = 0; m0 < M; m0 += 16) {
    const uint8_t rows = M - m0 < 16 ? (uint8_t)(M - m0) : 16;
    tile_config cfg = {0};
    cfg.palette = 1;
    for (int t = 0; t < 5; t++) { cfg.colsb[t] = 64; cfg.rows[t] = rows; }  /* 4 C tiles (rows x 16 i32), A */
    for (int t = 5; t < 8; t++) { cfg.colsb[t] = 64; cfg.rows[t] = 16; }    /* B tiles: 16 x (16 x 4 k) */
    _tile_loadconfig(&cfg);
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    const int8_t *x = a + m0 * K;
    for (size_t k = 0; k < kb; k++) {
      const int8_t *p = w + k * 1024;
      _tile_loadd(4, x + k * 64, K);
      _tile_loadd(5, p, 64); _tile_dpbssd(0, 4, 5);
      _tile_loadd(6, p + slab, 64); _tile_dpbssd(1, 4, 6);
      _tile_loadd(7, p + 2 * slab, 64); _tile_dpbssd(2, 4, 7);
      _tile_loadd(5, p + 3 * slab, 64); _tile_dpbssd(3, 4, 5);
    }
    int32_t *y = c + m0 * N + n0;
    _tile_stored(0, y, N * 4); _tile_stored(1, y + 16, N * 4);
    _tile_stored(2, y + 32, N * 4); _tile_stored(3, y + 48, N * 4);
  }
  _tile_release();
}
"""


class AmxError(RuntimeError):
    pass


def object_path() -> Path:
    """The kernel as an x86-64 ELF object, built with gcc once per source (cached by its hash). The program
    names it by path: IREE 3.13 links an object given as `data` without its symbols ("undefined symbol")."""
    return ckernel.build(
        _SOURCE,
        ["-mamx-tile", "-mamx-int8", "-mavx512f"],
        "amx_mm",
        AmxError,
        "--amx builds its kernel with gcc, which is not on PATH; hint: install gcc, or export without --amx",
        "gcc failed to build the AMX kernel: {stderr}; hint: gcc >= 11 knows AMX, or export without --amx",
    )


def fits(out_features: int, in_features: int) -> bool:
    return out_features % TILE_N == 0 and in_features % TILE_K == 0


def pack(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] int8 -> the same bytes in AMX order ([N/16][K/64][k%64/4][n%16][k%4]), shape [N, K] kept."""
    n, k = weight.shape
    return weight.reshape(n // 16, 16, k // 64, 16, 4).permute(0, 2, 3, 1, 4).reshape(n, k).contiguous()


def unpack(packed: torch.Tensor) -> torch.Tensor:
    n, k = packed.shape
    return packed.reshape(n // 16, k // 64, 16, 16, 4).permute(0, 3, 1, 2, 4).reshape(n, k).contiguous()


@CustomOp.register(library=LIBRARY)
class amx_int8_mm(CustomOp):
    """x [M, K] int8 (M may be dynamic), w [N, K] int8 from `pack` -> x @ unpack(w)^T as [M, N] int32."""

    signature = "amx_int8_mm(Tensor x, Tensor w) -> (Tensor)"

    def select(self, ksel: KernelSelection):
        x, w = ksel.arg_tensor(0), ksel.arg_tensor(1)
        _specialize_static_dims(x)
        _specialize_static_dims(w)
        out = ksel.return_new_tensor([x.t.shape[0], w.t.shape[0]], torch.int32)
        _specialize_static_dims(out)

    def eager_execute(self, x, w):
        return x.to(torch.int32) @ unpack(w).to(torch.int32).t()

    def generate(self, ksel: KernelSelection, kb: KernelBuilder):
        xt = RankedTensorType(kb.arg_value(0).type)
        wt = RankedTensorType(kb.arg_value(1).type)
        (m, k), (n, _) = xt.shape, wt.shape
        m_s = "?" if m < 0 else str(m)
        flat_x, flat_c = ("?", "?") if m < 0 else (m * k, m * n)
        out_shape = f"%m, {n}" if m < 0 else f"{m}, {n}"
        dyn_mk, dyn_mn = ("{%mk}", "{%mn}") if m < 0 else ("", "")
        name = f"aotllm_amx_mm_{m_s.replace('?', 'D')}x{n}x{k}"
        x_t, w_t, out_t = f"tensor<{m_s}x{k}xi8>", f"tensor<{n}x{k}xi8>", f"tensor<{m_s}x{n}xi32>"
        asm = f"""module {{
stream.executable private @{name}_exe attributes {{
  hal.executable.objects = #hal.executable.objects<{{
    #hal.executable.target<"llvm-cpu", "embedded-elf-x86_64", {{target_triple = "x86_64-unknown-unknown-eabi-elf"}}> = [
      #hal.executable.object<{{path = "{object_path()}"}}>]
  }}>
}} {{
  stream.executable.export public @mm workgroups(%n: index) -> (index, index, index) {{
    %x = affine.apply affine_map<()[s0] -> (s0 ceildiv {TILE_N})>()[%n]
    %c1 = arith.constant 1 : index
    stream.return %x, %c1, %c1 : index, index, index
  }}
  builtin.module {{
    func.func private @aotllm_amx_mm_s8(memref<?xi8>, memref<?xi8>, memref<?xi32>, index, index, index, index)
        attributes {{hal.import.static}}
    func.func @mm(%ba: !stream.binding, %bb: !stream.binding, %bc: !stream.binding, %m: index, %n: index,
                  %k: index) {{
      %c0 = arith.constant 0 : index
      %wg = hal.interface.workgroup.id[0] : index
      %mk = arith.muli %m, %k : index
      %nk = arith.muli %n, %k : index
      %mn = arith.muli %m, %n : index
      %a = stream.binding.subspan %ba[%c0] : !stream.binding -> memref<?xi8>{{%mk}}
      %b = stream.binding.subspan %bb[%c0] : !stream.binding -> memref<?xi8>{{%nk}}
      %c = stream.binding.subspan %bc[%c0] : !stream.binding -> memref<?xi32>{{%mn}}
      func.call @aotllm_amx_mm_s8(%a, %b, %c, %m, %n, %k, %wg)
          : (memref<?xi8>, memref<?xi8>, memref<?xi32>, index, index, index, index) -> ()
      return
    }}
  }}
}}
util.func private @{name}(%x: {x_t}, %w: {w_t}) -> {out_t} {{
  %c0 = arith.constant 0 : index
  %m = tensor.dim %x, %c0 : {x_t}
  %n = arith.constant {n} : index
  %k = arith.constant {k} : index
  %mk = arith.muli %m, %k : index
  %mn = arith.muli %m, %n : index
  %xf = tensor.collapse_shape %x [[0, 1]] : {x_t} into tensor<{flat_x}xi8>
  %wf = tensor.collapse_shape %w [[0, 1]] : {w_t} into tensor<{n * k}xi8>
  %cf = flow.dispatch @{name}_exe::@mm[%n](%xf, %wf, %m, %n, %k)
      : (tensor<{flat_x}xi8>{dyn_mk}, tensor<{n * k}xi8>, index, index, index) -> tensor<{flat_c}xi32>{dyn_mn}
  %r = tensor.expand_shape %cf [[0, 1]] output_shape [{out_shape}] : tensor<{flat_c}xi32> into {out_t}
  util.return %r : {out_t}
}}
}}
"""
        func = _AsmLoader().inline_template_function(kb, name, name, asm=asm)
        kb.yield_results(*impl_helper.call_function(func, *kb.arg_bindings[:2]))


class AmxInt8Linear(Int8Linear):
    """An `Int8Linear` whose weight is stored packed in the AMX tile layout (`pack`) and whose int8 product
    runs as `amx_int8_mm`; the parameters keep Int8Linear's names, shapes and dtypes."""

    @classmethod
    def from_int8(cls, lin: Int8Linear) -> AmxInt8Linear:
        """Takes over `lin`'s parameters (the same tensors) and packs its weight in place."""
        with torch.device("meta"):  # (the new parameters are replaced at once: allocate nothing)
            amx = cls(lin.in_features, lin.out_features)
        amx.weight, amx.weight_scale, amx.input_scale = lin.weight, lin.weight_scale, lin.input_scale
        amx.weight.data = pack(amx.weight.data)
        return amx.train(lin.training)

    def int_matmul(self, q: torch.Tensor) -> torch.Tensor:
        return amx_int8_mm(q, self.weight)


def enable(model: torch.nn.Module) -> None:
    """Every W8A8 projection of `model` whose shape tiles evenly becomes an `AmxInt8Linear`, in place."""
    swapped: dict[Int8Linear, AmxInt8Linear] = {}  # a module under two names is packed once, swapped under both
    for parent in list(model.modules()):
        for name, mod in list(parent._modules.items()):  # (named_children would skip a module's second name)
            if type(mod) is Int8Linear and fits(mod.out_features, mod.in_features):
                if mod not in swapped:
                    swapped[mod] = AmxInt8Linear.from_int8(mod)
                setattr(parent, name, swapped[mod])
