"""python -m sharding: split a model's parameters for tensor parallelism over N devices.

  python -m sharding --gguf-file M.gguf | --hf-dir D | --irpa-file M.irpa \\
      --tensor-parallelism-size N --output-irpa OUT/model.irpa
writes OUT/model.irpa (shared tensors + config) and OUT/model.rank{0..N-1}.irpa. Then
  python -m export.paged_llm --irpa-file OUT/model.irpa --output-dir OUT
exports the N-device program (see README, "Tensor parallelism").
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from models.config import ModelError
from models.gguf_tokenizer import save_tokenizer, tokenizer_near_weights
from models.weights import load_weights

from . import shard_tensors, write_sharded


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m sharding", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--gguf-file", type=Path)
    src.add_argument("--hf-dir", type=Path)
    src.add_argument("--irpa-file", type=Path, help="an unsharded IRPA written by export.paged_llm")
    p.add_argument("--tensor-parallelism-size", type=int, required=True)
    p.add_argument("--output-irpa", type=Path, required=True)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        weights = load_weights(args.gguf_file, args.hf_dir, args.irpa_file)
        if weights.tp != 1:
            raise ModelError(f"{weights.source} is already sharded {weights.tp} ways; shard the unsharded model")
        paths = write_sharded(shard_tensors(weights, args.tensor_parallelism_size), args.output_irpa)
        tokenizer = tokenizer_near_weights(args.gguf_file, args.hf_dir, args.irpa_file)
        if tokenizer:  # for the export of OUT/model.irpa to find
            save_tokenizer(*tokenizer, args.output_irpa.parent)
            paths.append(args.output_irpa.parent / "tokenizer.json")
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(f"[sharding] wrote {path} ({path.stat().st_size / 1e6:.1f} MB)", file=sys.stderr)
    print(f"[sharding] {args.tensor_parallelism_size} ranks in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
