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


def test_under_load_a_round_is_priced_for_the_whole_batch():
    """A request's speculation delays every request of its batch: width 2 pays alone (1.96 tokens for 1.2x a plain
    round's time), not in a batch of 6 (its 0.2 extra delays six requests: 1.96 tokens for 2.2 plain rounds of
    the batch), and pays again when the batch thins."""
    sharers = [1]
    costs = CostModel(draft_cost=0.05, verify_cost={0: 1.0, 2: 1.1, 4: 1.3, 8: 2.0})
    scheduler = WidthScheduler((2, 4, 8), "auto", costs=costs, acceptance=AcceptanceEstimate(prior=0.6),
                               sharers=lambda: sharers[0])
    assert scheduler.width(limit=100) == 2
    sharers[0] = 6
    assert scheduler.width(limit=100) == 0
    sharers[0] = 1
    assert scheduler.width(limit=100) == 2


def test_in_a_batch_auto_prices_the_batch_calls_it_measured():
    """With the batch loop's call costs (seconds by rows per call), a batch of 4 that speculates alike is priced as a
    whole: where extra rows are nearly free (a memory-bound call) speculation pays; where each row costs (the int4
    Qwen 1.5B target on 2 CPU cores: about 0.06 s + 0.02 s a row, its 0.5B draft a third of that) plain decoding
    wins, though the same widths pay for one request alone."""
    def scheduler(per_row: float) -> WidthScheduler:
        table = {"target": lambda rows: 0.06 + per_row * rows, "draft": lambda rows: 0.3 * (0.06 + per_row * rows)}
        costs = CostModel(draft_cost=0.02, verify_cost={0: 0.08, 1: 0.09, 2: 0.1, 4: 0.12})
        return WidthScheduler((1, 2, 4), "auto", costs=costs, acceptance=AcceptanceEstimate(prior=0.7),
                              sharers=lambda: 4, batch_cost=lambda model, rows: table[model](rows))

    assert scheduler(per_row=0.001).width(limit=100) > 0
    costly = scheduler(per_row=0.02)
    assert [costly.width(limit=100) for _ in range(200)] == [0] * 200  # and no probes: they would stall the batch
    alone = WidthScheduler((1, 2, 4), "auto", costs=CostModel(draft_cost=0.02, verify_cost={0: 0.08, 1: 0.09, 2: 0.1,
                                                                                              4: 0.12}),
                           acceptance=AcceptanceEstimate(prior=0.7), sharers=lambda: 1,
                           batch_cost=lambda model, rows: None)
    assert alone.width(limit=100) > 0  # one request alone: its own measured rounds, as before


def test_in_a_batch_requests_decide_with_the_shared_acceptance():
    """One request whose own estimate runs high must not speculate while its batch does not (its draft calls and
    verifications would split every round into two half-empty calls): in a batch the shared estimate decides."""
    table = {"target": lambda rows: 0.1 + 0.001 * rows, "draft": lambda rows: 0.01}
    costs = CostModel(draft_cost=0.01, verify_cost={0: 0.1, 2: 0.1, 4: 0.1})
    hopeful = WidthScheduler((2, 4), "auto", costs=costs, acceptance=AcceptanceEstimate(prior=0.95),
                             sharers=lambda: 3, batch_cost=lambda model, rows: table[model](rows),
                             shared_acceptance=lambda: 0.05)
    assert hopeful.width(limit=100) == 0
    hopeful.shared_acceptance = lambda: 0.9
    assert hopeful.width(limit=100) > 0


def test_auto_falls_back_to_plain_when_speculation_cannot_pay_and_probes_at_growing_intervals():
    scheduler = _measured(0.1, 0.5, {0: 1.0, 2: 1.2, 4: 1.5, 8: 2.0})
    widths = [scheduler.width(limit=100) for _ in range(120)]
    probes = [i for i, k in enumerate(widths) if k]
    assert probes == [15, 47, 111]  # after 16 plain rounds, then 32, then 64: the probes kept finding plain best
    assert set(widths[i] for i in probes) == {2}  # the smallest width: the cheapest probe


