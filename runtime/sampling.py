"""Sampling settings and the logits -> probabilities transform shared by draft and target.

Temperature, top-k and top-p are applied identically to both models' logits, so the rejection
sampler compares like with like and the output follows the target's (warped) distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spectrt.runtime.errors import GenerationError


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
    scores = logits.astype(np.float64)  # [N, V], a fresh copy worked on in place
    scores /= params.temperature
    vocab = scores.shape[-1]
    dropped = None
    if 0 < params.top_k < vocab:
        kth = np.partition(scores, vocab - params.top_k, axis=-1)[:, vocab - params.top_k][:, None]  # [N, 1]
        dropped = scores < kth  # [N, V]; zeroed after exp, as exp(-inf) would (which is several times slower)
    scores -= scores.max(axis=-1, keepdims=True)
    probs = np.exp(scores, out=scores)
    if dropped is not None:
        probs[dropped] = 0.0
    probs /= probs.sum(axis=-1, keepdims=True)
    if params.top_p < 1.0:
        for row in probs:  # zero what top-p drops, in place
            kept = _nucleus(row, params.top_p)
            values = row[kept]
            row.fill(0.0)
            row[kept] = values
        probs /= probs.sum(axis=-1, keepdims=True)
    return probs


_BUCKET_SHIFT = np.uint64(48)  # buckets of float64 bit patterns: 16 per power of two (sign, exponent, 4 mantissa bits)
_BUCKET_SLACK = 1e-9  # a bucket sum (other order of additions) may be this far from the sorted running sum
_NUCLEUS_MARGIN = 1e-12  # far above the rounding of one float64 addition to a sum below 2 (2**-53)


def _nucleus(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Indices of the tokens top-p keeps in probs [V] (zero-probability ones may be left out: they stay zero
    either way), exactly those a stable descending sort of the whole row keeps: the token at sorted position i
    is kept when cumsum(sorted)[i] - sorted[i] < top_p, equal probabilities in order of index.

    Without sorting V: the tokens with probability >= t, for any t > 0, are a prefix of that order (taken in
    index order, then stably sorted), and their running sum is the prefix of the full one (np.cumsum adds in
    order). Once it reaches top_p + margin, every later position j has cumsum[j] - p[j] >= cumsum[j-1] - 2**-53
    >= top_p, so is dropped. t is the lower edge of the bucket where the mass of the largest buckets passes
    top_p (a bit pattern order, which for p >= 0 is the value order); one pass over V finds it. Where the
    running sum still falls short (top_p within rounding of 1) the whole row is sorted, as is a row of NaN."""
    keys = (probs.view(np.uint64) >> _BUCKET_SHIFT).view(np.int64)  # [V], < 2**16
    mass_from_top = np.cumsum(np.bincount(keys, weights=probs)[::-1])  # mass of the i+1 largest buckets
    reached = np.flatnonzero(mass_from_top >= top_p + _BUCKET_SLACK)
    if len(reached):
        key = len(mass_from_top) - 1 - int(reached[0])
        t = float(np.array(key << int(_BUCKET_SHIFT), np.int64).view(np.float64))
        candidates = np.flatnonzero(probs >= t) if t > 0 else np.flatnonzero(probs)  # ascending index
        order = candidates[np.argsort(-probs[candidates], kind="stable")]
        sorted_probs = probs[order]
        mass = np.cumsum(sorted_probs)
        if t == 0 or mass[-1] - top_p >= _NUCLEUS_MARGIN:
            return order[(mass - sorted_probs) < top_p]
    order = np.argsort(-probs, kind="stable")
    sorted_probs = probs[order]
    return order[(np.cumsum(sorted_probs) - sorted_probs) < top_p]


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
