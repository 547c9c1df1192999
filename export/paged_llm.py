"""python -m export.paged_llm: a Llama GGUF / HF folder / IRPA -> MLIR (prefill_bs{N}, decode_bs{N}) + IRPA + config.json.

Weights are external parameters (`#stream.parameter.named<"model"::NAME>`), so the MLIR and the VMFB
stay small and the server loads the weights from the IRPA written here.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.export import Dim

from models.abi import ModelABI, PagedKVCache
from models.config import ModelError
from models.llama import DTYPES, PagedLlama
from models.weights import ModelWeights, load_weights, write_irpa

MODULE_NAME = "module"


def _int_list(s: str) -> list[int]:
    try:
        out = sorted({int(x) for x in s.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of integers, got {s!r}")
    if not out or out[0] < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be positive integers, got {s!r}")
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m export.paged_llm", description=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--gguf-file", type=Path)
    src.add_argument("--hf-dir", type=Path, help="folder with config.json + model.safetensors[.index.json]")
    src.add_argument("--irpa-file", type=Path, help="an IRPA written by this tool")
    p.add_argument("--output-dir", type=Path, help="writes model.mlir, config.json, model.irpa, tokenizer files")
    p.add_argument("--output-mlir", type=Path)
    p.add_argument("--output-config", type=Path)
    p.add_argument("--output-irpa", type=Path)
    p.add_argument("--bs-prefill", type=_int_list, default=[1, 4])
    p.add_argument("--bs-decode", type=_int_list, default=[1, 4, 8, 16])
    p.add_argument("--block-seq-stride", type=int, default=16)
    p.add_argument("--device-block-count", type=int, default=512, help="default KV page count for the server")
    p.add_argument("--activation-dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--kv-cache-dtype", choices=sorted(DTYPES), default=None, help="default: activation dtype")
    p.add_argument("--top-k", type=int, default=None, help="decode returns on-device top-k (1: argmax)")
    p.add_argument("--max-seq-len", type=int, default=None, help="default: the model's context length")
    args = p.parse_args(argv)
    if not args.output_dir and not (args.output_mlir and args.output_config and args.output_irpa):
        p.error("give --output-dir, or all of --output-mlir, --output-config and --output-irpa")
    if args.output_dir:
        args.output_mlir = args.output_mlir or args.output_dir / "model.mlir"
        args.output_config = args.output_config or args.output_dir / "config.json"
        args.output_irpa = args.output_irpa or args.output_dir / "model.irpa"
    if args.block_seq_stride < 1 or args.device_block_count < 2:
        p.error("--block-seq-stride must be >= 1 and --device-block-count >= 2 (page 0 is padding)")
    if args.top_k is not None and args.top_k < 1:
        p.error("--top-k must be >= 1")
    return args


class _Stage:
    """Prints one line per pipeline stage with its wall time."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        print(f"[export] {self.name} ...", file=sys.stderr, flush=True)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            print(f"[export] {self.name}: {time.perf_counter() - self.t0:.1f} s", file=sys.stderr, flush=True)


def export_programs(model: PagedLlama, prefill_bs: list[int], decode_bs: list[int], top_k: int | None):
    """Trace prefill_bs{N} / decode_bs{N} into one MLIR module (weights external)."""
    from iree.turbine import aot

    aot.externalize_module_parameters(model, external_scope="model")
    fxb = aot.FxProgramsBuilder(model)
    stride = model.block_seq_stride
    cache = model.allocate_cache(4)
    pages_dim = Dim("pages", min=2)
    i64 = torch.int64

    for bs in prefill_bs:
        seq_blocks, page_cols = Dim("seq_blocks", min=1, max=4096), Dim("page_cols", min=1, max=4096)
        args = (torch.zeros(bs, 2 * stride, dtype=i64), torch.zeros(bs, dtype=i64),
                torch.ones(bs, dtype=i64), torch.ones(bs, 2, dtype=i64), cache)
        dyn = {"tokens": {1: seq_blocks * stride}, "start_positions": {}, "seq_lens": {},
               "page_ids": {1: page_cols}, "cache": {0: pages_dim}}

        @fxb.export_program(name=f"prefill_bs{bs}", args=args, dynamic_shapes=dyn, strict=False)
        def _prefill(m, tokens, start_positions, seq_lens, page_ids, cache):
            return m.prefill(tokens, start_positions, seq_lens, page_ids, cache)

    for bs in decode_bs:
        page_cols = Dim("page_cols", min=1, max=4096)
        args = (torch.zeros(bs, 1, dtype=i64), torch.ones(bs, dtype=i64), torch.ones(bs, 2, dtype=i64), cache)
        dyn = {"tokens": {}, "seq_lens": {}, "page_ids": {1: page_cols}, "cache": {0: pages_dim}}

        @fxb.export_program(name=f"decode_bs{bs}", args=args, dynamic_shapes=dyn, strict=False)
        def _decode(m, tokens, seq_lens, page_ids, cache):
            logits = m.decode(tokens, seq_lens, page_ids, cache)
            if top_k is None:
                return logits
            return torch.topk(logits, top_k, dim=-1)

    return aot.export(fxb)


