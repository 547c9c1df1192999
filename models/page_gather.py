"""`page_gather(source, indices)`: `source[indices]` (whole rows along dim 0) as one `iree_linalg_ext.gather`.

Why a custom op: torch-mlir lowers `index_select` / indexing to a `linalg.generic` that reads the source
element by element (`tensor.extract` per element, plus a div/rem per element when the rows are
multi-dimensional), and IREE 3.13 compiles that to a scalar copy. IREE's own gather op copies each row with
vector loads and fuses into its consumer (README "IREE 3.13 findings"). Eagerly it is plain indexing. `materialize`
puts the gather in a dispatch of its own, for consumers IREE fails to compile it fused into.
"""

from __future__ import annotations

from iree.turbine.runtime.op_reg import CustomOp, KernelBuilder, KernelSelection, def_library, impl_helper
from iree.turbine.support.ir_imports import RankedTensorType

LIBRARY = def_library("aotllm")


class _AsmLoader(impl_helper.TemplateLoader):
    """Templates given as MLIR text (turbine's loaders read them from package files)."""

    def load_template(self, kb: KernelBuilder, name: str, **kwargs):
        return self._parse_module_asm(kb, kwargs["asm"])


def _specialize_static_dims(desc) -> None:
    for i, d in enumerate(desc.t.shape):
        if isinstance(d, int):
            desc.spec_dims[i] = d


def _tensor_type(shape, element_type) -> str:
    return f"tensor<{'x'.join('?' if d < 0 else str(d) for d in shape)}x{element_type}>"


@CustomOp.register(library=LIBRARY)
class page_gather(CustomOp):
    """source [N, *row] with indices [*batch] (int64) -> [*batch, *row]."""

    signature = "page_gather(Tensor source, Tensor indices, int materialize) -> (Tensor)"

    def select(self, ksel: KernelSelection):
        source, indices = ksel.arg_tensor(0), ksel.arg_tensor(1)
        ksel.attr_int(2)
        _specialize_static_dims(source)
        _specialize_static_dims(indices)
        out = ksel.return_new_tensor(list(indices.t.shape) + list(source.t.shape[1:]), source.t.dtype)
        _specialize_static_dims(out)

    def eager_execute(self, source, indices, materialize):
        return source[indices]

    def generate(self, ksel: KernelSelection, kb: KernelBuilder):
        src = RankedTensorType(kb.arg_value(0).type)
        idx = RankedTensorType(kb.arg_value(1).type)
        src_t, idx_t = str(src), str(idx)
        out_t = _tensor_type(list(idx.shape) + list(src.shape[1:]), src.element_type)
        dims = [i for i, d in enumerate(idx.shape) if d < 0]
        ident = "_".join("x".join("D" if d < 0 else str(d) for d in t.shape) for t in (src, idx))
        materialize = bool(ksel.arg_descs[2].v)
        name = f"aotllm_page_gather_{ident}_{src.element_type}{'_materialized' if materialize else ''}"
        dim_lines = "".join(
            f"  %c{i} = arith.constant {i} : index\n  %d{i} = tensor.dim %idx, %c{i} : {idx_t}\n" for i in dims
        )
        asm = (
            f"module {{\nutil.func private @{name}(%src: {src_t}, %idx: {idx_t}) -> {out_t} {{\n{dim_lines}"
            f"  %empty = tensor.empty({', '.join(f'%d{i}' for i in dims)}) : {out_t}\n"
            f"  %r = iree_linalg_ext.gather dimension_map = [0] ins(%src, %idx : {src_t}, {idx_t}) "
            f"outs(%empty : {out_t}) -> {out_t}\n"
            + (
                f"  %b = util.optimization_barrier %r : {out_t}\n"
                f"  %t = flow.tensor.tie_shape %b : {out_t}{{{', '.join(f'%d{i}' for i in dims)}}}\n"
                f"  util.return %t : {out_t}\n"
                if materialize
                else f"  util.return %r : {out_t}\n"
            )
            + "}\n}\n"
        )
        func = _AsmLoader().inline_template_function(kb, name, name, asm=asm)
        kb.yield_results(*impl_helper.call_function(func, *kb.arg_bindings[:2]))
