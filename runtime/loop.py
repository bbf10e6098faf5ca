"""The speculative decoding loop: prefill, then propose / verify / accept / commit until done."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from .drafters import Drafter, NgramDrafter
from .metrics import RequestMetrics
from .picker import TokenPicker
from .scheduler import WidthScheduler


@dataclass
class LoopState:
    finish_reason: str | None = None  # eos | length | context (eos also: a constraint's grammar is complete)


class BusyClock:
    """Seconds since the request started, minus the time the consumer held a yielded token."""

    def __init__(self, clock: Callable[[], float]):
        self.clock = clock
        self.start = clock()
        self.paused = 0.0
        self.paused_at: float | None = None

    def __call__(self) -> float:
        return (self.paused_at if self.paused_at is not None else self.clock()) - self.start - self.paused

    def pause(self) -> None:
        self.paused_at = self.clock()

    def resume(self) -> None:
        if self.paused_at is not None:
            self.paused += self.clock() - self.paused_at
            self.paused_at = None


def speculative_decode(target, drafter: Drafter, scheduler: WidthScheduler, prompt_ids: list[int], *,
                       max_new_tokens: int, picker: TokenPicker, eos_ids: set[int], metrics: RequestMetrics,
                       state: LoopState, clock: Callable[[], float] = time.perf_counter,
                       reuse_prefix: bool = True, pad_guesses: bool = True) -> Iterator[int]:
    """Yields generated tokens one by one (eos excluded); `state.finish_reason` says why it stopped.

    A target whose calls are shaped for row-count invariance (`invariance.ShapedDecoder`) may compute rows past a
    round's last token anyway; with `pad_guesses` those rows carry free n-gram guesses, verified like proposals
    (a point-mass draft), so the padding can pay for itself. Output is unchanged either way."""
    now = BusyClock(clock)
    guesser = PadGuesser(target) if pad_guesses else None
    try:
        yield from _rounds(target, drafter, scheduler, prompt_ids, max_new_tokens, picker, eos_ids, metrics, state, now,
                           reuse_prefix, guesser)
    finally:
        now.resume()
        metrics.total_seconds = now()


def _rounds(target, drafter: Drafter, scheduler: WidthScheduler, prompt_ids: list[int], max_new_tokens: int,
            picker: TokenPicker, eos_ids: set[int], metrics: RequestMetrics, state: LoopState,
            now: BusyClock, reuse_prefix: bool, guesser: "PadGuesser | None") -> Iterator[int]:
    # prefill: rows of a prompt prefix already in the cache (an earlier request's) are kept, the rest computed;
    # at least the last prompt token is fed again, since its logits choose the first token
    kept = target.reuse(prompt_ids, len(prompt_ids) - 1 if reuse_prefix else 0)
    first_logits = target.step(np.asarray(prompt_ids[kept:], dtype=np.int64))[-1]  # [V]
    target.commit(len(prompt_ids) - kept)
    metrics.reused_prompt_tokens = kept
    draft_started = False  # the draft reads the prompt after the first token is out: it never delays it
    next_tokens = [picker.next_token(first_logits, len(prompt_ids))]
    tokens = [*prompt_ids, *next_tokens]  # committed sequence; its last token is not in the target cache yet
    metrics.prefill_seconds = now()
    while True:
        for index, token in enumerate(next_tokens):  # emit one by one, stopping mid-run on eos / budget
            if token in eos_ids:
                state.finish_reason = "eos"
                return
            if index == 0:
                metrics.record_delivery(now())  # this round's tokens are ready together
            metrics.generated_tokens += 1
            now.pause()  # the consumer's time with the token is not ours
            yield token
            now.resume()
            if metrics.generated_tokens >= max_new_tokens:
                state.finish_reason = "eos" if _grammar_complete(picker, next_tokens[index + 1 :], eos_ids) else "length"
                return
        if _grammar_complete(picker, [], eos_ids):  # end of sequence is all the grammar allows now
            state.finish_reason = "eos"
            return
        context_left = target.max_context - target.length - 1  # the last token still needs a cache row
        if context_left < 0:
            state.finish_reason = "context"
            return
        if not draft_started:
            started_at = now()
            drafter.start(prompt_ids, reuse_prefix)
            metrics.draft_catchup_seconds += now() - started_at
            metrics.draft_seconds += now() - started_at
            draft_started = True
        t0 = now()
        lag = drafter.behind(tokens)
        sure = drafter.sure(tokens) if hasattr(drafter, "sure") else 0  # an aligned predicted output
        k = scheduler.width(min(max_new_tokens - metrics.generated_tokens - 1, context_left), drafter.uses_model, lag,
                            sure=sure)
        t1 = now()
        if k:
            drafter.catch_up(tokens)
        t2 = now()
        # [n<=k], [n, V] | None; a plain round asks nothing of the drafter (a lookup or grammar fork would be wasted)
        proposal, draft_probs = drafter.propose(tokens, k, picker) if k else (np.zeros(0, np.int64), None)
        drafted = len(proposal)
        t3 = now()  # drafting ends here: the guesses below belong to the target call (they come with its shape)
        if guesser is not None:  # rows the shaped call computes anyway carry free guesses
            proposal, draft_probs = guesser.extend(tokens, proposal, draft_probs, picker, metrics,
                                                   min(context_left, max_new_tokens - metrics.generated_tokens) - 1)
        target_logits = target.step(np.concatenate([tokens[-1:], proposal]).astype(np.int64))  # [n+1, V]
        t4 = now()
        accepted, bonus = picker.verify(proposal, draft_probs, target_logits, len(tokens))
        target.commit(accepted + 1)  # rows of the last token and the accepted proposals; the rest is dropped
        next_tokens = [*proposal[:accepted].tolist(), bonus]
        tokens.extend(next_tokens)
        drafter.accepted(tokens, drafted, accepted)
        t5 = now()
        metrics.pad_guesses_accepted += max(0, accepted - drafted)
        accepted = min(accepted, drafted)  # the drafter's own acceptance; guesses are counted apart
        metrics.draft_catchup_seconds += t2 - t1
        metrics.record_round(k, drafted, accepted, metrics.generated_tokens, t3 - t1, t4 - t3, t5 - t0,
                             source=getattr(drafter, "round_source", drafter.name))
        scheduler.record(k, drafted, accepted, t5 - t3, t3 - t2, drafter.uses_model,
                         catch_up=(lag if k else 0, t2 - t1), draft_steps=drafter.draft_steps, sure=k > 0 and sure > 0)


def _grammar_complete(picker: TokenPicker, rest: list[int], eos_ids: set[int]) -> bool:
    """The request's constraint is complete after the tokens emitted so far (`rest`: this round's tokens not
    emitted, which after a complete grammar can only be end of sequence)."""
    constraint = picker.constraint
    return constraint is not None and constraint.finished and all(token in eos_ids for token in rest)


class PadGuesser:
    """Free guesses for the rows a shaped target call pads with: prompt lookup (an n-gram index over the request's
    tokens, no confidence cut). Used only where the call computes the rows anyway and no constraint applies."""

    def __init__(self, target):
        self.spare_rows = getattr(target, "spare_rows", None)  # None: calls are not shaped, nothing to fill
        self.index = NgramDrafter(min_confidence=0.0) if self.spare_rows is not None else None

    def extend(self, tokens: list[int], proposal: np.ndarray, draft_probs: np.ndarray | None, picker: TokenPicker,
               metrics: RequestMetrics, budget: int) -> tuple[np.ndarray, np.ndarray | None]:
        """proposal [n] -> proposal + guesses [n + g] (and draft_probs with point masses for them); counts the
        round's pad rows into `metrics`."""
        if self.spare_rows is None:
            return proposal, draft_probs
        spare = self.spare_rows(len(proposal) + 1)
        metrics.pad_rows += spare
        room = min(spare, budget - len(proposal))
        if room <= 0 or picker.constraint is not None:
            return proposal, draft_probs
        guesses = self.index.continuation(tokens, proposal.tolist(), room)
        if not guesses:
            return proposal, draft_probs
        metrics.pad_guesses += len(guesses)
        extended = np.concatenate([proposal, np.asarray(guesses, np.int64)])  # [n + g]
        if draft_probs is not None:  # rejection sampling: a guess is a point-mass draft
            masses = np.zeros((len(guesses), draft_probs.shape[1]), draft_probs.dtype)
            masses[np.arange(len(guesses)), guesses] = 1.0
            draft_probs = np.concatenate([draft_probs, masses])
        return extended, draft_probs
