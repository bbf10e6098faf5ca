"""Metrics have exact, documented values: a scripted run with fake models and a fake clock.

Target: the next token after t is (t + 1) % V; each call costs 10 ms + 1 ms per token. Draft: the
same rule, except that its proposal for sequence position 3 is wrong; each step costs 2 ms. The
consumer holds every chunk for a whole (fake) second, which no metric may count."""

from __future__ import annotations

import numpy as np
import pytest

from spectrt.runtime.backends.base import CacheBookkeeping
from spectrt.runtime.drafters import ModelDrafter, NgramDrafter, NoDrafter
from spectrt.runtime.kv_cache import KVCache
from spectrt.runtime.loop import LoopState, speculative_decode
from spectrt.runtime.metrics import AggregateMetrics, LatencySummary, RequestMetrics
from spectrt.runtime.picker import TokenPicker
from spectrt.runtime.sampling import SamplingParams
from spectrt.runtime.scheduler import WidthScheduler

V = 16


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeDecoder(CacheBookkeeping):
    """A Decoder whose logits follow a rule; positions are tracked like a real KV cache."""

    def __init__(self, clock: FakeClock, call_s: float, per_token_s: float, wrong_at: set[int] = frozenset()):
        super().__init__(KVCache(1, 64, 1, 1, "fp32"))
        self.clock, self.call_s, self.per_token_s, self.wrong_at = clock, call_s, per_token_s, wrong_at
        self.max_context, self.vocab = 64, V
        self.calls: list[int] = []  # tokens per call

    def _forward(self, token_ids: np.ndarray) -> np.ndarray:
        self.clock.advance(self.call_s + self.per_token_s * len(token_ids))
        self.calls.append(len(token_ids))
        logits = np.zeros((len(token_ids), V), np.float32)  # [S, V]
        for row, token in enumerate(token_ids):
            position = self.cache.length + row + 1  # position of the token these logits choose
            logits[row, (int(token) + (2 if position in self.wrong_at else 1)) % V] = 10.0
        return logits



def scripted_run(drafter_kind: str, width, prompt=(0,), max_new_tokens=10, scheduler=None):
    clock = FakeClock()
    target = FakeDecoder(clock, 0.010, 0.001)
    draft = FakeDecoder(clock, 0.002, 0.0, wrong_at={3})
    drafter = {"model": lambda: ModelDrafter(draft), "ngram": NgramDrafter, "none": NoDrafter}[drafter_kind]()
    scheduler = scheduler or WidthScheduler((1, 2, 3), width)
    metrics, state = RequestMetrics(prompt_tokens=len(prompt)), LoopState()
    picker = TokenPicker(SamplingParams(), seed=None, vocab=V)
    tokens = []
    for token in speculative_decode(target, drafter, scheduler, list(prompt), max_new_tokens=max_new_tokens,
                                    picker=picker, eos_ids=set(), metrics=metrics, state=state, clock=clock):
        tokens.append(token)
        clock.advance(1.0)  # the consumer's own time
    return tokens, metrics, state, target, draft, scheduler


def test_scripted_model_drafter_run_has_exact_metrics():
    tokens, m, state, target, draft, _ = scripted_run("model", 3)
    assert tokens == list(range(1, 11)) and state.finish_reason == "length"
    # prefill 11 ms -> token 1. Round 1 (K=3): draft 3 x 2 ms proposes [2, 4, 5] (position 3 wrong), verify
    # [1, 2, 4, 5] 14 ms -> accept 1, bonus 3. Round 2 (K=3): [4, 5, 6] all accepted + 7. Round 3 (K=2,
    # budget): [8, 9] accepted + 10, verify 13 ms.
    assert target.calls == [1, 4, 4, 3] and draft.calls == [2, 1, 1, 1, 1, 1, 2, 1]
    assert m.generated_tokens == 10 and m.rounds == 3
    assert (m.fallback_rounds, m.draft_misses, m.speculative_rounds) == (0, 0, 3)
    assert (m.drafted_tokens, m.accepted_tokens) == (8, 6) and m.acceptance_rate == 0.75
    assert m.accepted_length_histogram == {1: 1, 3: 1, 2: 1}
    assert m.width_histogram == {3: 2, 2: 1}
    assert m.per_position_acceptance() == {1: 1.0, 2: pytest.approx(2 / 3), 3: 0.5}
    assert m.rejected_spans == [(2, 2)]  # output index 2 (token after "1, 2"), 2 proposals rejected
    assert m.mean_accepted_length == 2.0 and m.tokens_per_round == 3.0
    assert m.prefill_seconds == pytest.approx(0.011)
    assert m.time_to_first_token == pytest.approx(0.011)
    assert m.draft_seconds == pytest.approx(0.016) and m.draft_catchup_seconds == 0.0
    assert m.verify_seconds == pytest.approx(0.041)
    assert m.round_latencies == pytest.approx([0.020, 0.020, 0.017])
    assert m.delivery_gaps == pytest.approx([0.020, 0.020, 0.017])  # one gap per round, never a same-round 0
    assert m.decode_seconds == pytest.approx(0.057)
    assert m.time_per_output_token == pytest.approx(0.057 / 9)
    assert m.tokens_per_second == pytest.approx(9 / 0.057)
    assert m.total_seconds == pytest.approx(0.068)  # ten consumer seconds are not ours
    data = m.to_json()
    assert data["deliveries"] == 4 and data["rejected_tokens"] == 2
    assert data["inter_chunk_gap_p50"] == pytest.approx(0.020)
    assert data["round_latency_p95"] == pytest.approx(float(np.percentile([0.020, 0.020, 0.017], 95)))


