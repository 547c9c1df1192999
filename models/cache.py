"""The artifact cache root (~/.cache/aotllm, or $AOTLLM_CACHE) and the lock that guards filling it.

Torch-free: the server imports this.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path


def cache_dir() -> Path:
    root = Path(os.environ.get("AOTLLM_CACHE", Path.home() / ".cache" / "aotllm"))
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextlib.contextmanager
def cache_lock(path: Path):
    """Hold an exclusive lock on `path`.lock while filling `path` in the cache, so that two processes
    (two servers starting, a test session and its background build) never write the same files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield
