"""Helpers that drive the eager paged model the way the server drives the compiled one (and the compiled
one, through serve.core.runner, the same way)."""

from __future__ import annotations

import numpy as np
import torch

from models.llama import PagedLlama


def pages_for(n_tokens: int, stride: int, pool: list[int]) -> list[int]:
    n = -(-n_tokens // stride)
    return [pool.pop() for _ in range(n)]


def padded(tokens: list[int], stride: int, extra: int = 0) -> list[int]:
    n = -(-(len(tokens) + extra) // stride) * stride
    return tokens + [0] * (n - len(tokens))


@torch.no_grad()
def greedy(model: PagedLlama, prompt: list[int], n_new: int, page_ids: list[int] | None = None) -> list[int]:
    """Greedy decoding through the paged cache: one prefill, then decode steps."""
    s = model.block_seq_stride
    total = len(prompt) + n_new
    pages = page_ids or list(range(1, 1 + -(-total // s)))
    cache = model.allocate_cache(max(pages) + 1)
    page_t = torch.tensor([pages])
    logits = model.prefill(
        torch.tensor([padded(prompt, s)]), torch.tensor([0]), torch.tensor([len(prompt)]), page_t, cache
    )
    out = [int(logits[0].argmax())]
    while len(out) < n_new:
        seq_len = len(prompt) + len(out)
        logits = model.decode(torch.tensor([[out[-1]]]), torch.tensor([seq_len]), page_t, cache)
        out.append(int(logits[0].argmax()))
    return out


def compiled_greedy(runner, prompt: list[int], n_new: int, pages: np.ndarray) -> list[int]:
    """`greedy` through a serve.core.runner.Runner: one prefill, then decode steps, on the given page table."""
    s = runner.abi.block_seq_stride
    logits = runner.prefill(np.array([padded(prompt, s)]), np.array([0]), np.array([len(prompt)]), pages)
    out = [int(logits[0].argmax())]
    while len(out) < n_new:
        logits = runner.decode(np.array([out[-1]]), np.array([len(prompt) + len(out)]), pages).logits
        out.append(int(logits[0].argmax()))
    return out
