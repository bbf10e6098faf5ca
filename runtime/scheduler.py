"""Choosing the speculation width K each round.

Expected-speedup model (Leviathan et al. 2023): with per-token acceptance a, a round with width
k emits (1 - a^(k+1)) / (1 - a) tokens on average and costs k * c_draft + c_verify(k). `auto`
picks the width with the most expected tokens per second from measured costs and an acceptance
estimate, and falls back to k = 0 (plain decoding) unless a width beats it by a margin.

- Costs (`CostModel`) are physical: one per drafter, shared by all requests of a Generator, updated
  by every round. A round is charged what the formula prices: the round without its drafting (target
  call with k+1 tokens, acceptance, commit; plain rounds the same way) and its drafting: for a model
  drafter, one draft step per token the model computed (grammar-forced tokens cost no step, so they
  neither lower the price of a step nor count as steps), for a model-free drafter (n-gram lookup, grammar
  forcing) one lookup per round, whatever its width. A draft reading tokens it has not seen (the prompt,
  or after plain rounds) is priced apart, as the cost of switching from plain decoding to speculation.
- Acceptance is kept apart: each request has its own estimate (`AcceptanceEstimate`), seeded by a
  long-run estimate (`LongRunAcceptance`) that only `auto` requests of the same drafter and sampling
  settings update, so fixed-width runs (e.g. other benchmark configurations) never steer `auto`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from spectrt.runtime.errors import GenerationError


SURE_ACCEPTANCE = 0.9  # per-token acceptance assumed for a drafter's sure tokens (an aligned predicted output)


def expected_tokens_per_round(acceptance: float, k: int) -> float:
    """(1 - a^(k+1)) / (1 - a): mean tokens a width-k round emits (the accepted run plus one)."""
    if k == 0:
        return 1.0
    if acceptance >= 1.0:
        return float(k + 1)
    return (1.0 - acceptance ** (k + 1)) / (1.0 - acceptance)


def expected_speedup(acceptance: float, k: int, draft_cost: float, verify_cost: float, plain_cost: float) -> float:
    """Tokens/s of width k over tokens/s of plain decoding (costs in seconds per call)."""
    return round_speedup(acceptance, k, k * draft_cost + verify_cost, plain_cost)


def round_speedup(acceptance: float, k: int, round_cost: float, plain_cost: float) -> float:
    """Tokens/s of width-k rounds costing `round_cost` seconds each (drafting included) over plain decoding's."""
    return expected_tokens_per_round(acceptance, k) * plain_cost / round_cost


