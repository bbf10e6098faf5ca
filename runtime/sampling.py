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


def sample(probs: np.ndarray, rng: np.random.Generator) -> int:
    """One token from probabilities [V] by inverse CDF."""
    cdf = np.cumsum(probs)
    index = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    return min(index, len(probs) - 1)
