"""Drafts priced right, end to end: the loop charges the width scheduler what drafting cost (per draft model step,
grammar-forced tokens free; per lookup for a model-free drafter), on a fake clock so the prices are exact.

Stand-in target: the next token after t is (t + 1) % V, each call 10 ms + 1 ms per token; the text repeats every
V tokens, so prompt lookup finds it and a rule-following draft is always accepted."""

from __future__ import annotations

import numpy as np
import pytest

from fake_timing import FakeClock, fake_timed_generator
from spectrt.runtime import loop as loop_module
from spectrt.runtime.backends.base import CacheBookkeeping
from spectrt.runtime.constraints import MatcherView
from spectrt.runtime.drafters import ModelDrafter, NgramDrafter
from spectrt.runtime.kv_cache import KVCache
from spectrt.runtime.loop import LoopState, speculative_decode
from spectrt.runtime.metrics import RequestMetrics
from spectrt.runtime.picker import TokenPicker
from spectrt.runtime.sampling import SamplingParams
from spectrt.runtime.scheduler import WidthScheduler

V = 16
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "kind"],
          "properties": {"name": {"type": "string", "pattern": "^[a-z]{1,6}$"}, "kind": {"enum": ["cat", "dog"]}}}


class RuleDecoder(CacheBookkeeping):
    """A Decoder whose logits follow the rule; each call advances the clock by call_s + per_token_s per token."""

    def __init__(self, clock: FakeClock, call_s: float, per_token_s: float = 0.0, spare: int | None = None):
        super().__init__(KVCache(1, 256, 1, 1, "fp32"))
        self.clock, self.call_s, self.per_token_s = clock, call_s, per_token_s
        self.max_context, self.vocab = 256, V
        if spare is not None:  # calls shaped for row-count invariance: `spare` pad rows after the real ones
            self.spare_rows = lambda count: spare

    def _forward(self, token_ids: np.ndarray) -> np.ndarray:
        self.clock.advance(self.call_s + self.per_token_s * len(token_ids))
        logits = np.zeros((len(token_ids), V), np.float32)  # [S, V]
        logits[np.arange(len(token_ids)), (np.asarray(token_ids) + 1) % V] = 10.0
        return logits


class TimedLookup(NgramDrafter):
    """Prompt lookup that takes `seconds` of the clock per proposal (a slow index, a grammar fork)."""

    def __init__(self, clock: FakeClock, seconds: float):
        super().__init__()
        self.clock, self.seconds = clock, seconds

    def propose(self, tokens, k, picker):
        self.clock.advance(self.seconds)
        return super().propose(tokens, k, picker)


def run(clock: FakeClock, target, drafter, width, max_new_tokens=40, prompt=tuple(range(V)) * 2):
    scheduler = WidthScheduler((1, 2, 3), width)
    metrics, state = RequestMetrics(prompt_tokens=len(prompt)), LoopState()
    picker = TokenPicker(SamplingParams(), seed=None, vocab=V)
    tokens = list(speculative_decode(target, drafter, scheduler, list(prompt), max_new_tokens=max_new_tokens,
                                     picker=picker, eos_ids=set(), metrics=metrics, state=state, clock=clock))
    assert tokens == [(prompt[-1] + 1 + i) % V for i in range(max_new_tokens)]  # exact, whatever the widths
    return metrics, scheduler


@pytest.mark.parametrize("lookup_s,speculates", [(0.0, True), (0.050, False)])
def test_a_slow_model_free_drafter_is_priced_and_auto_declines_it(lookup_s, speculates):
    """Every lookup of 50 ms (5 plain target steps) costs more than the 3 tokens a width-3 round gains: auto
    measures it in its bootstrap round and decodes plainly after it (probes aside); free lookups pay."""
    clock = FakeClock()
    metrics, scheduler = run(clock, RuleDecoder(clock, 0.010, 0.001), TimedLookup(clock, lookup_s), "auto")
    speculative = metrics.rounds - metrics.fallback_rounds
    if speculates:
        assert speculative >= metrics.rounds - 1  # all but the bootstrap's plain round
    else:
        assert speculative <= 2 and metrics.width_histogram[3] == 1  # the bootstrap round (and at most a probe)
    assert scheduler.costs.lookup_cost == pytest.approx(lookup_s)


