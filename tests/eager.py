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


def one_pass(model: PagedLlama, tokens: list[int]) -> tuple:
    """`tokens` as one unbatched call over contiguous pages 1.. (padded to whole pages), with a fresh cache:
    (tokens, start_positions, seq_lens, page_ids, cache) for PagedLlama's prefill, score or hidden_states."""
    s = model.block_seq_stride
    pages = list(range(1, 1 + -(-len(tokens) // s)))
    return (
        torch.tensor([padded(tokens, s)]),
        torch.tensor([0]),
        torch.tensor([len(tokens)]),
        torch.tensor([pages]),
        model.allocate_cache(len(pages) + 1),
    )


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


def program_vs_eager(
    runner, model: PagedLlama, cache, lens: list[int], pages: np.ndarray, split: int, steps: int, seed: int = 3
) -> tuple[float, float]:
    """Two prompts of `lens` tokens (random ids < 128) prefilled as one ragged batch in two chunks (split at
    `split`) over the page rows `pages` [2, P], then `steps` decode steps at batch 4 (two padding rows) and
    one at batch 1, through a serve.core.runner.Runner and the eager model (`cache`, its pages); then two mixed
    steps (`mixed`: both sequences' next token, a padding row between, and a third prompt's two chunks over
    pages no row uses, the second step with one decode row) and a `score` of three positions at once ->
    (largest |program - eager| logit difference, largest |eager logit|)."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in lens]
    end = max(lens)
    worst, scale = 0.0, 0.0

    def compare(got: np.ndarray, want: torch.Tensor) -> None:
        nonlocal worst, scale
        assert np.isfinite(got).all()
        worst, scale = max(worst, float(np.abs(got - want.numpy()).max())), max(scale, float(want.abs().max()))

    with torch.no_grad():
        for first, last in [(0, split), (split, end)]:
            chunk = np.array([(p + [0] * end)[first:last] for p in prompts])
            args = (chunk, np.full(2, first), np.minimum(np.array(lens), last), pages)
            compare(runner.prefill(*args), model.prefill(*(torch.tensor(a) for a in args), cache))
        zeros = np.zeros(pages.shape[1], np.int64)
        dpages = np.stack([pages[0], zeros, pages[1], zeros])
        for step in range(steps):
            toks = np.array([5 + step, 0, 17 + step, 0])
            dlens = np.array([lens[0] + 1 + step, 0, lens[1] + 1 + step, 0])
            got = runner.decode(toks, dlens, dpages).logits
            want = model.decode(torch.tensor(toks).view(-1, 1), torch.tensor(dlens), torch.tensor(dpages), cache)
            compare(got[[0, 2]], want[[0, 2]])
        toks, dlens = np.array([9]), np.array([lens[1] + steps + 1])
        got = runner.decode(toks, dlens, pages[1:]).logits
        compare(got, model.decode(torch.tensor(toks).view(-1, 1), torch.tensor(dlens), torch.tensor(pages[1:]), cache))

        stride = runner.abi.block_seq_stride
        third = torch.randint(0, 128, (2 * stride + 3,), generator=g).tolist()
        free = sorted(set(range(1, runner.page_count)) - set(pages.flatten().tolist()))
        assert len(free) >= 3, "the mixed step's prompt needs 3 pages that no row uses"
        tpages = np.array([free[-3:][::-1]])  # (scattered: descending)
        seq_lens = [lens[0] + steps + 1, lens[1] + steps + 2]
        for dec_rows, (first, last) in [([0, None, 1], (0, stride + 1)), ([1], (stride + 1, len(third)))]:
            dtoks = np.array([0 if r is None else 30 + r for r in dec_rows])
            dl = np.array([0 if r is None else seq_lens[r] for r in dec_rows])
            dp = np.stack([zeros if r is None else pages[r] for r in dec_rows])
            args = (dtoks, dl, dp, np.array([third[first:last]]), np.array([first]), np.array([last]), tpages)
            got = runner.mixed(*args)
            want = model.mixed(torch.tensor(dtoks).view(-1, 1), *(torch.tensor(a) for a in args[1:]), cache)
            live = [i for i, r in enumerate(dec_rows) if r is not None] + [len(dec_rows)]
            compare(got[live], want[live])
            for r in dec_rows:
                if r is not None:
                    seq_lens[r] += 1
        # three positions of sequence 0 at once, as a speculative step verifies a draft
        start = seq_lens[0] - 1
        args = (np.array([[7, 8, 9]]), np.array([start]), np.array([start + 3]), pages[:1])
        compare(runner.score(*args)[0], model.score(*(torch.tensor(a) for a in args), cache)[0])
    return worst, scale
