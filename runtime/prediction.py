"""Predicted outputs: the client sends the text it expects (an edit's original file) and the drafter proposes it.

The prediction is drafted where the output follows it; after a mismatch (the edit) the drafter re-aligns: it
looks for the output's latest tokens in the prediction (the longest suffix that occurs there, nearest to where
the output left it, forwards first) and proposes what follows them, so the draft rejoins the original a few
tokens after the edit. Where the output follows no part of the prediction, a fallback drafter (n-gram lookup, the
draft model, or none) proposes instead. The target verifies every token, so output is plain decoding's
whatever the prediction says (greedy; sampling keeps the target's distribution: a prediction is a point-mass
draft).

Counts follow OpenAI's usage fields: `accepted` = prediction tokens that appeared in the output where the output
followed the prediction (drafted and accepted, or the target's own token equal to the prediction's); `rejected` =
the prediction's other tokens.
"""

from __future__ import annotations

import numpy as np

from .picker import TokenPicker

ANCHOR_MAX = 8  # the longest output suffix looked up in the prediction when re-aligning
ANCHOR_MIN = 2  # shorter suffixes are too ambiguous to re-align on anywhere (one token matches all over a file)
NEAR = 16  # ...but one token re-aligns within this many prediction tokens after the last aligned position (an
# edit usually rejoins the original right after it: a renamed variable, a changed value)
SURE_ANCHOR = 4  # a re-alignment on this many tokens (or confirmed by SURE_FOLLOWED tokens since) is trusted with
SURE_FOLLOWED = 2  # the widest verification; a weaker one drafts at the width the scheduler picks


class PredictionDrafter:
    """Drafts a predicted output (token ids), aligned to the committed output; `fallback` proposes elsewhere."""

    def __init__(self, prediction_ids: list[int], fallback):
        self.prediction = [int(t) for t in prediction_ids]
        self.fallback = fallback  # a Drafter (NoDrafter for the prediction alone)
        self.name = "prediction" + ("" if fallback.name == "none" else f"+{fallback.name}")
        self.draft_steps = 0
        self.index: dict[tuple[int, ...], list[int]] = {}  # n-gram of the prediction -> positions after it
        for n in range(1, ANCHOR_MAX + 1):
            for end in range(n, len(self.prediction) + 1):
                self.index.setdefault(tuple(self.prediction[end - n:end]), []).append(end)
        self.accepted_tokens = 0  # prediction tokens the output followed
        self._reset_alignment()

    def _reset_alignment(self) -> None:
        self.output_start = 0  # where the output starts in the committed sequence
        self.synced = 0  # committed tokens examined
        self.cursor: int | None = 0  # prediction position the output has reached (None: not aligned)
        self.last_cursor = 0  # where it was last aligned (re-alignment searches near it)
        self.anchor = SURE_ANCHOR  # tokens the current alignment rests on (the start: the prediction's first token)
        self.from_prediction = 0  # tokens of the latest proposal taken from the prediction

    # -- Drafter protocol ---------------------------------------------------------------------------------------

    def start(self, prompt_ids: list[int], reuse_prefix: bool = True) -> None:
        self._reset_alignment()
        self.output_start = self.synced = len(prompt_ids)
        self.fallback.start(prompt_ids, reuse_prefix)

    def catch_up(self, tokens: list[int]) -> None:
        self._sync(tokens)
        if self._aligned_run() == 0:  # the fallback proposes this round: it reads what it has not seen
            self.fallback.catch_up(tokens)

    def behind(self, tokens: list[int]) -> int:
        self._sync(tokens)
        return 0 if self._aligned_run() else self.fallback.behind(tokens)

    def sure(self, tokens: list[int]) -> int:
        """Tokens the prediction offers from here when the alignment is trusted (0: not aligned, or re-aligned on
        a short match not confirmed yet): the width scheduler's hint."""
        self._sync(tokens)
        return self._aligned_run() if self.anchor >= SURE_ANCHOR else 0

    def propose(self, tokens, k, picker: TokenPicker):
        self._sync(tokens)
        self.draft_steps = 0
        self.from_prediction = 0
        run = self._aligned_run()
        if run and k:
            proposal = self.prediction[self.cursor:self.cursor + min(k, run)]
            if picker.constraint is not None:
                proposal = proposal[:picker.constraint.fork().valid_prefix(proposal)]
            if proposal:
                self.from_prediction = len(proposal)
                return np.asarray(proposal, dtype=np.int64), None  # a point-mass draft
        self.fallback.catch_up(tokens)
        proposal, draft_probs = self.fallback.propose(tokens, k, picker)
        self.draft_steps = self.fallback.draft_steps
        return proposal, draft_probs

    def accepted(self, tokens, proposal_len, accepted) -> None:
        if self.from_prediction:
            self.fallback.accepted(tokens, 0, 0)  # it proposed nothing this round
        else:
            self.fallback.accepted(tokens, proposal_len, accepted)
        self._sync(tokens)

    @property
    def uses_model(self) -> bool:
        return self.fallback.uses_model

    @property
    def round_source(self) -> str:
        """Which drafter proposed the latest round: the prediction, or the fallback (or its part that did)."""
        return "prediction" if self.from_prediction else getattr(self.fallback, "round_source", self.fallback.name)

    @property
    def rejected_tokens(self) -> int:
        return max(0, len(self.prediction) - self.accepted_tokens)

    # -- alignment ----------------------------------------------------------------------------------------------

    def _aligned_run(self) -> int:
        return 0 if self.cursor is None else len(self.prediction) - self.cursor

    def _sync(self, tokens: list[int]) -> None:
        """Follow the committed tokens not examined yet along the prediction; re-align after a mismatch."""
        if len(tokens) < self.synced:  # another sequence (no `start`): align afresh
            self._reset_alignment()
            self.output_start = self.synced = len(tokens)
            return
        for token in tokens[self.synced:]:
            if self.cursor is not None and self.cursor < len(self.prediction) and self.prediction[self.cursor] == token:
                self.cursor += 1
                self.last_cursor = self.cursor
                self.accepted_tokens += 1
                self.anchor += SURE_ANCHOR // SURE_FOLLOWED  # each token followed confirms the alignment
            else:
                self.cursor = None
        changed = len(tokens) > self.synced
        self.synced = len(tokens)
        if changed and self.cursor is None:
            self.cursor = self._realign(tokens[self.output_start:])

    def _realign(self, output: list[int]) -> int | None:
        """The prediction position after the longest suffix of `output` (ANCHOR_MAX..ANCHOR_MIN tokens) that occurs
        in the prediction, the occurrence nearest to the last aligned position (forwards preferred); else after its
        last token, if that occurs within NEAR tokens after the last aligned position; None if none of these occurs
        or nothing follows it."""
        for n in range(min(ANCHOR_MAX, len(output)), ANCHOR_MIN - 1, -1):
            ends = self.index.get(tuple(output[len(output) - n:]))
            if not ends:
                continue
            ahead = [end for end in ends if end >= self.last_cursor]
            end = min(ahead) if ahead else max(ends)
            self.anchor = n
            return end if end < len(self.prediction) else None
        if output:  # one token: only just ahead of where the output left the prediction
            near = [end for end in self.index.get((output[-1],), ()) if self.last_cursor < end <= self.last_cursor + NEAR]
            if near and min(near) < len(self.prediction):
                self.anchor = 1
                return min(near)
        return None