def test_a_probe_that_finds_speculation_paying_resets_the_probe_interval():
    costs = CostModel(draft_cost=0.05, verify_cost={0: 1.0, 2: 1.1, 4: 1.3, 8: 2.0})
    low = WidthScheduler((2, 4, 8), "auto", costs=costs, acceptance=AcceptanceEstimate(prior=0.1))
    for _ in range(48):
        low.width(limit=100)
    assert costs.probe_interval == 64  # two probes found plain decoding best
    high = WidthScheduler((2, 4, 8), "auto", costs=costs, acceptance=AcceptanceEstimate(prior=0.9))
    assert high.width(limit=100) > 0 and costs.probe_interval == 0
    widths = [low.width(limit=100) for _ in range(16)]
    assert widths.index(2) == 15  # plain again: the first probe comes after probe_every rounds again


def test_auto_needs_a_margin_over_plain_decoding():
    # a=0.5, k=2 with free drafting: 1.75 tokens per round for 1.68 -> 1.04x: inside the margin
    scheduler = _measured(0.5, 0.0, {0: 1.0, 2: 1.68})
    assert scheduler.width(limit=100, model_draft=False) == 0
    assert WidthScheduler((2,), "auto", costs=scheduler.costs, acceptance=AcceptanceEstimate(prior=0.5),
                          margin=0.0).width(limit=100, model_draft=False) == 2


def test_auto_weighs_the_drafts_catch_up_against_the_remaining_budget():
    costs = CostModel(draft_cost=0.05, catch_up_seconds=0.01, catch_up_tokens=1.0, verify_cost={0: 1.0, 2: 1.1, 4: 1.3})
    # a=0.8, k=4: 3.36 tokens for 1.5 -> 2.24x; over 10 tokens that saves 5.5 plain steps
    def choose(limit, lag):
        return WidthScheduler((2, 4), "auto", costs=costs, acceptance=AcceptanceEstimate(prior=0.8)).width(
            limit=limit, draft_lag=lag)
    assert choose(10, 2) == 4  # fed with the next draft step: free
    assert choose(10, 200) == 4  # 0.05 + 2.0 s to catch up: the saving pays for it twice (the safety factor)
    assert choose(10, 400) == 0  # 4.05 s: the saving pays for it only once
    assert choose(100, 400) == 4  # ...but 10 times over 100 tokens
    assert choose(10, 600) == 0 and choose(10, 600) == 0  # the same request keeps decoding plainly


def test_switching_from_plain_to_a_model_draft_needs_a_larger_promise_than_going_on():
    costs = CostModel(draft_cost=0.5, catch_up_seconds=0.001, catch_up_tokens=1.0, verify_cost={0: 1.0, 1: 1.13})
    # a=0.8, k=1: 1.8 tokens for 1.63 -> 1.10x: enough to go on speculating, not to start
    scheduler = WidthScheduler((1,), "auto", costs=costs, acceptance=AcceptanceEstimate(prior=0.8))
    assert scheduler.width(limit=100, draft_lag=2) == 0  # the draft has just read everything: still not a start
    assert scheduler.width(limit=100, model_draft=False) == 1  # a free draft needs no more than the margin
    scheduler.acceptance = AcceptanceEstimate(prior=0.95)  # 1.95 / 1.63 = 1.20x: worth the switch
    assert scheduler.width(limit=100, draft_lag=20) == 1 and scheduler.speculating
    scheduler.acceptance = AcceptanceEstimate(prior=0.8)
    assert scheduler.width(limit=100, draft_lag=2) == 1  # 1.10x: going on pays
    scheduler.acceptance = AcceptanceEstimate(prior=0.7)
    assert scheduler.width(limit=100, draft_lag=2) == 0 and not scheduler.speculating  # 1.04x: stop


def test_a_cheap_model_draft_starts_at_the_ordinary_margin():
    """A draft head costs 0.06 of a target step per token: a predicted 1.10x is enough to start it."""
    costs = CostModel(draft_cost=0.06, catch_up_seconds=0.0001, catch_up_tokens=1.0, verify_cost={0: 1.0, 1: 1.13})
    scheduler = WidthScheduler((1,), "auto", costs=costs, acceptance=AcceptanceEstimate(prior=0.315))
    # a=0.315, k=1: 1.315 tokens for 1.19 -> 1.105x
    assert scheduler.width(limit=100, draft_lag=2) == 1 and scheduler.speculating
    costs.draft_cost = 0.2  # the same promise from a costlier draft (a=0.47: 1.47 / 1.33 = 1.105x): no start
    scheduler.speculating = False
    scheduler.acceptance = AcceptanceEstimate(prior=0.47)
    assert scheduler.width(limit=100, draft_lag=2) == 0


