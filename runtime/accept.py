"""The accept step of speculative decoding: pure functions, no model, no state.

Greedy: accept the longest prefix of the proposal on which the target's argmax agrees, then
emit the target's own token. Sampling: rejection sampling with the residual distribution
(Leviathan et al. 2023; Chen et al. 2023), which makes every emitted token follow the target's
distribution exactly.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .sampling import sample


def accept_greedy(proposal: np.ndarray, target_logits: np.ndarray) -> tuple[int, int]:
    """proposal [k], target_logits [k+1, V] -> (accepted count n, next token from the target)."""
    target_tokens = target_logits.argmax(axis=-1)  # [k+1]
    return accept_matching(proposal, lambda i: int(target_tokens[i]))


def accept_matching(proposal: np.ndarray, target_token: Callable[[int], int]) -> tuple[int, int]:
    """Keep the longest prefix of proposal [k] that equals the target's own choices; target_token(i) is the
    target's token at offset i (0..k), asked for lazily. -> (accepted count n, target's token at n)."""
    accepted = 0
    while accepted < len(proposal):
        token = target_token(accepted)
        if int(proposal[accepted]) != token:
            return accepted, token
        accepted += 1
    return accepted, target_token(accepted)


def residual(target_row: np.ndarray, draft_row: np.ndarray | None, token: int) -> np.ndarray:
    """Distribution to resample from after rejecting `token`: max(0, target - draft) (unnormalised) [V]."""
    if draft_row is None:  # point-mass draft: remove the rejected token
        out = target_row.copy()
        out[token] = 0.0
    else:
        out = np.maximum(target_row - draft_row, 0.0)
    if out.sum() <= 0.0:  # draft and target agree exactly: rejection had probability 0
        return target_row
    return out


def accept_sampled(proposal: np.ndarray, draft_probs: np.ndarray | None, target_probs: np.ndarray,
                   accept_draws: np.ndarray, sample_draws: np.ndarray) -> tuple[int, int]:
    """Rejection sampling.

    proposal [k]; draft_probs [k, V], or None for a deterministic drafter (n-gram: a point mass on
    each proposed token); target_probs [k+1, V]; accept_draws [k] and sample_draws [k+1]: uniforms in
    [0, 1) for the accept test and the replacement draw at each offset. Returns (accepted count n, next token).
    """
    for position, token in enumerate(proposal):
        target_p = target_probs[position, token]
        draft_p = 1.0 if draft_probs is None else draft_probs[position, token]
        if draft_p > 0 and accept_draws[position] * draft_p < target_p:  # accept with prob min(1, target_p / draft_p)
            continue
        draft_row = None if draft_probs is None else draft_probs[position]
        return position, sample(residual(target_probs[position], draft_row, int(token)), sample_draws[position])
    return len(proposal), sample(target_probs[len(proposal)], sample_draws[len(proposal)])
