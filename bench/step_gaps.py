"""python -m bench.step_gaps SERVER.log: the gaps between a decoding stream's tokens, measured in the server.

Reads the scheduler's per-step lines (`python -m serve --log-level debug`: "step end=... ms=... decoding=N
..."). A stream that decodes in two consecutive steps waits the time between their ends for its next token,
so each step's gap counts once per stream it decoded. Where the client's gaps between streamed chunks do not
show the scheduler's (a random-weight model's text, held back while its bytes are not yet valid UTF-8, or
several speculative tokens in one chunk), these do.
"""

from __future__ import annotations

import argparse
import re

import numpy as np

STEP = re.compile(r"step end=([\d.]+) ms=[\d.]+ decoding=(\d+) drafted=(\d+) prefill=(\d+)")


def gaps(lines: list[str]) -> np.ndarray:
    """Token gaps in ms, one per decoding stream of each step that follows a step that also decoded."""
    steps = [(float(m[1]), int(m[2])) for m in map(STEP.search, lines) if m]
    out: list[float] = []
    for (prev_end, prev_dec), (end, dec) in zip(steps, steps[1:]):
        if prev_dec and dec:
            out += [(end - prev_end) * 1e3] * dec
    return np.array(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.step_gaps", description=__doc__.split("\n\n")[0])
    p.add_argument("log", help="a `python -m serve --log-level debug` log")
    args = p.parse_args(argv)
    with open(args.log, errors="replace") as f:
        g = gaps(f.readlines())
    if not g.size:
        raise SystemExit(f"{args.log}: no consecutive decoding steps (was the server run with --log-level debug?)")
    med, p99 = np.median(g), np.percentile(g, 99)
    print(f"token gaps (server): n={g.size} median {med:.1f} ms, p99 {p99:.1f} ms, p99 / median {p99 / med:.2f}")


if __name__ == "__main__":
    main()
