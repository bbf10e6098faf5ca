"""Sampling settings and the logits -> probabilities transform shared by draft and target.

Temperature, top-k and top-p are applied identically to both models' logits, so the rejection
sampler compares like with like and the output follows the target's (warped) distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spectrt.errors import GenerationError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise GenerationError(f"temperature must be >= 0 (got {self.temperature}); 0 means greedy.")
        if self.top_k < 0:
            raise GenerationError(f"top_k must be >= 0 (got {self.top_k}); 0 turns it off.")
        if not 0.0 < self.top_p <= 1.0:
            raise GenerationError(f"top_p must lie in (0, 1] (got {self.top_p}).")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def probs_from_logits(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """logits [N, V] -> probabilities [N, V] (float64) after temperature, top-k and top-p."""
    assert not params.greedy, "greedy decoding uses argmax, not probabilities"
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
        # keep a token if the mass before it is < top_p (so the first token is always kept)
        keep_sorted = (np.cumsum(sorted_probs, axis=-1) - sorted_probs) < params.top_p
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum(axis=-1, keepdims=True)
    return probs


def sample(probs: np.ndarray, uniform: float) -> int:
    """One token from probabilities [V] (need not sum to 1) by inverse CDF at `uniform` in [0, 1)."""
    cdf = np.cumsum(probs)
    index = int(np.searchsorted(cdf, uniform * cdf[-1], side="right"))
    return min(index, len(probs) - 1)

# -- random draws that depend on (seed, position, purpose) only -------------------------------------
# A request's random numbers are keyed by where they are used, never by how many were drawn before, so
# a seeded run gives the same tokens whatever widths the scheduler picks (its choices depend on the
# clock) and whatever the drafter proposes.
DRAFT_DRAW, ACCEPT_DRAW, TARGET_DRAW, RACE_DRAW = 0, 1, 2, 3  # purposes of a draw at one position


def random_seed() -> int:
    """A fresh seed for a request that did not pass one (reported in its metrics)."""
    return int(np.random.SeedSequence().generate_state(1, np.uint64)[0] >> np.uint64(1))


class PositionRandom:
    """Uniforms and exponential races for sequence position p, from (seed, p, purpose) alone."""

    def __init__(self, seed: int, vocab: int):
        self.seed = int(seed)
        self.vocab = vocab
        self._races: dict[int, np.ndarray] = {}  # position -> [V] exponentials, kept for the current round

    def uniform(self, position: int, purpose: int) -> float:
        return float(np.random.default_rng([self.seed, position, purpose]).random())

    def race(self, position: int) -> np.ndarray:
        """[V] iid Exp(1) draws shared by draft and target at this position (see `race_pick`)."""
        races = self._races.get(position)
        if races is None:
            races = np.random.default_rng([self.seed, position, RACE_DRAW]).standard_exponential(self.vocab)
            races = np.maximum(races, np.finfo(np.float64).tiny)  # never 0: probs / races stays finite
            self._races[position] = races
        return races

    def forget_before(self, position: int) -> None:
        """Positions before `position` are committed: their draws are never asked for again."""
        for old in [p for p in self._races if p < position]:
            del self._races[old]


def race_pick(probs: np.ndarray, races: np.ndarray) -> int:
    """argmax probs / races [V]: an exact sample from `probs` (the exponential race, i.e. the Gumbel-max
    trick); two distributions raced with the same draws pick the same token as often as they agree."""
    return int(np.argmax(probs / races))
