"""This machine's memory bandwidth, measured with numpy (the roofline of a memory-bound decode step).

    measure(size_mib=1024)  ->  Bandwidth(read_gb_s, method, methods={name: GB/s})

Each method streams an array far larger than the caches, best of `repeats` timings, on one thread per
core (numpy releases the GIL in these loops, so the threads really run in parallel):
  read-or    bitwise-OR reduction over uint64 slices (bytes read / time)
  read-sum   float32 sum over slices (bytes read / time)
  read-gemv  float32 matrix @ vector through numpy's BLAS: the access pattern of a decode step
  copy       np.copyto of slices, counted as bytes read + bytes written (reported, not the roofline)
`read_gb_s` is the best read method: a generous roofline, so the ratio against it is not flattering.
GB here are 10^9 bytes.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

READ_METHODS = ("read-or", "read-sum", "read-gemv")


@dataclass
class Bandwidth:
    read_gb_s: float
    method: str
    size_mib: int
    threads: int
    methods: dict[str, float] = field(default_factory=dict)


def cpu_count() -> int:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _best(fn: Callable[[], object], repeats: int) -> float:
    fn()  # first touch / warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _parallel(work: Callable[[int], object], threads: int) -> Callable[[], None]:
    def run() -> None:
        if threads == 1:
            work(0)
            return
        ts = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    return run


def measure(size_mib: int = 1024, repeats: int = 5, threads: int | None = None) -> Bandwidth:
    threads = threads or cpu_count()
    nbytes = size_mib << 20
    a = np.ones(nbytes // 8, dtype=np.uint64)
    words = np.array_split(a, threads)
    f32 = a.view(np.float32)
    floats = np.array_split(f32, threads)
    out: dict[str, float] = {}
    out["read-or"] = nbytes / _best(_parallel(lambda i: np.bitwise_or.reduce(words[i]), threads), repeats)
    out["read-sum"] = nbytes / _best(_parallel(lambda i: floats[i].sum(), threads), repeats)
    cols = 4096
    matrix = f32[: (f32.size // cols) * cols].reshape(-1, cols)
    vec = np.ones(cols, dtype=np.float32)
    out["read-gemv"] = matrix.nbytes / _best(lambda: matrix @ vec, repeats)
    dst = np.empty_like(a)
    dsts = np.array_split(dst, threads)
    out["copy"] = 2 * nbytes / _best(_parallel(lambda i: np.copyto(dsts[i], words[i]), threads), repeats)
    del a, dst
    gb = {k: v / 1e9 for k, v in out.items()}
    method = max(READ_METHODS, key=lambda k: gb[k])
    return Bandwidth(read_gb_s=gb[method], method=method, size_mib=size_mib, threads=threads, methods=gb)


if __name__ == "__main__":
    bw = measure()
    print(
        f"read {bw.read_gb_s:.1f} GB/s ({bw.method}, {bw.threads} threads, {bw.size_mib} MiB); "
        + ", ".join(f"{k} {v:.1f}" for k, v in bw.methods.items())
    )
