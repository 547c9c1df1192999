"""Prompt-lookup drafts for speculative decoding: no second model, only the sequence's own tokens.

The last n tokens (n from `max_ngram` down to `min_ngram`) are looked up in the prompt and output so far;
the tokens that followed an earlier occurrence (the most recent one that has k tokens after it) are the
draft. Input-grounded work (repeat,
quote, edit or summarise a given text or code) finds long drafts; free-form text rarely finds any, and a
step without a draft is an ordinary decode step. The scheduler verifies a draft with one `score` call
(every drafted position's logits) and keeps what the sampler accepts (Sampler.sample_draft).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


@dataclass(frozen=True)
class SpecConfig:
    """`--speculative ngram --num-speculative-tokens K`."""

    num_tokens: int = 4  # K: drafted tokens per step at most
    max_ngram: int = 4
    min_ngram: int = 2  # (a single matching token drafts too often on free text: a verify costs more than a step)
    max_batch: int = 4  # steps that decode more sequences than this do not speculate (the batch fills the cores)


def propose(tokens: np.ndarray, k: int, max_ngram: int = 4, min_ngram: int = 2) -> list[int]:
    """Up to k draft tokens continuing `tokens` [L] (int), or [] when no n-gram of the suffix recurs."""
    n_tokens = len(tokens)
    for n in range(min(max_ngram, n_tokens - 1), min_ngram - 1, -1):
        # earlier windows only (the suffix itself excluded) that have at least one token after them
        windows = sliding_window_view(tokens[: n_tokens - 1], n)
        hits = np.flatnonzero((windows == tokens[n_tokens - n :]).all(axis=1))
        if hits.size:
            # The most recent occurrence with k tokens after it (recent text is the likeliest to repeat);
            # failing that the earliest, which has the most (a short period, "a b a b", ends near the suffix).
            full = hits[hits + n + k <= n_tokens]
            start = int(full[-1] if full.size else hits[0]) + n
            return tokens[start : start + k].tolist()
    return []
