"""The speculative decoding loop: prefill, then propose / verify / accept / commit until done."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .accept import accept_greedy, accept_sampled
from .drafters import Drafter
from .metrics import RequestMetrics
from .sampling import SamplingParams, probs_from_logits, sample
from .scheduler import WidthScheduler


@dataclass
class LoopState:
    finish_reason: str | None = None  # eos | length | context


def pick_token(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """One token from logits [1, V] (plain decoding / prefill)."""
    if params.greedy:
        return int(logits[0].argmax())
    return sample(probs_from_logits(logits, params)[0], rng)


def speculative_decode(target, drafter: Drafter, scheduler: WidthScheduler, prompt_ids: list[int], *,
                       max_new_tokens: int, params: SamplingParams, rng: np.random.Generator, eos_ids: set[int],
                       metrics: RequestMetrics, state: LoopState) -> Iterator[int]:
    """Yields generated tokens one by one (eos excluded); `state.finish_reason` says why it stopped."""
    clock = time.perf_counter
    start = clock()
    target.reset()
    first_logits = target.step(np.asarray(prompt_ids, dtype=np.int64))[-1:]  # prefill, [1, V]
    target.commit(len(prompt_ids))
    drafter.start(prompt_ids)
    next_tokens = [pick_token(first_logits, params, rng)]
    tokens = [*prompt_ids, *next_tokens]  # committed sequence; its last token is not in the target cache yet
    metrics.prefill_seconds = clock() - start
    last_emit = start
    while True:
        for token in next_tokens:  # emit one by one, stopping mid-run on eos / budget
            if token in eos_ids:
                state.finish_reason = "eos"
                return
            now = clock()
            if metrics.time_to_first_token is None:
                metrics.time_to_first_token = now - start
            else:
                metrics.token_latencies.append(now - last_emit)
            last_emit = now
            metrics.generated_tokens += 1
            yield token
            if metrics.generated_tokens >= max_new_tokens:
                state.finish_reason = "length"
                return
        context_left = target.max_context - target.length - 1  # the last token still needs a cache row
        if context_left < 0:
            state.finish_reason = "context"
            return
        k = scheduler.width(min(max_new_tokens - metrics.generated_tokens - 1, context_left), drafter.uses_model)
        t0 = clock()
        proposal, draft_probs = drafter.propose(tokens, k, params, rng)  # [n<=k], [n, V] | None
        t1 = clock()
        target_logits = target.step(np.concatenate([tokens[-1:], proposal]).astype(np.int64))  # [n+1, V]
        t2 = clock()
        if params.greedy:
            accepted, bonus = accept_greedy(proposal, target_logits)
        else:
            accepted, bonus = accept_sampled(proposal, draft_probs, probs_from_logits(target_logits, params), rng)
        target.commit(accepted + 1)  # rows of the last token and the accepted proposals; the rest is dropped
        next_tokens = [*proposal[:accepted].tolist(), bonus]
        tokens.extend(next_tokens)
        drafter.accepted(tokens, len(proposal), accepted)
        metrics.record_round(k, len(proposal), accepted, metrics.generated_tokens, t1 - t0, t2 - t1)
        scheduler.costs.record_verify(len(proposal), t2 - t1)
        if drafter.uses_model:
            scheduler.costs.record_draft(len(proposal), t1 - t0)
        scheduler.costs.record_acceptance(len(proposal), accepted)