def test_plain_rounds_and_ngram_misses_are_counted_apart():
    _, plain, *_ = scripted_run("none", 0)
    assert (plain.rounds, plain.fallback_rounds, plain.draft_misses, plain.drafted_tokens) == (9, 9, 0, 0)
    assert plain.width_histogram == {0: 9}
    assert plain.delivery_gaps == pytest.approx([0.011] * 9) and plain.mean_accepted_length is None
    # the rule-following text never repeats within 10 tokens: every n-gram lookup misses; the last round has
    # a budget of one token, so it runs at K = 0 and is a plain round, not a miss
    _, ngram, *_ = scripted_run("ngram", 3)
    assert (ngram.rounds, ngram.fallback_rounds, ngram.draft_misses, ngram.speculative_rounds) == (9, 1, 8, 0)
    assert ngram.acceptance_rate is None and ngram.width_histogram == {3: 6, 2: 1, 1: 1, 0: 1}


class ScriptedWidths(WidthScheduler):
    """Widths from a script; records what the cost model was charged."""

    def __init__(self, widths):
        super().__init__((1, 2, 3), "auto")
        self.script = list(widths)

    def width(self, limit, model_draft=True, draft_lag=0, sure=0):
        return min(self.script.pop(0), limit)


def test_draft_catch_up_after_plain_rounds_is_not_charged_as_drafting():
    scheduler = ScriptedWidths([0, 0, 0, 2, 2, 2, 2])
    _, m, _, _, draft, scheduler = scripted_run("model", None, max_new_tokens=12, scheduler=scheduler)
    # the prompt [0] and the tokens of the prefill and 3 plain rounds are [0, 1, 2, 3, 4]: the draft has seen
    # none; one catch-up step feeds [0, 1, 2, 3], then the two proposal steps feed one token each
    assert draft.calls[:3] == [4, 1, 1]
    assert m.draft_catchup_seconds == pytest.approx(0.002)
    assert m.fallback_rounds == 3
    assert scheduler.costs.draft_cost == pytest.approx(0.002)  # per draft step: the catch-up is not in it


def test_latency_summary_is_bounded_and_accurate():
    rng = np.random.default_rng(0)
    values = rng.lognormal(-4, 1, size=20000)
    summary = LatencySummary()
    summary.extend(values.tolist())
    assert len(summary.buckets) < 1000
    for q in (50, 95, 99):
        assert summary.percentile(q) == pytest.approx(np.percentile(values, q), rel=0.02)
    assert summary.to_json()["count"] == 20000 and summary.max == values.max()


def test_aggregate_keeps_bounded_state():
    aggregate = AggregateMetrics()
    for _ in range(300):
        _, m, state, *_ = scripted_run("model", 3)
        aggregate.add(m, state.finish_reason)
    data = aggregate.to_json()
    assert data["requests"] == 300 and data["finish_reasons"] == {"length": 300}
    assert data["generated_tokens"] == 3000 and data["acceptance_rate"] == 0.75
    assert data["latency"]["inter_chunk_gap"]["count"] == 900
    assert data["latency"]["time_per_output_token"]["p50"] == pytest.approx(0.057 / 9, rel=0.01)
    assert sum(len(s.buckets) for s in aggregate.latency.values()) < 20  # no per-request lists kept
    assert not any(isinstance(v, list) for v in vars(aggregate).values())


def test_a_round_that_only_brings_eos_is_not_a_delivery():
    clock = FakeClock()
    target = FakeDecoder(clock, 0.010, 0.001)
    metrics, state = RequestMetrics(), LoopState()
    picker = TokenPicker(SamplingParams(), seed=None, vocab=V)
    tokens = list(speculative_decode(target, NoDrafter(), WidthScheduler((1,), 0), [0], max_new_tokens=10,
                                     picker=picker, eos_ids={4}, metrics=metrics, state=state, clock=clock))
    assert tokens == [1, 2, 3] and state.finish_reason == "eos"
    # prefill 11 ms, then plain rounds of 11 ms each; the round that produced eos delivers nothing
    assert metrics.delivery_gaps == pytest.approx([0.011, 0.011])
    assert metrics.decode_seconds == pytest.approx(0.022)
    assert metrics.time_per_output_token == pytest.approx(0.011)
    assert metrics.total_seconds == pytest.approx(0.044)  # the eos round still ran
