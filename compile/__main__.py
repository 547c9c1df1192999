"""python -m compile OUT/model.mlir --target llvm-cpu|hip|cuda [--arch A] [--devices N] -o OUT/model.vmfb"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from . import TARGETS, CompileError, CompileRequest, command, compile_mlir


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m compile", description=__doc__)
    p.add_argument("mlir", type=Path)
    p.add_argument("--target", choices=TARGETS, default="llvm-cpu")
    p.add_argument("--arch", help="llvm-cpu: host (default) or a CPU name; hip: gfx942...; cuda: sm_80...")
    p.add_argument("--devices", type=int, default=1, help="compile for N devices (tensor parallelism)")
    p.add_argument("-o", "--output", type=Path, help="default: next to the MLIR, model_{target}.vmfb")
    p.add_argument("--print-command", action="store_true", help="print the iree-compile line and exit")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument(
        "--iree-flag", action="append", default=[], dest="extra", help="an extra flag for iree-compile (repeatable)"
    )
    args = p.parse_args(argv)
    output = args.output or args.mlir.with_name(f"model_{args.target}.vmfb")
    req = CompileRequest(args.mlir, args.target, args.arch, args.devices, args.extra)
    try:
        if args.print_command:
            print(shlex.join(command(req, output)))
            return 0
        compile_mlir(req, output, use_cache=not args.no_cache)
    except CompileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
