"""How one request turns logits into tokens: greedy argmax, or sampling with draws keyed by position.

Sampling has two verification rules, both exact (every emitted token follows the target's
distribution after temperature / top-k / top-p):

- `coupled` (default): at sequence position p the target's token is the winner of an exponential
  race (the Gumbel-max trick) over draws that depend on (seed, p) only; the draft races with the same
  draws, and a proposal is accepted when it equals the target's token, as in greedy decoding. So a
  seeded speculative run gives token for token the output of seeded plain decoding, at every width and
  with every drafter, and `width="auto"` reproduces. Acceptance is a little below the optimum:
  at least (1 - TV) / (1 + TV) against 1 - TV (Daliri, Musco and Suresh 2024, drafter-invariant
  speculative decoding with Gumbel sampling).
- `rejection`: Leviathan et al. 2023 / Chen et al. 2023 rejection sampling with the residual
  distribution max(0, target - draft); the highest acceptance. Draws are keyed by (seed, position,
  purpose), so a seeded run reproduces at a fixed width, but not under `auto` (whose widths follow the
  clock) and not across widths.
"""

from __future__ import annotations

import numpy as np

from .accept import accept_greedy, accept_matching, accept_sampled
from .sampling import (ACCEPT_DRAW, DRAFT_DRAW, TARGET_DRAW, PositionRandom, SamplingParams, probs_from_logits,
                       race_pick, sample)

ACCEPT_RULES = ("coupled", "rejection")


class TokenPicker:
    """Token choice for one request; `position` is always the index of the token in the whole sequence."""

    def __init__(self, params: SamplingParams, *, seed: int | None, vocab: int, rule: str = "coupled"):
        assert rule in ACCEPT_RULES
        self.params = params
        self.rule = rule
        self.random = None if params.greedy else PositionRandom(seed, vocab)

    def _probs(self, logits: np.ndarray) -> np.ndarray:  # [V] -> [V]
        return probs_from_logits(logits[None], self.params)[0]

    def target_token(self, logits: np.ndarray, position: int) -> int:
        """The target's token at `position` from its logits [V] (plain decoding, prefill, bonus)."""
        if self.params.greedy:
            return int(logits.argmax())
        if self.rule == "coupled":
            return race_pick(self._probs(logits), self.random.race(position))
        return sample(self._probs(logits), self.random.uniform(position, TARGET_DRAW))

    def draft_token(self, logits: np.ndarray, position: int) -> tuple[int, np.ndarray | None]:
        """A draft model's proposal at `position` from its logits [V], and its probabilities [V] if the
        rule needs them (rejection sampling)."""
        if self.params.greedy:
            return int(logits.argmax()), None
        probs = self._probs(logits)
        if self.rule == "coupled":
            return race_pick(probs, self.random.race(position)), None
        return sample(probs, self.random.uniform(position, DRAFT_DRAW)), probs

    def verify(self, proposal: np.ndarray, draft_probs: np.ndarray | None, target_logits: np.ndarray,
               position: int) -> tuple[int, int]:
        """proposal [k] for positions position.., target_logits [k+1, V] -> (accepted count, next token)."""
        if self.params.greedy:
            return accept_greedy(proposal, target_logits)
        if self.rule == "coupled":
            accepted, token = accept_matching(proposal, lambda i: self.target_token(target_logits[i], position + i))
            self.random.forget_before(position + accepted + 1)
            return accepted, token
        target_probs = probs_from_logits(target_logits, self.params)  # [k+1, V]
        offsets = range(len(proposal) + 1)
        accept_draws = np.array([self.random.uniform(position + i, ACCEPT_DRAW) for i in offsets[:-1]])
        sample_draws = np.array([self.random.uniform(position + i, TARGET_DRAW) for i in offsets])
        return accept_sampled(proposal, draft_probs, target_probs, accept_draws, sample_draws)
