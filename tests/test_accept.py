"""The accept step, tested as pure functions with hand-made logits and distributions."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spectrt.runtime.accept import accept_greedy, accept_sampled
from spectrt.runtime.sampling import SamplingParams, probs_from_logits

NEG = -np.inf
V = 5


def one_hot_logits(tokens: list[int]) -> np.ndarray:
    logits = np.full((len(tokens), V), NEG, dtype=np.float32)  # [k+1, V]
    logits[np.arange(len(tokens)), tokens] = 0.0
    return logits


def test_greedy_all_accepted_gives_bonus_token():
    assert accept_greedy(np.array([1, 2, 3]), one_hot_logits([1, 2, 3, 4])) == (3, 4)


def test_greedy_first_rejected_takes_target_token():
    assert accept_greedy(np.array([1, 2, 3]), one_hot_logits([0, 2, 3, 4])) == (0, 0)


def test_greedy_middle_rejection_stops_at_first_disagreement():
    # position 2 agrees again but must not count: acceptance is a prefix
    assert accept_greedy(np.array([1, 2, 3]), one_hot_logits([1, 4, 3, 0])) == (1, 4)


def test_greedy_empty_proposal_is_plain_decoding():
    assert accept_greedy(np.zeros(0, np.int64), one_hot_logits([3])) == (0, 3)


@given(st.lists(st.integers(0, V - 1), min_size=0, max_size=6), st.data())
@settings(max_examples=200, deadline=None)
def test_greedy_is_longest_agreeing_prefix(proposal, data):
    target_tokens = data.draw(st.lists(st.integers(0, V - 1), min_size=len(proposal) + 1, max_size=len(proposal) + 1))
    accepted, bonus = accept_greedy(np.array(proposal, np.int64), one_hot_logits(target_tokens))
    expected = next((i for i, (p, t) in enumerate(zip(proposal, target_tokens)) if p != t), len(proposal))
    assert accepted == expected and bonus == target_tokens[expected]


def sampled(proposal, draft_probs, target_probs, rng):
    """accept_sampled with fresh uniforms for the accept tests [k] and the replacement draws [k+1]."""
    return accept_sampled(proposal, draft_probs, target_probs, rng.random(len(proposal)), rng.random(len(proposal) + 1))


def test_sampled_forced_rejection_uses_residual():
    """Target gives the proposed token probability 0: always rejected, and the replacement is drawn from
    max(0, target - draft) renormalised: here only token 3 has positive residual."""
    draft_probs = np.array([[0.0, 0.5, 0.0, 0.0, 0.5]])  # [1, V]
    target_probs = np.array([[0.0, 0.0, 0.0, 0.5, 0.5], [0.2] * 5])  # [2, V]
    rng = np.random.default_rng(0)
    for _ in range(50):
        assert sampled(np.array([1]), draft_probs, target_probs, rng) == (0, 3)


def test_sampled_identical_distributions_always_accept():
    probs = np.array([[0.1, 0.2, 0.3, 0.2, 0.2]] * 3)
    rng = np.random.default_rng(1)
    for _ in range(50):
        accepted, bonus = sampled(np.array([2, 4]), probs[:2], probs, rng)
        assert accepted == 2 and 0 <= bonus < V


def test_sampled_point_mass_draft_rejects_with_target_probability():
    """n-gram drafts are deterministic: acceptance probability is exactly the target's probability of the token."""
    target_probs = np.array([[0.3, 0.7, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0]])
    rng = np.random.default_rng(2)
    results = [sampled(np.array([0]), None, target_probs, rng) for _ in range(4000)]
    accepted = np.mean([n for n, _ in results])
    assert abs(accepted - 0.3) < 0.03
    assert all(tok == 2 for n, tok in results if n == 1)  # bonus from the next position
    assert all(tok == 1 for n, tok in results if n == 0)  # residual: token 0 removed -> only token 1 left


@pytest.mark.parametrize("broken", [False, True])
def test_first_token_follows_target_distribution(broken, monkeypatch):
    """One round of rejection sampling emits a first token distributed exactly as the target's, and a
    sampler whose residual step is broken (resamples from the target) is caught by the same check."""
    import spectrt.runtime.accept as accept_module

    rng = np.random.default_rng(3)
    draft_probs = np.array([[0.6, 0.1, 0.1, 0.1, 0.1]])
    target_probs = np.array([[0.1, 0.2, 0.3, 0.2, 0.2], [0.2] * 5])
    if broken:
        monkeypatch.setattr(accept_module, "residual", lambda target_row, draft_row, token: target_row)
    samples = []
    for _ in range(20000):
        proposal = np.array([rng.choice(V, p=draft_probs[0])])
        accepted, bonus = sampled(proposal, draft_probs, target_probs, rng)
        samples.append(int(proposal[0]) if accepted else bonus)
    empirical = np.bincount(samples, minlength=V) / len(samples)
    total_variation = 0.5 * np.abs(empirical - target_probs[0]).sum()
    if broken:
        assert total_variation > 0.05
    else:
        assert total_variation < 0.02


def test_probs_from_logits_top_k_top_p_temperature():
    logits = np.log(np.array([[0.5, 0.25, 0.125, 0.0625, 0.0625]], dtype=np.float32))
    assert np.allclose(probs_from_logits(logits, SamplingParams(temperature=1.0)), np.exp(logits))
    top2 = probs_from_logits(logits, SamplingParams(temperature=1.0, top_k=2))
    assert np.allclose(top2, [[2 / 3, 1 / 3, 0, 0, 0]])
    nucleus = probs_from_logits(logits, SamplingParams(temperature=1.0, top_p=0.7))
    assert np.allclose(nucleus, [[2 / 3, 1 / 3, 0, 0, 0]])  # 0.5 < 0.7, 0.75 >= 0.7 -> two tokens
    sharp = probs_from_logits(logits, SamplingParams(temperature=0.01))
    assert sharp[0, 0] > 0.999


@pytest.mark.parametrize("kwargs", [{"temperature": -1.0}, {"top_k": -2}, {"top_p": 0.0}, {"top_p": 1.5}])
def test_bad_sampling_params(kwargs):
    from spectrt.errors import GenerationError

    with pytest.raises(GenerationError):
        SamplingParams(**kwargs)
