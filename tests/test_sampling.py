"""serve/sampling.py: greedy, seeded sampling, filters, penalties, logit_bias, logprobs, validation."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest

from serve.core.sampling import Sampler, SamplingParams

V = 49152


def rows(n: int, vocab: int = V, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((n, vocab)) * 3).astype(np.float32)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x - (x.max() + np.log(np.exp(x - x.max()).sum()))


def draws(params: SamplingParams, logits: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    s = Sampler(params, [], seed=seed)
    return np.array([s.sample(logits).token_id for _ in range(n)])


def test_greedy_is_argmax_and_ties_take_lowest_id():
    s = Sampler(SamplingParams(temperature=0.0), [1, 2, 3])
    for row in rows(4):
        assert s.sample(row).token_id == int(np.argmax(row))
    tied = np.zeros(10, np.float32)
    tied[[7, 3, 5]] = 2.0
    assert s.sample(tied).token_id == 3
    assert s.sample_top_k(np.array([2.0, 2.0, 1.0], np.float32), np.array([7, 3, 5])).token_id == 3


def test_no_penalties_means_no_copy():
    row = rows(1)[0]
    assert Sampler(SamplingParams(temperature=0.0), [1, 2]).apply_penalties(row) is row


def test_seeded_sampling_is_reproducible_whatever_else_is_in_the_batch():
    params = SamplingParams(temperature=0.9, top_k=50, top_p=0.95, seed=1234)
    logits = rows(20, seed=1)
    a, b = Sampler(params, [5]), Sampler(params, [5])
    others = [Sampler(SamplingParams(temperature=1.0), []) for _ in range(3)]  # os.urandom seeds
    seq_a = []
    for row in logits:  # a runs alongside others, as in a batch
        seq_a.append(a.sample(row).token_id)
        for o in others:
            o.sample(row)
    seq_b = [b.sample(row).token_id for row in logits]  # b alone, later
    assert seq_a == seq_b
    c = Sampler(params, [5], seed=99)  # an explicit seed overrides params.seed
    assert [c.sample(row).token_id for row in logits] != seq_a


def test_top_k_1_and_tiny_top_p_are_greedy():
    for i, row in enumerate(rows(5, seed=2)):
        best = int(np.argmax(row))
        assert Sampler(SamplingParams(temperature=1.5, top_k=1), [], seed=i).sample(row).token_id == best
        assert Sampler(SamplingParams(temperature=1.5, top_p=1e-6), [], seed=i).sample(row).token_id == best


def test_filters_keep_the_right_tokens():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    assert set(draws(SamplingParams(min_p=0.2), logits, 400)) == {0, 1, 2}  # prob >= 0.1
    assert set(draws(SamplingParams(min_p=0.7), logits, 100)) == {0}  # prob >= 0.35
    assert set(draws(SamplingParams(top_k=2), logits, 400)) == {0, 1}
    out = draws(SamplingParams(top_p=0.7), logits, 2000)  # 0.5 + 0.3 reaches 0.7: {0, 1}, renormalised
    assert set(out) == {0, 1}
    assert abs((out == 0).mean() - 0.625) < 0.04


@pytest.mark.parametrize("temperature, p1", [(1.0, 0.75), (2.0, math.sqrt(3) / (1 + math.sqrt(3)))])
def test_distribution(temperature, p1):
    out = draws(SamplingParams(temperature=temperature), np.array([0.0, math.log(3)], np.float32), 2000, seed=7)
    assert abs(out.mean() - p1) < 0.03


def test_penalties_follow_the_formulas():
    params = SamplingParams(
        temperature=0.0,
        repetition_penalty=2.0,
        presence_penalty=0.5,
        frequency_penalty=0.25,
        logit_bias={0: 1.0, 5: -1.5},
    )
    s = Sampler(params, prompt_ids=[0, 1])
    for tok in (2, 2, 4):  # generated history: 2 twice, 4 once
        forced = np.zeros(6, np.float32)
        forced[tok] = 100.0
        assert s.sample(forced).token_id == tok
    x = np.array([1.0, -1.0, 2.0, 0.5, -3.0, 4.0], np.float32)
    expected = [
        (1.0 + 1.0) / 2,  # bias first, then seen in the prompt and positive: divided
        -1.0 * 2,  # seen in the prompt, negative: multiplied
        2.0 / 2 - (2 * 0.25 + 0.5),  # generated twice: repetition, then frequency * 2 + presence
        0.5,  # never seen
        -3.0 * 2 - (1 * 0.25 + 0.5),  # generated once
        4.0 - 1.5,  # bias only
    ]
    np.testing.assert_allclose(s.apply_penalties(x), expected, rtol=1e-6)
    perm = np.array([4, 0, 5, 2])  # the same on a top-k subset, in any order
    np.testing.assert_allclose(s.apply_penalties(x[perm], perm), np.array(expected)[perm], rtol=1e-6)
    np.testing.assert_array_equal(x, [1.0, -1.0, 2.0, 0.5, -3.0, 4.0])  # the input is left alone


def test_logit_bias_bans_and_forces():
    logits = np.zeros(10, np.float32)
    assert 3 not in set(draws(SamplingParams(logit_bias={3: -100.0}), logits, 1000))
    assert set(draws(SamplingParams(logit_bias={7: 100.0}), logits, 200)) == {7}
    assert set(draws(SamplingParams(temperature=0.0, logit_bias={7: 100.0}), logits, 3)) == {7}


def test_logprobs_are_of_the_raw_distribution():
    row = rows(1, seed=3)[0]
    params = SamplingParams(temperature=0.7, repetition_penalty=1.3, logit_bias={5: 4.0}, logprobs=5)
    out = Sampler(params, [1, 2, 3], seed=0).sample(row)
    ref = log_softmax(row)
    assert out.logprob == pytest.approx(ref[out.token_id], abs=1e-6)
    top_ids = np.argsort(-ref)[:5]
    assert [t for t, _ in out.top_logprobs] == top_ids.tolist()
    assert [lp for _, lp in out.top_logprobs] == pytest.approx(ref[top_ids].tolist(), abs=1e-6)
    assert all(a[1] >= b[1] for a, b in zip(out.top_logprobs, out.top_logprobs[1:]))
    only = Sampler(SamplingParams(temperature=0.0, logprobs=0), []).sample(row)
    assert only.top_logprobs == [] and only.logprob == pytest.approx(ref.max(), abs=1e-6)
    none = Sampler(SamplingParams(temperature=0.0), []).sample(row)
    assert none.logprob is None and none.top_logprobs is None


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.8, top_p=0.9, repetition_penalty=1.2, logprobs=3),
        SamplingParams(temperature=1.0, top_k=10, min_p=0.05, frequency_penalty=0.5),
        SamplingParams(temperature=0.0, presence_penalty=1.0),
    ],
)
def test_top_k_matches_full_row_when_k_covers_the_mass(params):
    rng = np.random.default_rng(5)
    full_rows, tops = [], []
    for _ in range(60):
        row = np.full(1000, -60.0, np.float32)  # outside the top 32: ~1e-26 of the mass
        idx = rng.choice(1000, 32, replace=False)
        row[idx] = rng.standard_normal(32) * 2
        full_rows.append(row)
        tops.append((row[idx], idx))  # the device's order: not sorted by id
    full, topk = Sampler(params, [1, 2, 3], seed=11), Sampler(params, [1, 2, 3], seed=11)
    for row, (values, idx) in zip(full_rows, tops):
        a, b = full.sample(row), topk.sample_top_k(values, idx)
        assert a.token_id == b.token_id
        if params.logprobs is not None:
            assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
            assert [t for t, _ in a.top_logprobs] == [t for t, _ in b.top_logprobs]


@pytest.mark.parametrize(
    "params, prompt",
    [
        (SamplingParams(temperature=0.8, top_k=40, top_p=0.9, min_p=0.01, repetition_penalty=1.1), range(500)),
        (SamplingParams(temperature=0.8), []),
        (SamplingParams(temperature=1.0, top_k=50), []),
        (SamplingParams(temperature=1.0, min_p=0.05), []),
        (SamplingParams(temperature=0.7, top_p=0.8, logprobs=5), []),
        (SamplingParams(temperature=0.0, logprobs=5), []),
    ],
)
def test_full_vocab_sampling_never_sorts_the_vocabulary(monkeypatch, params, prompt):
    """The promise in the sampling module's docstring: over a full row nothing is sorted in the usual cases.
    Every sort, argsort, partition, argpartition and cumsum the Sampler calls sees at most V / BLOCK values
    (the block maxima, or the candidates that survive the filters), never the V logits. (The time this
    saves: `python -m bench.sampling`.)"""
    block = sys.modules[Sampler.__module__].BLOCK
    sizes: dict[str, list[int]] = {}

    def counting(name, fn):
        def counted(a, *args, **kwargs):
            sizes.setdefault(name, []).append(np.size(a))
            return fn(a, *args, **kwargs)

        return counted

    for name in ("sort", "argsort", "partition", "argpartition", "cumsum"):
        monkeypatch.setattr(np, name, counting(name, getattr(np, name)))
    s = Sampler(params, list(prompt), seed=0)
    for row in rows(8, seed=4):
        s.sample(row)
    assert sizes  # (the counting sees the sampler's calls)
    assert max(max(v) for v in sizes.values()) <= V // block, sizes


def test_validate_accepts_defaults():
    SamplingParams().validate(V)
    SamplingParams(
        temperature=0,
        top_k=-1,
        top_p=0.5,
        min_p=1.0,
        logit_bias={0: -100, V - 1: 100},
        stop=["a"] * 16,
        stop_token_ids=[0, 2],
        n=16,
        logprobs=20,
        seed=-3,
    ).validate(V)


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("max_tokens", 0, "[1, 1000000]"),
        ("temperature", -0.5, "[0, 100]"),
        ("temperature", float("nan"), "[0, 100]"),
        ("top_p", 0.0, "(0, 1]"),
        ("min_p", 1.5, "[0, 1]"),
        ("top_k", -2, f"[-1, {V}]"),
        ("top_k", V + 1, f"[-1, {V}]"),
        ("repetition_penalty", 0.0, "> 0"),
        ("presence_penalty", 2.5, "[-2, 2]"),
        ("frequency_penalty", -3.0, "[-2, 2]"),
        ("logit_bias", {V: 1.0}, f"[0, {V})"),
        ("logit_bias", {5: 101.0}, "[-100, 100]"),
        ("n", 17, "[1, 16]"),
        ("stop", ["x"] * 17, "at most 16"),
        ("stop", [""], "non-empty"),
        ("logprobs", 21, "[0, 20]"),
        ("stop_token_ids", [-1], f"[0, {V})"),
    ],
)
def test_validate_names_the_field_and_range(field, value, words):
    with pytest.raises(ValueError) as err:
        SamplingParams(**{field: value}).validate(V)
    assert field in str(err.value) and words in str(err.value)


# chi-square critical values at p = 0.001 by degrees of freedom
CHI2_999 = {2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 7: 24.32}


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7, top_k=4),
        SamplingParams(temperature=1.3, top_p=0.8),
        SamplingParams(temperature=1.0, min_p=0.1, repetition_penalty=1.3),
    ],
    ids=["plain", "top_k", "top_p", "min_p+penalty"],
)
@pytest.mark.parametrize("draft", [0, 3, 7])  # the likeliest token, a middling one, one the filters may drop
def test_speculative_sampling_keeps_the_distribution(params, draft):
    """sample_draft's accept-or-resample rule gives each token the probability `sample` gives it (chi-square
    over 8 tokens, 6000 draws each), whichever token is drafted; and it accepts the draft at rate p(draft)."""
    logits = np.log(np.array([0.3, 0.2, 0.15, 0.12, 0.1, 0.06, 0.04, 0.03], np.float32))
    plain = draws(params, logits, 6000, seed=1)
    s = Sampler(params, [2, 5], seed=2)
    spec, accepted = zip(*((t.token_id, ok) for t, ok in (s.sample_draft(logits, draft) for _ in range(6000))))
    want = np.bincount(plain, minlength=8) / 6000
    got = np.bincount(spec, minlength=8)
    ok = want > 0
    assert set(np.flatnonzero(got)) <= set(np.flatnonzero(ok))  # nothing the filters drop
    expected = want[ok] * 6000
    chi2 = float((((got[ok] - expected) ** 2) / expected).sum())
    assert chi2 < CHI2_999[int(ok.sum()) - 1] * 2  # (both sides are samples: twice the one-sample bound)
    assert abs(np.mean(accepted) - want[draft]) < 0.03


def test_greedy_draft_is_the_argmax():
    logits = np.array([0.1, 2.0, 0.5], np.float32)
    s = Sampler(SamplingParams(temperature=0.0), [])
    assert s.sample_draft(logits, 1) == (s.sample(logits), True)
    t, ok = s.sample_draft(logits, 2)
    assert (t.token_id, ok) == (1, False)