def acceptance_from_mean_accepted(mean_accepted: float, k: int) -> float:
    """Invert E[accepted] = a (1 - a^k) / (1 - a) for a (bisection); used to report the per-token rate."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        value = sum(mid ** i for i in range(1, k + 1))
        lo, hi = (mid, hi) if value < mean_accepted else (lo, mid)
    return (lo + hi) / 2


@dataclass
class CostModel:
    """Running (EMA) estimates of per-call costs in seconds, and when each width was last measured."""

    smoothing: float = 0.3
    stale_after: int = 64  # rounds after which a width next to the chosen one is measured again (old value dropped)
    draft_cost: float | None = None  # one draft model step (grammar-forced tokens take none)
    steps_per_token: float = 1.0  # draft model steps per proposed token (below 1 where the grammar forces tokens)
    lookup_cost: float | None = None  # one drafting round of a model-free drafter (n-gram lookup, grammar matcher
    # fork and forced runs), whatever its width
    catch_up_seconds: float = 0.0  # decayed sums of catch-up calls (their time beyond one draft step, and the
    catch_up_tokens: float = 0.0  # tokens read): token-weighted, since long reads cost more per token than short
    # ones (attention over a longer prefix) and must count more
    verify_cost: dict[int, float] = field(default_factory=dict)  # k -> one round without its drafting (target call
    # with k+1 tokens, acceptance, commit): plain decoding (k = 0) is priced the same way
    rounds: int = 0  # rounds recorded so far (the clock of `measured_at`)
    measured_at: dict[int, int] = field(default_factory=dict)  # k -> value of `rounds` when last measured
    plain_choices: int = 0  # rounds for which `auto` chose plain decoding (the clock of probes)
    next_probe: int = 0  # value of `plain_choices` at which plain decoding is next interrupted by a probe
    probe_interval: int = 0  # plain choices between probes (0: not started); doubles while probes do not pay

    def _ema(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.smoothing) * old + self.smoothing * new

    def record_verify(self, k: int, seconds: float) -> None:
        old = None if self.age(k) >= self.stale_after else self.verify_cost.get(k)  # stale: start afresh
        self.rounds += 1
        self.verify_cost[k] = self._ema(old, seconds)
        self.measured_at[k] = self.rounds

    def record_draft(self, steps: int, seconds: float, proposed: int | None = None, model_draft: bool = True) -> None:
        """A drafting round (width >= 1, catch-up excluded) took `seconds` and proposed `proposed` tokens (default:
        one per step), `steps` of them computed by the draft model. A model draft is priced per step: a round of
        forced tokens only (no step) leaves the step price alone and counts in `steps_per_token` only. A model-free
        drafter is priced per round, misses included."""
        if not model_draft:
            self.lookup_cost = self._ema(self.lookup_cost, seconds)
            return
        proposed = steps if proposed is None else proposed
        if steps:
            self.draft_cost = self._ema(self.draft_cost, seconds / steps)
        if proposed:
            self.steps_per_token = self._ema(self.steps_per_token, steps / proposed)

    def record_catch_up(self, tokens: int, seconds: float) -> None:
        """The draft read `tokens` committed tokens it had not seen (after plain rounds, or the prompt) in `seconds`."""
        if tokens > 2:  # 1 or 2 are fed with the next proposal step at no extra call
            keep = 1 - self.smoothing
            self.catch_up_seconds = keep * self.catch_up_seconds + max(0.0, seconds - (self.draft_cost or 0.0))
            self.catch_up_tokens = keep * self.catch_up_tokens + tokens

    @property
    def catch_up_cost(self) -> float | None:
        """Seconds per token a draft reads in one catch-up call, beyond one draft step (None: none measured)."""
        return self.catch_up_seconds / self.catch_up_tokens if self.catch_up_tokens else None

    def catch_up_estimate(self, tokens: int) -> float:
        """Seconds for the draft to read `tokens` unseen committed tokens before it can propose (0 if none or cheap)."""
        if tokens <= 2 or self.draft_cost is None:
            return 0.0
        return self.draft_cost + (self.catch_up_cost or 0.0) * tokens

    def draft_estimate(self, k: int, model_draft: bool) -> float:
        """Drafting seconds of a width-k round: the draft model's expected steps (forced tokens are free), or a
        model-free drafter's lookup (0 while unmeasured)."""
        if k == 0:
            return 0.0
        if model_draft:
            return k * self.steps_per_token * (self.draft_cost or 0.0)
        return self.lookup_cost or 0.0

    def verify_estimate(self, k: int) -> float:
        """Cost of a round with k+1 tokens: measured, else interpolated between the measured call sizes (an n-gram
        drafter may never fill width k), else extended along the line from plain decoding through the widest
        measured size (or, without a plain measurement, scaled linearly in tokens)."""
        if k in self.verify_cost:
            return self.verify_cost[k]
        below = [n for n in self.verify_cost if n < k]
        above = [n for n in self.verify_cost if n > k]
        if below and above:
            lo, hi = max(below), min(above)
            weight = (k - lo) / (hi - lo)
            return (1 - weight) * self.verify_cost[lo] + weight * self.verify_cost[hi]
        if below and 0 in self.verify_cost and max(below) > 0:
            widest = max(below)
            slope = max(0.0, self.verify_cost[widest] - self.verify_cost[0]) / widest
            return self.verify_cost[widest] + slope * (k - widest)
        nearest = max(below) if below else min(above)
        return self.verify_cost[nearest] * (k + 1) / (nearest + 1)

    def mark_attempted(self, k: int) -> None:
        """Width k was asked for but the call had another size: k counts as measured (by estimate) now."""
        self.measured_at[k] = self.rounds

    def age(self, k: int) -> int:
        """Rounds recorded since width k was last measured (costs given up front count as measured at 0)."""
        return self.rounds - self.measured_at.get(k, 0)


