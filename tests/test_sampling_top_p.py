"""Top-p without sorting the vocabulary: bit for bit the probabilities of the full stable sort it replaced."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spectrt.runtime.sampling import SamplingParams, probs_from_logits


def reference_probs_from_logits(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The former implementation (a stable argsort of every row), kept as the definition of the result."""
    scores = logits.astype(np.float64) / params.temperature  # [N, V]
    vocab = scores.shape[-1]
    if 0 < params.top_k < vocab:
        kth = np.partition(scores, vocab - params.top_k, axis=-1)[:, vocab - params.top_k][:, None]  # [N, 1]
        scores = np.where(scores < kth, -np.inf, scores)
    scores -= scores.max(axis=-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(axis=-1, keepdims=True)
    if params.top_p < 1.0:
        order = np.argsort(-probs, axis=-1, kind="stable")  # [N, V]
        sorted_probs = np.take_along_axis(probs, order, axis=-1)
        keep_sorted = (np.cumsum(sorted_probs, axis=-1) - sorted_probs) < params.top_p
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum(axis=-1, keepdims=True)
    return probs


def assert_bit_identical(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    expected = reference_probs_from_logits(logits, params)
    got = probs_from_logits(logits, params)
    assert got.dtype == np.float64 and got.shape == expected.shape
    assert np.array_equal(got.view(np.int64), expected.view(np.int64))
    return got


def make_logits(rng: np.random.Generator, kind: str, rows: int, vocab: int, scale: float) -> np.ndarray:
    if kind == "normal":  # from flat (small scale) to peaked (large scale)
        logits = rng.standard_normal((rows, vocab)) * scale
    elif kind == "peaked":  # a few strong tokens over a noisy floor, like a language model's
        logits = rng.standard_normal((rows, vocab)) * 2.0
        for row in logits:
            strong = rng.choice(vocab, min(vocab, 20), replace=False)
            row[strong] += rng.uniform(0.0, 3.0 * scale, len(strong))
    elif kind == "ties":  # few distinct values: many equal probabilities, also at the nucleus boundary
        logits = rng.integers(0, 4, (rows, vocab)) * (scale / 4)
    elif kind == "tied_top":  # a block of equal top tokens, spread over the vocabulary
        logits = rng.standard_normal((rows, vocab))
        for row in logits:
            row[rng.choice(vocab, min(vocab, 50), replace=False)] = 6.0
    else:  # "masked": a constraint's -inf over most of the vocabulary
        logits = rng.standard_normal((rows, vocab)) * scale
        logits[rng.random((rows, vocab)) < 0.9] = -np.inf
        logits[:, 0] = 0.0
    return logits.astype(np.float32)


def boundary_top_p(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> float:
    """A top_p on (or one ulp beside) the exact mass before some sorted position of row 0: where '<' decides."""
    probs = reference_probs_from_logits(logits[:1], SamplingParams(params.temperature, params.top_k))[0]
    sorted_probs = np.sort(probs)[::-1]
    before = np.cumsum(sorted_probs) - sorted_probs
    value = float(before[rng.integers(1, min(len(before), 400))])
    value = [value, np.nextafter(value, 0.0), np.nextafter(value, 2.0)][rng.integers(0, 3)]
    return value if 0.0 < value < 1.0 else 0.5


@given(seed=st.integers(0, 2**32 - 1), kind=st.sampled_from(["normal", "peaked", "ties", "tied_top", "masked"]),
       rows=st.integers(1, 9), vocab=st.sampled_from([7, 256, 300, 1000, 4096, 20000]),
       scale=st.sampled_from([0.05, 0.5, 1.0, 3.0, 8.0, 30.0]), temperature=st.sampled_from([0.3, 0.8, 1.0, 1.7]),
       top_k=st.sampled_from([0, 0, 1, 5, 50, 100, 3000]),
       top_p=st.one_of(st.sampled_from([0.1, 0.5, 0.9, 0.95, 0.99, 0.999999, 1.0 - 1e-13, "boundary"]),
                       st.floats(1e-6, 1.0, exclude_max=True)))
@settings(max_examples=1000, deadline=None)
def test_top_p_is_bit_identical_to_the_full_sort(seed, kind, rows, vocab, scale, temperature, top_k, top_p):
    rng = np.random.default_rng(seed)
    logits = make_logits(rng, kind, rows, vocab, scale)
    if top_p == "boundary":
        top_p = boundary_top_p(logits, SamplingParams(temperature, top_k), rng)
    assert_bit_identical(logits, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p))


@pytest.mark.parametrize("kind,scale", [("peaked", 5.0), ("normal", 3.0), ("normal", 1.0), ("ties", 8.0)])
@pytest.mark.parametrize("top_k", [0, 40])
def test_top_p_is_bit_identical_at_qwen_vocabulary(kind, scale, top_k):
    logits = make_logits(np.random.default_rng(7), kind, 2, 151936, scale)
    for top_p in (0.5, 0.9, 0.95):
        assert_bit_identical(logits, SamplingParams(temperature=0.8, top_k=top_k, top_p=top_p))


def test_equal_probabilities_are_kept_in_order_of_index():
    logits = np.zeros((1, 1000), np.float32)  # every token 1/1000
    probs = assert_bit_identical(logits, SamplingParams(temperature=1.0, top_p=0.0105))
    assert np.flatnonzero(probs[0]).tolist() == list(range(11))  # mass before token 10 is 0.010 < 0.0105
    logits[0, [900, 3, 500]] = 2.0  # three equal top tokens, far apart
    probs = assert_bit_identical(logits, SamplingParams(temperature=1.0, top_p=0.01))
    assert np.flatnonzero(probs[0]).tolist() == [3, 500]


def _sorted_sizes_while(monkeypatch, logits, params):
    """(probs_from_logits output, the length of every array np.argsort sorted during the call)."""
    sizes = []
    argsort = np.argsort

    def recording_argsort(a, *args, **kwargs):
        sizes.append(np.shape(a)[-1])
        return argsort(a, *args, **kwargs)

    monkeypatch.setattr(np, "argsort", recording_argsort)
    got = probs_from_logits(logits, params)
    monkeypatch.undo()
    return got, sizes


def test_peaked_rows_sort_only_a_few_candidates(monkeypatch):
    logits = make_logits(np.random.default_rng(3), "peaked", 9, 151936, 5.0)
    params = SamplingParams(temperature=0.8, top_p=0.9)
    expected = reference_probs_from_logits(logits, params)
    got, sizes = _sorted_sizes_while(monkeypatch, logits, params)
    assert np.array_equal(got, expected)
    assert sizes and max(sizes) <= 1000


def test_wide_nucleus_sorts_about_the_nucleus_not_the_vocabulary(monkeypatch):
    logits = make_logits(np.random.default_rng(4), "normal", 1, 151936, 3.0)  # nucleus of about a thousand
    params = SamplingParams(temperature=0.8, top_p=0.9)
    expected = reference_probs_from_logits(logits, params)
    got, sizes = _sorted_sizes_while(monkeypatch, logits, params)
    assert np.array_equal(got.view(np.int64), expected.view(np.int64))
    assert 100 < np.count_nonzero(got) <= max(sizes) < 3 * np.count_nonzero(got)  # no full sort
