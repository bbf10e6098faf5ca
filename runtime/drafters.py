"""Drafters propose the next k tokens cheaply. One protocol, several implementations.

A drafter sees the committed token sequence (prompt + output, last token included) and proposes
up to k tokens; after verification it is told how many of them the target accepted.

Under a structured-output constraint (`picker.constraint`) every drafter proposes only tokens the
constraint allows: it walks a copy of the committed matcher state along its proposal (the model
drafter masks its logits with it, so with sampling its probabilities are taken under the constraint;
n-gram proposals are cut where the constraint refuses them). Grammar-forced drafting (`grammar`,
`grammar+model`, `grammar+ngram`) proposes the tokens the constraint forces (the only continuation
it allows) at no model cost, and at branch points hands over to the model or the n-gram lookup (or,
alone, stops the proposal there).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from spectrt.errors import GenerationError

from .constraints import ConstraintMetrics, MatcherView
from .picker import TokenPicker

DRAFTERS = ("model", "ngram", "none", "grammar", "grammar+model", "grammar+ngram")


class Drafter(Protocol):
    name: str
    uses_model: bool

    def start(self, prompt_ids: list[int], reuse_prefix: bool = True) -> None:
        """A new request: `prompt_ids` is the prompt (already prefilled into the target); with reuse_prefix,
        cached state of a common prefix from an earlier request may be kept."""

    def catch_up(self, tokens: list[int]) -> None:
        """Absorb committed tokens this drafter has not seen (after plain rounds); timed apart from drafting."""

    def propose(self, tokens: list[int], k: int, picker: TokenPicker) -> tuple[np.ndarray, np.ndarray | None]:
        """Up to k proposed tokens [n<=k] for positions len(tokens).., and their draft probabilities
        [n, V] (None: the picker's rule does not need them, or the drafter is deterministic)."""

    def accepted(self, tokens: list[int], proposal_len: int, accepted: int) -> None:
        """The target accepted `accepted` of the last proposal; `tokens` is the new committed sequence."""


class NoDrafter:
    """Plain decoding of the target: the baseline every measurement compares against."""

    name = "none"
    uses_model = False

    def start(self, prompt_ids: list[int], reuse_prefix: bool = True) -> None:
        pass

    def catch_up(self, tokens: list[int]) -> None:
        pass

    def propose(self, tokens, k, picker):
        return np.zeros(0, np.int64), None

    def accepted(self, tokens, proposal_len, accepted) -> None:
        pass


class NgramDrafter:
    """Prompt lookup: find the latest earlier occurrence of the sequence's last n tokens (n from
    max_ngram down to min_ngram) and propose the tokens that followed it. Model-free; shines when
    the output copies from the input (extraction, editing, summarisation)."""

    uses_model = False

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, grammar_forced: bool = False):
        assert 1 <= min_ngram <= max_ngram
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.forced = ForcedRuns() if grammar_forced else None
        self.name = "grammar+ngram" if grammar_forced else "ngram"

    def start(self, prompt_ids: list[int], reuse_prefix: bool = True) -> None:
        pass

    def catch_up(self, tokens: list[int]) -> None:
        pass

    def propose(self, tokens, k, picker):
        if picker.constraint is None:
            return self._lookup(tokens, k, None), None
        walk = picker.constraint.fork()
        proposal: list[int] = []
        if self.forced is not None:
            self.forced.start_round(picker.constraint.metrics)
        while len(proposal) < k:
            if self.forced is not None and self.forced.extend(proposal, walk, k):
                continue
            follow = self._lookup([*tokens, *proposal], k - len(proposal), walk).tolist()
            if not follow:
                break
            walk.consume(follow)
            proposal.extend(follow)
            if self.forced is None:  # plain n-gram drafting: one lookup per round, as without a constraint
                break
        return np.asarray(proposal, dtype=np.int64), None

    def _lookup(self, tokens: list[int], k: int, walk: MatcherView | None) -> np.ndarray:
        """The tokens after the latest earlier occurrence of the longest matching suffix (at most k); under a
        constraint, the allowed prefix of the first candidate that has one."""
        sequence = np.asarray(tokens, dtype=np.int64)
        for n in range(min(self.max_ngram, len(sequence) - 1), self.min_ngram - 1, -1):
            suffix = sequence[-n:]
            # candidate starts of earlier matches, latest first (a match must end before the suffix)
            windows = np.lib.stride_tricks.sliding_window_view(sequence[:-1], n)  # [L-n, n]
            hits = np.flatnonzero((windows == suffix).all(axis=1))
            for start in hits[::-1]:
                follow = sequence[start + n : start + n + k]
                if walk is not None:
                    follow = follow[: walk.valid_prefix(follow.tolist())]
                if len(follow):
                    return follow.copy()
        return np.zeros(0, np.int64)

    def accepted(self, tokens, proposal_len, accepted) -> None:
        if self.forced is not None:
            self.forced.accepted(accepted)