@dataclass
class AcceptanceEstimate:
    """One request's per-token acceptance: decayed accepted / judged proposals, shrunk towards a prior."""

    prior: float = 0.6  # from the long-run estimate, or a neutral guess
    prior_weight: float = 2.0  # the prior counts as this many trials
    decay: float = 0.8  # per round: recent rounds count most (window of ~5 rounds)
    accepted_count: float = 0.0
    trial_count: float = 0.0  # accepted + first rejected
    accepted_total: int = 0  # undecayed, for the long-run estimate
    trial_total: int = 0

    @property
    def value(self) -> float:
        return (self.accepted_count + self.prior * self.prior_weight) / (self.trial_count + self.prior_weight)

    def record(self, proposed: int, accepted: int) -> None:
        """Positions 1..accepted were accepted, position accepted+1 (if any) rejected."""
        if proposed == 0:
            return
        trials = accepted + (1 if accepted < proposed else 0)
        self.accepted_count = self.decay * self.accepted_count + accepted
        self.trial_count = self.decay * self.trial_count + trials
        self.accepted_total += accepted
        self.trial_total += trials


@dataclass
class LongRunAcceptance:
    """Acceptance over past requests (each request's totals, older requests decayed), shrunk towards `default`:
    the prior of the next request. Shrinking matters: a request that only probed now and then judged a handful of
    tokens, and three accepted probes must not make the next request start as if every proposal were accepted."""

    default: float = 0.6
    default_weight: float = 8.0  # the default counts as this many judged tokens
    decay: float = 0.9  # per request
    accepted: float = 0.0
    trials: float = 0.0

    @property
    def value(self) -> float:
        return (self.accepted + self.default * self.default_weight) / (self.trials + self.default_weight)

    def update(self, request: AcceptanceEstimate) -> None:
        if request.trial_total:
            self.accepted = self.decay * self.accepted + request.accepted_total
            self.trials = self.decay * self.trials + request.trial_total

    def start_request(self) -> AcceptanceEstimate:
        return AcceptanceEstimate(prior=self.value)


