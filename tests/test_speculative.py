"""Speculative decoding (serve.core.speculative, Scheduler._verify) and the mixed step through real programs:
greedy output is the same token for token with speculation on and off, sampled output keeps its distribution,
and prompt-lookup drafts are what the sequence's own tokens imply."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from serve.core.engine import Engine
from serve.core.sampling import SamplingParams
from serve.core.speculative import SpecConfig, propose
from tests.server_util import tiny_config


def test_propose_takes_the_latest_longest_match():
    t = np.array([1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3])
    assert propose(t, 3) == [7, 8, 5]  # "2 3" last followed by 7 8 5 (the 3-gram "5 2 3" does not recur)
    assert propose(t, 6) == [9, 1, 2, 3, 7, 8]  # ... but with 6 to draft, the occurrence that has 6 after it
    assert propose(np.array([1, 2] * 4), 4) == [1, 2, 1, 2]  # a short period: the earliest occurrence
    assert propose(np.array([4, 5, 6, 4, 5]), 4) == [6, 4, 5]  # the draft may run into the suffix itself
    assert propose(np.array([1, 2, 3, 4]), 4) == []  # nothing recurs
    assert propose(np.array([1, 2, 3, 1]), 4, min_ngram=1) == [2, 3, 1]
    assert propose(np.array([1, 2, 3, 1]), 4) == []  # one matching token is not enough by default
    assert propose(np.array([7]), 2) == []


def run(engine: Engine, prompts: list[list[int]], params: list[SamplingParams], group: int = 0) -> list[list[int]]:
    """Every prompt through the engine, all at once or `group` at a time (speculation needs steps that
    prefill nothing); each one's output token ids."""

    async def collect(seq) -> list[int]:
        tokens: list[int] = []
        while True:
            event = await seq.events.get()
            tokens += event.token_ids
            if event.finish_reason:
                assert event.finish_reason in ("stop", "length"), event.error
                return tokens

    async def main() -> list[list[int]]:
        await engine.start()
        outs: list[list[int]] = []
        size = group or len(prompts)
        for k in range(0, len(prompts), size):
            seqs = [engine.submit(p, sp)[0] for p, sp in zip(prompts[k : k + size], params[k : k + size])]
            outs += await asyncio.gather(*(collect(s) for s in seqs))
        for task in engine._tasks:
            task.cancel()
        return outs

    return asyncio.run(main())


def test_sampled_distribution_is_unchanged(tiny_program):
    """Two-sample chi-squares over the tokens at output positions 1 and 2 (bins: 'a', 'b', anything else) of 800
    seeded sequences with speculation and 800 without: the same distributions. The prompt repeats "ab" and a
    logit bias makes both likely, so drafts are made, often kept (the acceptance path) and often not. One
    sequence at a time: a step that prefills does not speculate."""
    from models.tokenizer import load_tokenizer

    tokenizer, _ = load_tokenizer(tiny_program)
    prompt = tokenizer.encode("ab" * 20, add_special_tokens=False).ids
    a, b = prompt[0], prompt[1]
    n = 800
    counts: dict[int, list] = {1: [], 2: []}
    for spec in (None, SpecConfig(num_tokens=3)):
        engine = Engine(tiny_config(tiny_program, speculative=spec))
        params = [
            SamplingParams(max_tokens=4, temperature=1.0, seed=i, logit_bias={a: 6.0, b: 6.0}, ignore_eos=True)
            for i in range(n)
        ]
        outs = np.array(run(engine, [prompt] * n, params, group=1))
        for pos, table in counts.items():
            t = outs[:, pos]
            table.append([(t == a).sum(), (t == b).sum(), ((t != a) & (t != b)).sum()])
        c = engine.schedulers[0].counters
        if spec:
            assert c.accepted_tokens > 100 and c.draft_tokens - c.accepted_tokens > 100, c  # kept and rejected
        else:
            assert c.draft_tokens == 0
    for pos, rows in counts.items():
        table = np.array(rows, np.float64)
        expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
        chi2 = float(((table - expected) ** 2 / expected).sum())
        assert chi2 < 13.82, (pos, table, chi2)  # 2 degrees of freedom: p = 0.001


