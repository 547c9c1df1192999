"""Tensor-parallel parameter sharding: unsharded weights -> `model.irpa` (what every rank shares: embedding,
final norm, output head, the config) + `model.rank{r}.irpa` (rank r's slices, see models.tp).

Splits (GGUF/[out, in] layout): attn_q / attn_k / attn_v rows by whole heads, ffn_gate / ffn_up rows by
FFN columns ("column-parallel"); attn_output and ffn_down columns to match ("row-parallel", their
outputs are partial sums); attn_norm / ffn_norm copied to every rank. The embedding and the head stay
whole on device 0 (not measured against a vocabulary split: on one CPU the local-task devices share the
same cores, so a timing here measures contention, not the layout).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from models.tp import shard_config
from models.weights import ModelWeights, rank_paths, write_irpa


def shard_tensors(weights: ModelWeights, tp: int) -> ModelWeights:
    """Unsharded weights -> the same model under tensor-parallel names (`rank.{r}.blk.{i}.*`)."""
    if weights.tp != 1:
        raise ValueError(f"{weights.source} is already sharded {weights.tp} ways")
    c, rc = weights.config, shard_config(weights.config, tp)
    rows = {
        "attn_q.weight": rc.num_heads * c.head_dim,
        "attn_k.weight": rc.num_kv_heads * c.head_dim,
        "attn_v.weight": rc.num_kv_heads * c.head_dim,
        "ffn_gate.weight": rc.intermediate_size,
        "ffn_up.weight": rc.intermediate_size,
    }
    cols = {"attn_output.weight": rc.num_heads * c.head_dim, "ffn_down.weight": rc.intermediate_size}
    out = {}
    for name, t in weights.tensors.items():
        if not name.startswith("blk."):
            out[name] = t
            continue
        _, layer, kind = name.split(".", 2)
        for r in range(tp):
            if kind in rows:
                piece = t[r * rows[kind] : (r + 1) * rows[kind]]
            elif kind in cols:
                piece = t[:, r * cols[kind] : (r + 1) * cols[kind]]
            else:
                piece = t
            out[f"rank.{r}.blk.{layer}.{kind}"] = np.ascontiguousarray(piece)
    sharded = ModelWeights(c, out, weights.source, tp)
    sharded.validate()
    return sharded


def write_sharded(weights: ModelWeights, path: Path) -> list[Path]:
    """Tensor-parallel weights -> `path` (shared tensors + config) and its rank files; returns all paths."""
    tp, path = weights.tp, Path(path)
    extra = {"tensor_parallelism_size": tp}
    shared = {k: v for k, v in weights.tensors.items() if not k.startswith("rank.")}
    write_irpa(ModelWeights(weights.config, shared, weights.source), path, extra)
    ranks = rank_paths(path, tp)
    for r, rank_path in enumerate(ranks):
        prefix = f"rank.{r}."
        mine = {k: v for k, v in weights.tensors.items() if k.startswith(prefix)}
        write_irpa(ModelWeights(weights.config, mine, weights.source), rank_path, {**extra, "rank": r})
    return [path, *ranks]