@pytest.mark.parametrize("kind", ["model", "ngram"])
def test_pad_guesses_are_not_charged_as_drafting(kind, monkeypatch):
    """A shaped target's pad rows carry n-gram guesses; guessing is part of the target call, never the drafter's
    price (a model draft step stays 2 ms, an n-gram lookup stays free)."""
    clock = FakeClock()
    real_extend = loop_module.PadGuesser.extend

    def slow_extend(self, *args, **kwargs):
        clock.advance(0.005)
        return real_extend(self, *args, **kwargs)

    monkeypatch.setattr(loop_module.PadGuesser, "extend", slow_extend)
    drafter = ModelDrafter(RuleDecoder(clock, 0.002)) if kind == "model" else NgramDrafter()
    metrics, scheduler = run(clock, RuleDecoder(clock, 0.010, 0.001, spare=2), drafter, 3)
    assert metrics.pad_guesses > 0  # the guesser ran
    if kind == "model":
        assert scheduler.costs.draft_cost == pytest.approx(0.002)
    else:
        assert scheduler.costs.lookup_cost == pytest.approx(0.0)
    assert scheduler.costs.verify_cost[3] == pytest.approx(0.005 + 0.010 + 0.001 * 6)  # 4 tokens + 2 guesses


# -- through the Generator, on the tiny bundle -----------------------------------------------------------------

def test_forced_tokens_do_not_lower_the_price_of_a_draft_step(tiny_generator):
    """grammar+model feeds forced runs to the draft with its next step: the price per step is what a step costs
    (2 ms here), however many forced tokens came with it or whole rounds of them took no step at all."""
    fake_timed_generator(tiny_generator, target_step=0.010, draft_step=0.002)
    result = tiny_generator.generate("The quick brown fox", max_new_tokens=60, json_schema=SCHEMA,
                                     draft="grammar+model", width=5)
    assert result.constraint.forced_tokens > 0 and result.metrics.drafted_tokens > result.constraint.forced_tokens
    costs = tiny_generator._costs[("grammar+model", True)]
    assert costs.draft_cost == pytest.approx(0.002)
    assert costs.steps_per_token < 1.0  # forced tokens are free: a width-k round costs fewer than k steps


def test_constrained_prices_do_not_feed_unconstrained_requests(tiny_generator, monkeypatch):
    """Masks cost 30 ms each here: constrained rounds are far dearer to verify and to draft. Unconstrained
    requests of the same drafter, before and after them, are priced with what they cost (10 ms, 2 ms)."""
    clock = fake_timed_generator(tiny_generator, target_step=0.010, draft_step=0.002)
    real_allowed = MatcherView.allowed

    def slow_allowed(self):
        clock.advance(0.030)
        return real_allowed(self)

    monkeypatch.setattr(MatcherView, "allowed", slow_allowed)
    options = dict(max_new_tokens=24, draft="model", width=3)
    tiny_generator.generate("The quick brown fox", **options)
    constrained = tiny_generator.generate("The quick brown fox", json_schema=SCHEMA, **options)
    assert constrained.constraint.masks > 0
    tiny_generator.generate("def add(a, b):", **options)
    unconstrained = tiny_generator._costs[("model", False)]
    assert unconstrained.draft_cost == pytest.approx(0.002)
    assert all(seconds == pytest.approx(0.010) for seconds in unconstrained.verify_cost.values())
    dear = tiny_generator._costs[("model", True)]
    assert dear.draft_cost > 0.030 and all(seconds > 0.030 for seconds in dear.verify_cost.values())
