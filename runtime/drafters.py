"""Drafters propose the next k tokens cheaply. One protocol, several implementations.

A drafter sees the committed token sequence (prompt + output, last token included) and proposes
up to k tokens; after verification it is told how many of them the target accepted.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from .picker import TokenPicker


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

    name = "ngram"
    uses_model = False

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        assert 1 <= min_ngram <= max_ngram
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def start(self, prompt_ids: list[int], reuse_prefix: bool = True) -> None:
        pass

    def catch_up(self, tokens: list[int]) -> None:
        pass

    def propose(self, tokens, k, picker):
        sequence = np.asarray(tokens, dtype=np.int64)
        for n in range(min(self.max_ngram, len(sequence) - 1), self.min_ngram - 1, -1):
            suffix = sequence[-n:]
            # candidate starts of earlier matches, latest first (a match must end before the suffix)
            windows = np.lib.stride_tricks.sliding_window_view(sequence[:-1], n)  # [L-n, n]
            hits = np.flatnonzero((windows == suffix).all(axis=1))
            for start in hits[::-1]:
                follow = sequence[start + n : start + n + k]
                if len(follow):
                    return follow.copy(), None
        return np.zeros(0, np.int64), None

    def accepted(self, tokens, proposal_len, accepted) -> None:
        pass


class ModelDrafter:
    """The bundle's draft model, decoding one token per step against its own KV cache."""

    name = "model"
    uses_model = True

    def __init__(self, decoder):
        self.decoder = decoder  # a backends.base.Decoder

    def start(self, prompt_ids: list[int], reuse_prefix: bool = True) -> None:
        context = prompt_ids[:-1]  # the last prompt token is fed with the first proposal
        kept = self.decoder.reuse(context, len(context)) if reuse_prefix else (self.decoder.reset() or 0)
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

    def accepted(self, tokens, proposal_len, accepted) -> None:
        if proposal_len == 0:  # a plain target step: nothing of ours to drop
            return
        # rows for the rejected proposals (and the unfed last one) are dropped by moving the length
        keep = len(tokens) - 1 - (1 if accepted == proposal_len else 0)
        self.decoder.rollback(min(self.decoder.length, keep))


def make_drafter(kind: str, draft_decoder=None) -> Drafter:
    from spectrt.errors import GenerationError

    if kind == "none":
        return NoDrafter()
    if kind == "ngram":
        return NgramDrafter()
    if kind == "model":
        if draft_decoder is None:
            raise GenerationError("this bundle has no draft model; use --draft ngram or --draft none.")
        return ModelDrafter(draft_decoder)
    raise GenerationError(f"unknown drafter '{kind}'; choose model, ngram or none.")