def test_a_probe_is_skipped_when_the_draft_would_first_read_a_long_prompt():
    costs = CostModel(draft_cost=0.5, catch_up_seconds=0.05, catch_up_tokens=1.0, verify_cost={0: 1.0, 2: 1.2})
    scheduler = WidthScheduler((2,), "auto", costs=costs, acceptance=AcceptanceEstimate(prior=0.1))
    assert [scheduler.width(limit=100, draft_lag=1000) for _ in range(40)] == [0] * 40  # 50 s: never probed
    assert scheduler.width(limit=100, draft_lag=20) == 2  # 1.5 s: within 4 plain steps, the due probe runs


def test_auto_bootstraps_from_plain_and_one_width_then_respects_limit():
    scheduler = WidthScheduler((2, 4, 8), "auto")
    assert scheduler.width(limit=100) == 0  # plain decoding is priced first: everything is compared with it
    scheduler.costs.record_verify(0, 1.0)
    assert scheduler.width(limit=100) == 2  # a model draft: the smallest width is the cheapest to measure
    assert scheduler.width(limit=100, model_draft=False) == 8  # a free draft: the widest (it drafts what it finds)
    assert scheduler.width(limit=3) == 2  # only widths <= limit
    assert scheduler.width(limit=1) == 0
    scheduler.record(2, 2, 2, verify_seconds=1.1, draft_seconds=0.1, model_draft=True)
    assert scheduler.width(limit=100) == 8  # acceptance now 0.8; 8 priced along the line from 0 through 2


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
    assert long_run.value == pytest.approx((10 + 0.6 * 8) / (20 + 8))  # ...its totals do, once it ends (shrunk)
    assert long_run.start_request().prior == pytest.approx(long_run.value)
    few = LongRunAcceptance()
    probe = few.start_request()
    for _ in range(3):
        probe.record(proposed=1, accepted=1)
    few.update(probe)
    assert few.value < 0.75  # three accepted probes are not evidence of 100% acceptance


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


def test_a_width_the_drafter_never_fills_is_priced_from_the_sizes_it_does_fill():
    """The n-gram drafter may propose fewer than K tokens every time: the calls are priced as what they were."""
    scheduler = WidthScheduler((2, 4, 8), "auto", acceptance=AcceptanceEstimate(prior=0.9))
    chosen = []
    for _ in range(10):
        k = scheduler.width(limit=100, model_draft=False)
        chosen.append(k)
        proposed = min(k, 3)  # never more than 3 matching tokens
        scheduler.record(k, proposed, proposed, 1.0 + 0.01 * proposed, 0.0, model_draft=False)
    assert chosen[:2] == [0, 8] and set(chosen[2:]) == {8}
    assert set(scheduler.costs.verify_cost) == {0, 3}
    costs = CostModel(verify_cost={0: 1.0, 2: 1.2, 8: 2.4})
    assert costs.verify_estimate(4) == pytest.approx(1.6)  # between 2 and 8
    assert costs.verify_estimate(11) == pytest.approx(2.4 + 3 * 1.4 / 8)  # beyond: along the line from plain
    assert CostModel(verify_cost={2: 1.2}).verify_estimate(5) == pytest.approx(1.2 * 6 / 3)  # no plain: per token


def test_catch_up_cost_is_learned_per_token_beyond_one_draft_step():
    costs = CostModel(draft_cost=0.02)
    costs.record_catch_up(2, 0.5)  # fed with the next proposal step: not a catch-up call
    assert costs.catch_up_cost is None and costs.catch_up_estimate(2) == 0.0
    costs.record_catch_up(100, 0.22)
    assert costs.catch_up_cost == pytest.approx(0.002)
    assert costs.catch_up_estimate(50) == pytest.approx(0.02 + 0.1)
    for _ in range(5):  # many short, cheap catch-ups do not hide what a long read costs per token
        costs.record_catch_up(10, 0.02 + 0.005)
    costs.record_catch_up(400, 0.02 + 2.0)
    assert costs.catch_up_cost > 0.004


