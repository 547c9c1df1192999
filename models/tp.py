"""Tensor parallelism, model side: each rank's slice of the config, and the device transfers.

Megatron-style: rank r holds query heads [r*H/N, (r+1)*H/N) and the KV heads they use, a column slice of
gate/up and the matching row slices of the attention output and down projections, plus its own copy of
the norms; its KV-cache slab holds its KV heads. Sublayer outputs are partial sums, all-reduced across
the ranks. Ranks map to IREE logical devices `__device_{r}` (compile for local[0..N-1] / hip[0..N-1]).
Eagerly (tests, the reference) a transfer is a copy, so the sharded model runs on the CPU as it is.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from .config import LlamaConfig, ModelError

if TYPE_CHECKING:  # (torch-free at import: models.weights uses this module)
    import torch


def check_tp(c: LlamaConfig, tp: int) -> None:
    """A clear error when the model's heads do not split over `tp` devices."""
    if tp < 1:
        raise ModelError(f"--tensor-parallelism-size must be >= 1, got {tp}")
    bad = [
        f"{what} {n}"
        for what, n in (
            ("attention heads", c.num_heads),
            ("KV heads", c.num_kv_heads),
            ("FFN width", c.intermediate_size),
        )
        if n % tp
    ]
    if bad:
        ok = [
            d
            for d in range(1, c.num_kv_heads + 1)
            if c.num_kv_heads % d == 0 and c.num_heads % d == 0 and c.intermediate_size % d == 0
        ]
        raise ModelError(
            f"tensor parallelism {tp} must divide the model's {', '.join(bad)} (each device takes "
            f"whole heads and its KV heads' cache); this model splits over {ok} devices"
        )


def shard_config(c: LlamaConfig, tp: int) -> LlamaConfig:
    """One rank's view: its heads, KV heads and FFN columns (hidden size, layers, vocab unchanged)."""
    check_tp(c, tp)
    return replace(
        c, num_heads=c.num_heads // tp, num_kv_heads=c.num_kv_heads // tp, intermediate_size=c.intermediate_size // tp
    )


def to_device(rank: int, t: torch.Tensor) -> torch.Tensor:
    """`t` on logical device `rank` (explicit even where it is there already: IREE folds those, and an
    implicit cross-device use is not synchronised)."""
    from iree.turbine.ops.iree import transfer_to_logical_device

    return transfer_to_logical_device(str(rank), t)


def all_reduce(parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each rank's partial sums -> the total on every rank, added in rank order everywhere (so the replicas
    of the residual stream stay bit-identical)."""
    out = []
    for r in range(len(parts)):
        total = to_device(r, parts[0])
        for p in parts[1:]:
            total = total + to_device(r, p)
        out.append(total)
    return out