@pytest.mark.slow
def test_smollm2_greedy_output_equals_without_speculation(smollm2_f32_artifacts):
    """5 prompts x 256 greedy tokens through SmolLM2 (the default program) with speculation on and off, one
    sequence at a time and all five at once: the same tokens. Most prompts ask to repeat a text, so drafts are
    long and mostly kept; one is open-ended."""
    from models.tokenizer import load_tokenizer

    art = smollm2_f32_artifacts
    tokenizer, _ = load_tokenizer(art.config.parent)
    text = (
        "The paged KV cache stores keys and values in fixed-size pages; a page table maps each sequence's "
        "positions to pages, so sequences grow without copying and share their common prefixes."
    )
    code = "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n"
    asks = [
        f"Repeat this text exactly:\n{text}\nRepeated:\n",
        f"Copy this code:\n```python\n{code}```\nCopy:\n```python\n",
        f"{text}\nNow say it again, word for word:\n",
        "Here is a list: apples, pears, plums, apples, pears, plums, apples, pears,",
        "Write a short story about a lighthouse keeper.",
    ]
    prompts = [tokenizer.encode(f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n").ids for q in asks]
    params = [SamplingParams(max_tokens=256, temperature=0.0, ignore_eos=True) for _ in prompts]

    def engine(spec: SpecConfig | None) -> Engine:
        return Engine(
            tiny_config(art.config.parent, vmfb=art.vmfb, parameters=art.parameters, model_name="m", speculative=spec)
        )

    plain = run(engine(None), prompts, params)
    spec_engine = engine(SpecConfig(num_tokens=4, max_batch=8))
    together = run(spec_engine, prompts, params)
    counters = spec_engine.schedulers[0].counters
    assert counters.accepted_tokens > 256, counters  # the drafts were used
    for i, (want, got) in enumerate(zip(plain, together)):
        assert got == want, (
            f"prompt {i}: first difference at {next(j for j, (x, y) in enumerate(zip(got, want)) if x != y)}"
        )
    one_by_one = [run(engine(SpecConfig(num_tokens=4)), [p], [sp])[0] for p, sp in zip(prompts[:2], params[:2])]
    assert one_by_one == plain[:2]


def test_a_grammar_that_ends_inside_a_verified_draft(tiny_program):
    """A regex whose every token is forced, over a prompt of the same pattern, so the drafts are kept; its
    matcher wrapped to end (allow nothing more, not even the end token, as a tool-call grammar does) after n
    tokens, inside a verification. The output is those n tokens and "stop": neither cut short (the matcher,
    advanced through a step's later tokens, once ended the sequence at an earlier one) nor longer."""
    from models.tokenizer import load_tokenizer
    from serve.core.guide import Constraint

    class EndsAfter:
        def __init__(self, guide, n: int):
            self.guide, self.n, self.count = guide, n, 0

        def advance(self, token: int) -> None:
            self.guide.advance(token)
            self.count += 1

        @property
        def stopped(self) -> bool:
            return self.count >= self.n

        def __getattr__(self, name):
            return getattr(self.guide, name)

    tokenizer, _ = load_tokenizer(tiny_program)
    prompt = tokenizer.encode("ab" * 10, add_special_tokens=False).ids
    params = SamplingParams(max_tokens=40, temperature=0.0, constraint=Constraint.of("regex", "(ab){9}"))

    async def main(engine: Engine, n: int):
        await engine.start()
        (seq,) = engine.submit(prompt, params)
        seq.sampler.guide = EndsAfter(seq.sampler.guide, n)
        events = []
        while not events or not events[-1].finish_reason:
            events.append(await seq.events.get())
        return events

    for n in (12, 13, 14):  # (one of them ends inside a verification, whatever the drafts' length)
        engine = Engine(tiny_config(tiny_program, speculative=SpecConfig(num_tokens=4)))
        events = asyncio.run(main(engine, n))
        assert tokenizer.decode([t for e in events for t in e.token_ids]) == ("ab" * 9)[:n]
        assert events[-1].finish_reason == "stop"
        assert engine.schedulers[0].counters.accepted_tokens >= 6