def test_forced_tokens_neither_lower_the_price_of_a_draft_step_nor_count_as_steps():
    scheduler = WidthScheduler((2, 4), "auto")
    costs = scheduler.costs
    scheduler.record(4, 4, 4, verify_seconds=1.0, draft_seconds=0.2, model_draft=True, draft_steps=2)  # 2 forced
    assert costs.draft_cost == pytest.approx(0.1)  # 0.2 s for the 2 tokens the draft model computed
    scheduler.record(4, 4, 4, verify_seconds=1.0, draft_seconds=0.001, model_draft=True, draft_steps=0)
    assert costs.draft_cost == pytest.approx(0.1)  # forced tokens only: no step priced, the draft is not free
    assert costs.steps_per_token == pytest.approx(0.7 * (0.7 * 1.0 + 0.3 * 0.5))  # EMA of 2/4 then 0/4
    assert costs.draft_estimate(4, True) == pytest.approx(4 * costs.steps_per_token * 0.1)  # forced tokens free
    assert costs.draft_estimate(0, True) == 0.0


def test_a_model_free_drafters_lookup_is_priced_per_round_and_can_make_auto_decline():
    costs = CostModel(verify_cost={0: 1.0, 4: 1.1})
    scheduler = WidthScheduler((2, 4), "auto", costs=costs, acceptance=AcceptanceEstimate(prior=0.9))
    assert scheduler.width(limit=100, model_draft=False) == 4  # unpriced lookups: a=0.9, 4.1 tokens for 1.1
    scheduler.record(4, 0, 0, verify_seconds=1.0, draft_seconds=3.0, model_draft=False)  # a miss costs its lookup
    assert costs.lookup_cost == pytest.approx(3.0) and costs.draft_cost is None
    assert costs.draft_estimate(2, False) == costs.draft_estimate(4, False) == pytest.approx(3.0)  # per round
    assert costs.draft_estimate(0, False) == 0.0
    assert scheduler.width(limit=100, model_draft=False) == 0  # 4.1 tokens for 4.1 s: plain decoding is faster
    costs.lookup_cost = 0.01  # a cheap lookup (an n-gram index) stays cheap
    assert scheduler.width(limit=100, model_draft=False) == 4


def test_sure_tokens_get_the_width_their_verification_cost_pays_for():
    """An aligned predicted output (`sure` tokens): the widest fitting width before any cost is known; then the width
    with the most expected tokens per second of verification (the gguf Qwen target's call costs on a 2-core AVX2
    CPU: 9 rows cost 4.6x one row), never more than the sure tokens or the budget; a fixed width is kept."""
    scheduler = WidthScheduler((1, 2, 3, 4, 6, 8), "auto")
    assert scheduler.width(100, model_draft=False, sure=50) == 8
    assert scheduler.width(100, model_draft=False, sure=5) == 4  # no more than the prediction offers
    assert scheduler.width(3, model_draft=False, sure=50) == 3  # nor the budget
    for k, ms in {0: 157, 1: 157, 2: 224, 3: 277, 4: 325, 6: 419, 8: 520}.items():
        scheduler.costs.record_verify(k, ms / 1000)
    # expected tokens at 0.9 per token per second of verification: k=4 4.10 / 0.325 s = 12.6 beats k=6 (12.45),
    # k=3 (12.42), k=1 and 2 (12.1) and k=8 (6.13 / 0.520 s = 11.8)
    assert scheduler.width(100, model_draft=False, sure=50) == 4
    cheap = WidthScheduler((1, 2, 4, 8), "auto")
    for k, ms in {0: 100, 1: 104, 2: 108, 4: 116, 8: 132}.items():  # memory-bound: rows nearly free
        cheap.costs.record_verify(k, ms / 1000)
    assert cheap.width(100, model_draft=False, sure=50) == 8
    assert WidthScheduler((1, 2, 4), 2).width(100, model_draft=False, sure=50) == 2
