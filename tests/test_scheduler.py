"""The cost model and the width scheduler."""

from __future__ import annotations

import pytest

from spectrt.errors import GenerationError
from spectrt.runtime.scheduler import (AcceptanceEstimate, CostModel, LongRunAcceptance, WidthScheduler,
                                       acceptance_from_mean_accepted, expected_speedup, expected_tokens_per_round)


def test_expected_tokens_per_round_formula():
    assert expected_tokens_per_round(0.0, 4) == 1.0
    assert expected_tokens_per_round(1.0, 4) == 5.0
    assert expected_tokens_per_round(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)
    assert expected_tokens_per_round(0.8, 0) == 1.0


def test_expected_speedup_matches_hand_computation():
    # a=0.8, k=4: tokens/round = (1-0.8^5)/0.2 = 3.3616; cost = 4*0.1 + 1.2 = 1.6 (plain = 1.0)
    assert expected_speedup(0.8, 4, 0.1, 1.2, 1.0) == pytest.approx(3.3616 / 1.6)


def test_acceptance_inversion_roundtrip():
    for a in (0.1, 0.5, 0.9):
        mean_accepted = sum(a ** i for i in range(1, 5))
        assert acceptance_from_mean_accepted(mean_accepted, 4) == pytest.approx(a, abs=1e-6)


def _measured(acceptance, draft_cost, verify):
    costs = CostModel(draft_cost=draft_cost, verify_cost=dict(verify))
    return WidthScheduler((2, 4, 8), "auto", costs=costs, acceptance=AcceptanceEstimate(prior=acceptance))


def test_auto_picks_wide_when_acceptance_is_high_and_draft_cheap():
    scheduler = _measured(0.95, 0.01, {0: 1.0, 2: 1.05, 4: 1.1, 8: 1.2})
    assert scheduler.width(limit=100) == 8


def test_auto_picks_narrow_when_verification_cost_grows_fast():
    scheduler = _measured(0.7, 0.05, {0: 1.0, 2: 1.1, 4: 2.5, 8: 5.0})
    assert scheduler.width(limit=100) == 2


def test_auto_falls_back_to_plain_when_speculation_cannot_pay_and_probes_later():
    scheduler = _measured(0.1, 0.5, {0: 1.0, 2: 1.2, 4: 1.5, 8: 2.0})
    widths = [scheduler.width(limit=100) for _ in range(32)]
    assert widths.count(0) == 30  # plain decoding...
    assert widths[15] == 2 and widths[31] == 2  # ...with a probe of the smallest width every 16 rounds


def test_auto_measures_unmeasured_widths_first_and_respects_limit():
    scheduler = WidthScheduler((2, 4, 8), "auto")
    assert scheduler.width(limit=100) == 8
    scheduler.costs.record_verify(8, 1.0)
    assert scheduler.width(limit=100) == 4
    assert scheduler.width(limit=3) == 2  # only widths <= limit
    assert scheduler.width(limit=1) == 0


def test_acceptance_estimate_adapts():
    estimate = AcceptanceEstimate(prior=0.6)
    for _ in range(20):
        estimate.record(proposed=4, accepted=4)
    assert estimate.value > 0.95
    for _ in range(20):
        estimate.record(proposed=4, accepted=0)
    assert estimate.value < 0.25  # the data says ~0.05; the prior (0.6 x 2 trials) still pulls a little


def test_long_run_acceptance_seeds_the_next_request_only():
    long_run = LongRunAcceptance()
    assert long_run.start_request().value == pytest.approx(0.6)  # neutral until a request has been seen
    request = long_run.start_request()
    for _ in range(10):
        request.record(proposed=4, accepted=1)  # 1 accepted of 2 judged per round
    assert long_run.value == pytest.approx(0.6)  # a running request does not move the long-run value...
    long_run.update(request)
    assert long_run.value == pytest.approx(0.5)  # ...its totals do, once it ends
    assert long_run.start_request().prior == pytest.approx(0.5)