class ModelDrafter:
    """The bundle's draft model, decoding one token per step against its own KV cache."""

    uses_model = True

    def __init__(self, decoder, grammar_forced: bool = False):
        self.decoder = decoder  # a backends.base.Decoder
        self.forced = ForcedRuns() if grammar_forced else None
        self.name = "grammar+model" if grammar_forced else "model"

    def start(self, prompt_ids: list[int], reuse_prefix: bool = True) -> None:
        context = prompt_ids[:-1]  # the last prompt token is fed with the first proposal
        kept = self.decoder.reuse(context, len(context) if reuse_prefix else 0)
        if len(context) > kept:
            self.decoder.step(np.asarray(context[kept:], dtype=np.int64))
            self.decoder.commit(len(context) - kept)

    def catch_up(self, tokens: list[int]) -> None:
        # normally 1 or 2 committed tokens are new to the draft (2 after a fully accepted round) and are
        # fed with its first proposal step; after plain rounds more are, and they go in as one prefill
        if len(tokens) - self.decoder.length > 2:
            self.decoder.step(np.asarray(tokens[self.decoder.length : -1], dtype=np.int64))
            self.decoder.commit(len(tokens) - 1 - self.decoder.length)

    def propose(self, tokens, k, picker):
        if k == 0:
            return np.zeros(0, np.int64), None
        if picker.constraint is not None:
            return self._propose_constrained(tokens, k, picker)
        pending = np.asarray(tokens[self.decoder.length :], dtype=np.int64)  # 1, or 2 after a full accept
        proposal = np.zeros(k, np.int64)
        draft_probs = []
        for i in range(k):
            logits = self.decoder.step(pending)[-1]  # [V]
            self.decoder.commit(len(pending))
            proposal[i], probs = picker.draft_token(logits, len(tokens) + i)
            draft_probs.append(probs)
            pending = proposal[i : i + 1]
        # the last proposed token was never fed: it stays pending like any committed token would
        return proposal, (None if draft_probs[0] is None else np.stack(draft_probs))  # [k], [k, V] | None

    def _propose_constrained(self, tokens, k, picker):
        """Draft logits masked by a copy of the constraint walking the proposal; with grammar forcing, forced runs
        are taken from the grammar and fed to the draft model with its next step (never stepped for alone)."""
        walk = picker.constraint.fork()
        pending = list(tokens[self.decoder.length :])  # committed (or forced) tokens the draft has not seen yet
        proposal: list[int] = []
        draft_probs: list[np.ndarray | None] = []  # None: a forced token (a point mass)
        if self.forced is not None:
            self.forced.start_round(picker.constraint.metrics)
        while len(proposal) < k and not walk.finished:
            if self.forced is not None:
                before = len(proposal)
                if self.forced.extend(proposal, walk, k):
                    pending.extend(proposal[before:])
                    draft_probs.extend([None] * (len(proposal) - before))
                    continue
            logits = self.decoder.step(np.asarray(pending, dtype=np.int64))[-1]  # [V]
            self.decoder.commit(len(pending))
            try:
                logits = walk.masked(logits)
            except GenerationError:  # a dead end of the grammar after our proposal: the target decides
                break
            token, probs = picker.draft_token(logits, len(tokens) + len(proposal))
            walk.consume([token])
            proposal.append(token)
            draft_probs.append(probs)
            pending = [token]
        # the tokens in `pending` were never fed: they stay pending like committed tokens would
        return np.asarray(proposal, dtype=np.int64), _stack_draft_probs(proposal, draft_probs, picker)

    def accepted(self, tokens, proposal_len, accepted) -> None:
        if self.forced is not None:
            self.forced.accepted(accepted)
        if proposal_len == 0:  # a plain target step: nothing of ours to drop
            return
        # rows for the rejected proposals (and the unfed last one) are dropped by moving the length
        keep = len(tokens) - 1 - (1 if accepted == proposal_len else 0)
        self.decoder.rollback(min(self.decoder.length, keep))