def model_state(model: PagedLlama, weights: ModelWeights) -> ModelWeights:
    """The weights as the exported program names and types them."""
    tensors = {k: v.detach().contiguous().numpy() if v.dtype != torch.bfloat16 else
               v.detach().contiguous().view(torch.int16).numpy().view("bfloat16")
               for k, v in model.state_dict().items()}
    return ModelWeights(weights.config, tensors, weights.source)


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    dtype = DTYPES[args.activation_dtype]
    kv_dtype_name = args.kv_cache_dtype or args.activation_dtype
    try:
        with _Stage("load weights"):
            weights = load_weights(args.gguf_file, args.hf_dir, args.irpa_file)
        with _Stage("build model"):
            model = PagedLlama.from_weights(weights, args.block_seq_stride, dtype, DTYPES[kv_dtype_name])
        args.output_mlir.parent.mkdir(parents=True, exist_ok=True)
        with _Stage(f"write parameters {args.output_irpa}"):
            write_irpa(model_state(model, weights), args.output_irpa)
        with _Stage("tokenizer"):
            tok_files, tok_info = write_tokenizer(args, args.output_config.parent)
        with _Stage(f"trace prefill {args.bs_prefill} / decode {args.bs_decode}"):
            output = export_programs(model, args.bs_prefill, args.bs_decode, args.top_k)
        with _Stage(f"write {args.output_mlir}"):
            output.save_mlir(str(args.output_mlir))
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    c = weights.config
    abi = ModelABI(
        module_name=MODULE_NAME,
        module_abi_version=1,
        max_seq_len=args.max_seq_len or c.max_seq_len,
        attn_head_dim=c.head_dim,
        prefill_batch_sizes=args.bs_prefill,
        decode_batch_sizes=args.bs_decode,
        transformer_block_count=c.num_layers,
        has_prefill_position=True,
        logits_normalization="none",
        top_k=args.top_k,
        paged_kv_cache=PagedKVCache(
            attention_head_count_kv=c.num_kv_heads,
            block_seq_stride=args.block_seq_stride,
            device_block_count=args.device_block_count,
            kv_cache_dtype=kv_dtype_name,
            paged_kv_block_size_elements_per_device=[model.page_elems],
        ),
        vocab_size=c.vocab_size,
        activation_dtype=args.activation_dtype,
        attention_head_count=c.num_heads,
        bos_token_id=tok_info.bos_id if tok_info else None,
        eos_token_ids=sorted(set(tok_info.eot_ids)) if tok_info else [],
        add_bos_token=bool(tok_info and tok_info.add_bos),
        tokenizer_files=tok_files,
        source=str(weights.source),
    )
    abi.save(args.output_config)
    print(f"[export] wrote {args.output_mlir}, {args.output_irpa}, {args.output_config} "
          f"in {time.perf_counter() - t_start:.1f} s", file=sys.stderr)
    return 0


def write_tokenizer(args, out_dir: Path):
    """Tokenizer files next to config.json: from the GGUF's vocabulary or the HF folder's files."""
    from models.tokenizer import load_tokenizer, save_tokenizer, tokenizer_from_gguf

    if args.gguf_file and _gguf_has_tokenizer(args.gguf_file):
        tok, info = tokenizer_from_gguf(args.gguf_file)
    elif args.hf_dir and (args.hf_dir / "tokenizer.json").is_file():
        tok, info = load_tokenizer(args.hf_dir)
    elif args.irpa_file and (args.irpa_file.parent / "tokenizer.json").is_file():
        tok, info = load_tokenizer(args.irpa_file.parent)
    else:
        print("[export] no tokenizer found next to the weights; the server will need --tokenizer",
              file=sys.stderr)
        return [], None
    save_tokenizer(tok, info, out_dir)
    return ["tokenizer.json", "tokenizer_config.json"], info


def _gguf_has_tokenizer(path: Path) -> bool:
    import gguf

    return "tokenizer.ggml.model" in gguf.GGUFReader(path).fields


if __name__ == "__main__":
    sys.exit(main())