def test_stale_widths_are_measured_again():
    """A width whose only measurement was bad (a cold first call) is re-measured after `stale_after` rounds."""
    costs = CostModel(stale_after=32)
    costs.record_verify(0, 1.0)
    costs.record_verify(2, 1.05)
    costs.record_verify(4, 50.0)  # one slow first call: 4 would never be chosen on this number
    costs.draft_cost = 0.01
    scheduler = WidthScheduler((2, 4), "auto", costs=costs, acceptance=AcceptanceEstimate(prior=0.9),
                               probe_every=8)
    chosen = []
    for _ in range(64):
        k = scheduler.width(limit=100)
        chosen.append(k)
        scheduler.record(k, k, k, {0: 1.0, 2: 1.05, 4: 1.1}[k], 0.01 * k, model_draft=True)
    assert 4 in chosen, "the stale width was never measured again"
    first_probe = chosen.index(4)
    assert first_probe >= 32  # only once its measurement had gone stale
    later = chosen[first_probe + 1 :]
    assert later.count(4) >= len(later) - 2, "after a fresh measurement the width that pays most is chosen"
    assert 0 in later  # plain decoding, never chosen while speculating, is measured again too


def test_scheduler_record_charges_only_what_it_predicts():
    scheduler = WidthScheduler((2, 4), "auto")
    scheduler.record(4, 4, 3, verify_seconds=0.5, draft_seconds=0.2, model_draft=True)
    assert scheduler.costs.verify_cost == {4: 0.5} and scheduler.costs.draft_cost == pytest.approx(0.05)
    scheduler.record(4, 2, 2, verify_seconds=0.3, draft_seconds=0.0, model_draft=False)  # n-gram found only 2
    assert scheduler.costs.verify_cost[2] == 0.3  # priced as the call it was: 3 tokens
    assert scheduler.costs.draft_cost == pytest.approx(0.05)


def test_fixed_width_must_be_built():
    with pytest.raises(GenerationError, match="width 3 was not built.*2, 4, 8"):
        WidthScheduler((2, 4, 8), 3)
    assert WidthScheduler((2, 4, 8), 4).width(limit=100) == 4
    assert WidthScheduler((2, 4, 8), 4).width(limit=2) == 2
    assert WidthScheduler((2, 4, 8), 0).width(limit=100) == 0


def test_stale_widths_are_measured_again_across_short_requests():
    costs = CostModel(stale_after=20)
    for k, seconds in ((0, 1.0), (2, 1.05), (4, 50.0)):
        costs.record_verify(k, seconds)
    costs.draft_cost = 0.01
    chosen = []
    for _ in range(10):  # ten requests of 5 rounds each, sharing the costs as a Generator does
        scheduler = WidthScheduler((2, 4), "auto", costs=costs, acceptance=AcceptanceEstimate(prior=0.9))
        for _ in range(5):
            k = scheduler.width(limit=100)
            chosen.append(k)
            scheduler.record(k, k, k, {0: 1.0, 2: 1.05, 4: 1.1}[k], 0.01 * k, model_draft=True)
    assert 4 in chosen
    later = chosen[chosen.index(4) + 1 :]
    assert later and later.count(4) >= len(later) - 2


def test_a_width_the_drafter_never_fills_is_priced_by_interpolation():
    """The n-gram drafter may propose fewer than K tokens every time: K must not stay 'unmeasured' forever."""
    scheduler = WidthScheduler((2, 4, 8), "auto", acceptance=AcceptanceEstimate(prior=0.9))
    chosen = []
    for _ in range(30):
        k = scheduler.width(limit=100, model_draft=False)
        chosen.append(k)
        proposed = min(k, 3)  # never more than 3 matching tokens
        scheduler.record(k, proposed, proposed, 1.0 + 0.01 * proposed, 0.0, model_draft=False)
    # each width is asked for once (widest first), then priced: 4 (3 real tokens, 5 estimated) pays most
    assert chosen[:4] == [8, 4, 2, 0]
    assert chosen.count(8) == 1 and set(chosen[4:]) == {4}
    costs = CostModel(verify_cost={0: 1.0, 2: 1.2, 8: 2.4})
    assert costs.verify_estimate(4) == pytest.approx(1.6)  # between 2 and 8
    assert costs.verify_estimate(11) == pytest.approx(2.4 * 12 / 9)  # beyond: linear in tokens
