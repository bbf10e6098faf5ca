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

Under a constraint (`constraints.RequestConstraint`) every target row is masked by the matcher state after
the proposals before it, then chosen by the same rule: greedy and coupled walk the proposal on the
committed matcher (each token they consume is committed: an accepted proposal or the target's own
token); rejection sampling masks all rows on a copy first, then commits the accepted prefix and the
final token. So constrained speculative output is constrained plain output (greedy, coupled) or follows
the constrained target distribution (rejection).
"""

from __future__ import annotations

import numpy as np

from .accept import accept_greedy, accept_matching, accept_sampled
from .constraints import RequestConstraint
from .sampling import (ACCEPT_DRAW, DRAFT_DRAW, TARGET_DRAW, PositionRandom, SamplingParams, probs_from_logits,
                       race_pick, sample)

ACCEPT_RULES = ("coupled", "rejection")


class TokenPicker:
    """Token choice for one request; `position` is always the index of the token in the whole sequence."""

    def __init__(self, params: SamplingParams, *, seed: int | None, vocab: int, rule: str = "coupled",
                 constraint: RequestConstraint | None = None):
        assert rule in ACCEPT_RULES
        self.params = params
        self.rule = rule
        self.vocab = vocab
        self.random = None if params.greedy else PositionRandom(seed, vocab)
        self.constraint = constraint  # the request's structured-output constraint, shared with the drafter

    @property
    def wants_draft_probs(self) -> bool:
        """Whether verification needs the drafter's probabilities (rejection sampling)."""
        return not self.params.greedy and self.rule == "rejection"

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

    def next_token(self, logits: np.ndarray, position: int) -> int:
        """The target's token at `position` from its logits [V] with nothing proposed (the prefill's token),
        under the constraint if there is one (and committed into it)."""
        if self.constraint is None:
            return self.target_token(logits, position)
        return self.verify(np.zeros(0, np.int64), None, logits[None], position)[1]

    def verify(self, proposal: np.ndarray, draft_probs: np.ndarray | None, target_logits: np.ndarray,
               position: int) -> tuple[int, int]:
        """proposal [k] for positions position.., target_logits [k+1, V] -> (accepted count, next token)."""
        if self.constraint is not None:
            return self._verify_constrained(proposal, draft_probs, target_logits, position)
        if self.params.greedy:
            return accept_greedy(proposal, target_logits)
        if self.rule == "coupled":
            accepted, token = accept_matching(proposal, lambda i: self.target_token(target_logits[i], position + i))
            self.random.forget_before(position + accepted + 1)
            return accepted, token
        return self._rejection_sample(proposal, draft_probs, target_logits, position)

    def _rejection_sample(self, proposal: np.ndarray, draft_probs: np.ndarray | None, target_logits: np.ndarray,
                          position: int) -> tuple[int, int]:
        """Rejection sampling over target_logits [k+1, V] with the draws of positions position..position+k."""
        target_probs = probs_from_logits(target_logits, self.params)  # [k+1, V]
        offsets = range(len(proposal) + 1)
        accept_draws = np.array([self.random.uniform(position + i, ACCEPT_DRAW) for i in offsets[:-1]])
        sample_draws = np.array([self.random.uniform(position + i, TARGET_DRAW) for i in offsets])
        return accept_sampled(proposal, draft_probs, target_probs, accept_draws, sample_draws)

    def _verify_constrained(self, proposal: np.ndarray, draft_probs: np.ndarray | None, target_logits: np.ndarray,
                            position: int) -> tuple[int, int]:
        constraint = self.constraint
        if self.params.greedy or self.rule == "coupled":
            # row i is masked by the committed state after proposal[:i]; a token chosen here is always committed
            accepted = 0
            while True:
                token = self.target_token(constraint.masked(target_logits[accepted]), position + accepted)
                constraint.consume([token])
                matched = accepted < len(proposal) and int(proposal[accepted]) == token
                accepted += matched
                if not matched or constraint.ended:  # a mismatch, or an accepted end of sequence: nothing follows
                    if self.random is not None:
                        self.random.forget_before(position + accepted + 1)
                    return accepted, token
        # rejection sampling: mask every row on a copy walking the proposal; a proposal the constraint forbids has
        # target probability 0, so it is certainly rejected: rows after it are never looked at
        walk = constraint.fork()
        rows = []  # [n+1, V] masked logits
        for i in range(len(proposal) + 1):
            rows.append(walk.masked(target_logits[i]))
            if i == len(proposal):
                break
            if not np.isfinite(rows[-1][int(proposal[i])]) or int(proposal[i]) in walk.eos_ids:
                rows.extend(rows[-1:] * (len(proposal) - i))  # placeholders: after a rejection or the end
                break
            walk.consume([int(proposal[i])])
        accepted, token = self._rejection_sample(proposal, draft_probs, np.stack(rows), position)
        constraint.consume([*proposal[:accepted].tolist(), token])
        return accepted, token