class WidthScheduler:
    """`fixed` K, or `auto`: the width with the best expected tokens/s (0 = plain decoding).

    `auto` in detail:
    - Bootstrap: one plain round and one speculative round (the smallest width for a model draft, the cheapest
      to measure; the widest for a model-free one, whose lookup costs the same at any width) price the rest:
      other widths are interpolated or extended from them and measured only when chosen.
    - Speculation is chosen only if its expected speed-up is at least 1 + `margin` (estimates are noisy, and a
      wrong switch costs more than a missed one). To switch from plain decoding to a model draft, it must promise
      at least 1 + `start_margin`, and when the draft must first read tokens it has not seen (the prompt, or the
      output of plain rounds) the expected saving over the remaining budget must pay `switch_safety` times for
      that catch-up: a few accepted probes make the acceptance estimate jump, and a speed-up of a few percent
      predicted from them was measured as a loss (Qwen2.5-Coder 1.5B int4 with its 0.5B draft on 2 cores: `auto`
      7-12% slower than plain decoding on chat prompts without the start margin, 8% on extraction prompts when
      a 1 s read of a 200-token prompt was priced from short catch-ups and paid only once). A cheap model
      drafter (a draft token costs at most `cheap_draft` of a plain step, e.g. a trained draft head) starts at
      the ordinary margin: a wrong start costs it little (with the start margin, a head at 38% acceptance, a
      predicted and measured 1.16-1.19x at width 1, stayed at plain decoding in two thirds of the rounds).
    - While plain decoding is chosen, a probe with the smallest width now and then refreshes the acceptance
      estimate: after `probe_every` plain rounds, then at doubling intervals (up to `max_probe_interval`) while
      probes do not turn speculation on; never when the draft's catch-up would cost more than `probe_budget`
      plain rounds.
    - The widths next to the chosen one, and plain decoding (the baseline), are measured again when their cost
      is older than `stale_after` rounds (costs drift as the context grows, and one slow call must not exclude a
      width for good); far widths are not (each such measurement is a round at a width that does not pay).
    """

    def __init__(self, built_widths: tuple[int, ...], width: str | int = "auto", *, probe_every: int = 16,
                 max_probe_interval: int = 256, probe_budget: float = 4.0, margin: float = 0.05,
                 start_margin: float = 0.15, switch_safety: float = 2.0, cheap_draft: float = 0.15,
                 costs: CostModel | None = None, acceptance: AcceptanceEstimate | None = None,
                 sharers: Callable[[], int] | None = None,
                 batch_cost: Callable[[str, int], float | None] | None = None,
                 shared_acceptance: Callable[[], float] | None = None):
        self.built = tuple(sorted(built_widths))
        self.sharers = sharers  # requests decoding together in one batch (None: this one alone)
        self.batch_cost = batch_cost  # (model, rows of one call) -> its measured seconds in the batch loop, or None
        # the acceptance a batch's requests with this drafter decide with alike (the long-run estimate): one request
        # speculating while the others do not splits every round into two half-empty calls
        self.shared_acceptance = shared_acceptance
        self.costs = costs or CostModel()
        self.acceptance = acceptance or AcceptanceEstimate()
        self.probe_every = probe_every
        self.max_probe_interval = max_probe_interval
        self.probe_budget = probe_budget
        self.margin = margin
        self.start_margin = start_margin
        self.switch_safety = switch_safety
        self.cheap_draft = cheap_draft
        self.last_width: int | None = None  # the width chosen for the latest round
        self.speculating = False  # the latest round speculated because it paid (not a probe, not a re-measurement)
        if width == "auto":
            self.fixed = None
        else:
            k = int(width)
            if k != 0 and k not in self.built:
                raise GenerationError(f"width {k} was not built into this bundle; built widths: "
                                      f"{', '.join(map(str, self.built))} (or 0 for plain decoding, or auto).")
            self.fixed = k

    def width(self, limit: int, model_draft: bool = True, draft_lag: int = 0, sure: int = 0) -> int:
        """Width for the next round, at most `limit` (remaining budget / context); `draft_lag`: committed tokens
        the draft has not read yet; `sure`: tokens the drafter all but knows (an aligned predicted output), which
        `auto` verifies at the widest built width that fits them."""
        fitting = [k for k in self.built if k <= min(sure, limit)]
        if self.fixed is None and fitting:
            self.last_width = self._sure_width(fitting)
        else:
            self.last_width = self._choose(limit, model_draft, draft_lag)
        return self.last_width

    def _sure_width(self, fitting: list[int]) -> int:
        """The width for tokens a drafter all but knows: the most expected tokens per second of verification at
        SURE_ACCEPTANCE, from the measured call costs (a wide call can cost more than its tokens are worth: on a
        2-core AVX2 CPU a 9-row call of the gguf Qwen target took 4.6x a 1-row call); the widest before any are
        measured."""
        costs = self.costs
        if 0 not in costs.verify_cost or not any(k > 0 for k in costs.verify_cost):
            return fitting[-1]
        return max(fitting, key=lambda k: expected_tokens_per_round(SURE_ACCEPTANCE, k) / costs.verify_estimate(k))

    def _choose(self, limit: int, model_draft: bool, draft_lag: int) -> int:
        if self.fixed is not None:
            return min(self.fixed, limit)  # the ONNX Runtime graph takes any K+1 length
        costs = self.costs
        candidates = [k for k in self.built if k <= limit]
        if not candidates:
            return 0
        if 0 not in costs.verify_cost:
            return 0
        if not any(k > 0 for k in costs.verify_cost) or (model_draft and costs.draft_cost is None):
            return candidates[0] if model_draft else candidates[-1]
        plain = costs.verify_estimate(0)
        sharers = max(1, self.sharers()) if self.sharers is not None else 1
        speeds = self._batch_speeds(sharers, candidates, model_draft) if sharers > 1 else None
        if speeds is None:
            # In a batch every request waits for the batch's calls, so what one request's speculation adds to a round
            # (its draft steps, its extra rows in the target call) delays all `sharers` requests: priced n times, the
            # round pays only if the batch as a whole emits more tokens per second (n = 1: the request's own speed).
            speeds = {k: round_speedup(self.acceptance.value, k, plain + sharers * max(
                          0.0, costs.draft_estimate(k, model_draft) + costs.verify_estimate(k) - plain), plain)
                      for k in candidates}
        best_k = max(candidates, key=lambda k: speeds[k])
        # the draft's catch-up (a call of every token it missed) runs alone in a batch: it stalls all n requests
        switch_cost = sharers * costs.catch_up_estimate(draft_lag) if model_draft else 0.0
        saving = limit * plain * (1.0 - 1.0 / speeds[best_k]) if speeds[best_k] > 0 else 0.0
        costly = model_draft and (costs.draft_cost or 0.0) > self.cheap_draft * plain  # must promise more to start
        needed = 1.0 + (self.start_margin if costly and not self.speculating else self.margin)
        if speeds[best_k] < needed or saving < self.switch_safety * switch_cost:
            self.speculating = False
            if sharers > 1:  # no probes in a batch: a probe's catch-up and lone draft calls stall every request
                return 0  # (measured on the Qwen pair, 2 requests: 12.0 tok/s with probes, 19.7 plain batched)
            return self._plain_or_probe(candidates[0], plain, switch_cost)
        self.speculating = True
        costs.probe_interval = 0  # speculation pays: probes start afresh when it stops paying
        return self._stale_neighbour(best_k, [0, *candidates])

    def _batch_speeds(self, sharers: int, candidates: list[int], model_draft: bool) -> dict[int, float] | None:
        """Speed of width-k rounds over plain ones for a batch of `sharers` requests that all speculate alike (at the
        shared acceptance, so they decide alike), from the batch loop's measured call costs: a plain round is one
        target call of n rows for n tokens; a width-k round is k draft calls of n rows (model drafts; a lookup costs
        next to nothing) and a target call of n(k+1) rows for n E(k) tokens. None until the costs it needs were
        measured."""
        if self.batch_cost is None:
            return None
        plain = self.batch_cost("target", sharers)
        draft_step = self.batch_cost("draft", sharers) if model_draft else 0.0
        if draft_step is None and model_draft:
            draft_step = self.costs.draft_cost
        if not plain or draft_step is None:
            return None
        lookup = 0.0 if model_draft else (self.costs.lookup_cost or 0.0)
        acceptance = self.shared_acceptance() if self.shared_acceptance is not None else self.acceptance.value
        speeds = {}
        for k in candidates:
            verify = self.batch_cost("target", sharers * (k + 1))
            if verify is None:
                return None
            speeds[k] = expected_tokens_per_round(acceptance, k) * plain / (k * draft_step + lookup + verify)
        return speeds

    def _plain_or_probe(self, probe_width: int, plain_cost: float, switch_cost: float) -> int:
        costs = self.costs
        if costs.probe_interval == 0:  # plain decoding starts now: the first probe after probe_every rounds
            costs.probe_interval = self.probe_every
            costs.next_probe = costs.plain_choices + self.probe_every
        costs.plain_choices += 1
        if costs.plain_choices < costs.next_probe or switch_cost > self.probe_budget * plain_cost:
            return 0
        costs.probe_interval = min(2 * costs.probe_interval, self.max_probe_interval)
        costs.next_probe = costs.plain_choices + costs.probe_interval
        return probe_width

    def _stale_neighbour(self, best_k: int, widths: list[int]) -> int:
        """best_k, or a width next to it whose cost is stale (the older one first)."""
        at = widths.index(best_k)
        neighbours = {0, *widths[max(0, at - 1) : at], *widths[at + 1 : at + 2]} - {best_k}  # plain: the baseline
        stalest = max(sorted(neighbours), key=self.costs.age, default=best_k)
        return stalest if self.costs.age(stalest) >= self.costs.stale_after else best_k

    def record(self, k: int, proposed: int, accepted: int, verify_seconds: float, draft_seconds: float,
               model_draft: bool, catch_up: tuple[int, float] = (0, 0.0), draft_steps: int | None = None,
               sure: bool = False) -> None:
        """Feed one round's measurements back: the round (without drafting) took verify_seconds for a target
        call with proposed+1 tokens, its drafting draft_seconds; `catch_up`: (tokens, seconds) the draft read
        before proposing; `draft_steps`: the draft model's steps (default: one per proposed token for a model
        draft; grammar-forced tokens take none); `sure`: the width was chosen for tokens the drafter was sure of
        (their acceptance says nothing about the drafter's other rounds, which the estimate prices)."""
        self.costs.record_verify(proposed, verify_seconds)
        if proposed != k:
            self.costs.mark_attempted(k)
        if model_draft:
            self.costs.record_catch_up(*catch_up)
        if k:
            steps = proposed if draft_steps is None else draft_steps
            self.costs.record_draft(steps if model_draft else 0, draft_seconds, proposed, model_draft)
        if not sure:
            self.acceptance.record(proposed, accepted)