class ForcedRuns:
    """Grammar-forced drafting inside a drafter: appends the constraint's forced run to a proposal and counts
    forced tokens proposed and accepted (in the request's ConstraintMetrics)."""

    def __init__(self):
        self.positions: list[int] = []  # proposal offsets of this round's forced tokens
        self.metrics: ConstraintMetrics | None = None

    def start_round(self, metrics: ConstraintMetrics) -> None:
        self.positions = []
        self.metrics = metrics

    def extend(self, proposal: list[int], walk: MatcherView, k: int) -> bool:
        """Append up to k - len(proposal) forced tokens (consumed into `walk`); False when none is forced here."""
        run = walk.forced(k - len(proposal))
        self.positions.extend(range(len(proposal), len(proposal) + len(run)))
        proposal.extend(run)
        if self.metrics is not None:
            self.metrics.forced_tokens += len(run)
        return bool(run)

    def accepted(self, accepted: int) -> None:
        if self.metrics is not None:
            self.metrics.forced_accepted += sum(1 for p in self.positions if p < accepted)
        self.positions = []


class GrammarDrafter:
    """Grammar-forced drafts alone: the run of tokens the constraint forces, nothing at branch points
    (a draft miss there: the round is a plain target step). No model, no cost beyond the matcher."""

    name = "grammar"
    uses_model = False

    def __init__(self):
        self.forced = ForcedRuns()

    def start(self, prompt_ids: list[int], reuse_prefix: bool = True) -> None:
        pass

    def catch_up(self, tokens: list[int]) -> None:
        pass

    def propose(self, tokens, k, picker):
        proposal: list[int] = []
        if picker.constraint is not None and k:
            self.forced.start_round(picker.constraint.metrics)
            self.forced.extend(proposal, picker.constraint.fork(), k)
        return np.asarray(proposal, dtype=np.int64), None

    def accepted(self, tokens, proposal_len, accepted) -> None:
        self.forced.accepted(accepted)


def _stack_draft_probs(proposal: list[int], draft_probs: list[np.ndarray | None],
                       picker: TokenPicker) -> np.ndarray | None:
    """[n, V] draft probabilities for rejection sampling, forced tokens as point masses; None when the rule does
    not need them or every token was forced (None means point masses throughout)."""
    if not picker.wants_draft_probs or all(p is None for p in draft_probs):
        return None
    vocab = next(len(p) for p in draft_probs if p is not None)
    return np.stack([p if p is not None else _point_mass(vocab, token) for p, token in zip(draft_probs, proposal)])


def _point_mass(vocab: int, token: int) -> np.ndarray:
    row = np.zeros(vocab, np.float64)
    row[token] = 1.0
    return row


def make_drafter(kind: str, draft_decoder=None, constrained: bool = False) -> Drafter:
    if kind.startswith("grammar") and not constrained:
        raise GenerationError(f"draft '{kind}' proposes what a constraint forces; pass json_schema, regex, grammar "
                              f"or choice, or use draft model, ngram or none.")
    if kind == "none":
        return NoDrafter()
    if kind in ("ngram", "grammar+ngram"):
        return NgramDrafter(grammar_forced=kind == "grammar+ngram")
    if kind in ("model", "grammar+model"):
        if draft_decoder is None:
            raise GenerationError("this bundle has no draft model; use --draft ngram, grammar+ngram or none.")
        return ModelDrafter(draft_decoder, grammar_forced=kind == "grammar+model")
    if kind == "grammar":
        return GrammarDrafter()
    raise GenerationError(f"unknown drafter '{kind}'; choose one of {', '.join(DRAFTERS)}.")
