"""Choosing the speculation width K each round.

Expected-speedup model (Leviathan et al. 2023): with per-token acceptance a, a round with width
k emits (1 - a^(k+1)) / (1 - a) tokens on average and costs k * c_draft + c_verify(k). `auto`
picks the width with the most expected tokens per second from measured costs and an acceptance
estimate, and falls back to k = 0 (plain decoding) when no width beats it.

- Costs (`CostModel`) are physical: one per drafter, shared by all requests of a Generator, updated
  by every round. They are charged only what the formula prices: one target call with k+1 tokens,
  and one draft step per proposed token (a draft catching up on plain rounds is not a draft step).
  A width measured long ago is measured again now and then, so one slow first call cannot exclude
  it forever.
- Acceptance is kept apart: each request has its own estimate (`AcceptanceEstimate`), seeded by a
  long-run estimate (`LongRunAcceptance`) that only `auto` requests of the same drafter and sampling
  settings update, so fixed-width runs (e.g. other benchmark configurations) never steer `auto`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from spectrt.errors import GenerationError


def expected_tokens_per_round(acceptance: float, k: int) -> float:
    """(1 - a^(k+1)) / (1 - a): mean tokens a width-k round emits (the accepted run plus one)."""
    if k == 0:
        return 1.0
    if acceptance >= 1.0:
        return float(k + 1)
    return (1.0 - acceptance ** (k + 1)) / (1.0 - acceptance)


def expected_speedup(acceptance: float, k: int, draft_cost: float, verify_cost: float, plain_cost: float) -> float:
    """Tokens/s of width k over tokens/s of plain decoding (costs in seconds per call)."""
    round_cost = k * draft_cost + verify_cost
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
    stale_after: int = 64  # rounds after which a width's cost is measured again, and the old value dropped
    draft_cost: float | None = None  # one draft decode step
    verify_cost: dict[int, float] = field(default_factory=dict)  # k -> one target call with k+1 tokens
    rounds: int = 0  # rounds recorded so far (the clock of `measured_at`)
    measured_at: dict[int, int] = field(default_factory=dict)  # k -> value of `rounds` when last measured
    plain_choices: int = 0  # times `auto` chose plain decoding (every probe_every-th is a probe instead)

    def _ema(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.smoothing) * old + self.smoothing * new

    def record_verify(self, k: int, seconds: float) -> None:
        old = None if self.age(k) >= self.stale_after else self.verify_cost.get(k)  # stale: start afresh
        self.rounds += 1
        self.verify_cost[k] = self._ema(old, seconds)
        self.measured_at[k] = self.rounds

    def record_draft(self, steps: int, seconds: float) -> None:
        """`steps` draft decode steps took `seconds` (catch-up excluded)."""
        if steps:
            self.draft_cost = self._ema(self.draft_cost, seconds / steps)

    def verify_estimate(self, k: int) -> float:
        """Cost of a verify call with k+1 tokens: measured, else interpolated from the measured call sizes
        (an n-gram drafter may never fill width k), else scaled linearly from the largest smaller one."""
        if k in self.verify_cost:
            return self.verify_cost[k]
        below = [n for n in self.verify_cost if n < k]
        above = [n for n in self.verify_cost if n > k]
        if below and above:
            lo, hi = max(below), min(above)
            weight = (k - lo) / (hi - lo)
            return (1 - weight) * self.verify_cost[lo] + weight * self.verify_cost[hi]
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
    """Acceptance over past requests (each request's totals, older requests decayed): the prior of the next."""

    default: float = 0.6
    decay: float = 0.9  # per request
    accepted: float = 0.0
    trials: float = 0.0

    @property
    def value(self) -> float:
        return self.accepted / self.trials if self.trials > 0 else self.default

    def update(self, request: AcceptanceEstimate) -> None:
        if request.trial_total:
            self.accepted = self.decay * self.accepted + request.accepted_total
            self.trials = self.decay * self.trials + request.trial_total

    def start_request(self) -> AcceptanceEstimate:
        return AcceptanceEstimate(prior=self.value)


class WidthScheduler:
    """`fixed` K, or `auto`: measure, then pick the best expected tokens/s (0 = plain decoding)."""

    def __init__(self, built_widths: tuple[int, ...], width: str | int = "auto", *, probe_every: int = 16,
                 costs: CostModel | None = None,
                 acceptance: AcceptanceEstimate | None = None):
        self.built = tuple(sorted(built_widths))
        self.costs = costs or CostModel()
        self.acceptance = acceptance or AcceptanceEstimate()
        self.probe_every = probe_every
        self.last_width: int | None = None  # the width chosen for the latest round
        if width == "auto":
            self.fixed = None
        else:
            k = int(width)
            if k != 0 and k not in self.built:
                raise GenerationError(f"width {k} was not built into this bundle; built widths: "
                                      f"{', '.join(map(str, self.built))} (or 0 for plain decoding, or auto).")
            self.fixed = k

    def _unmeasured(self, model_draft: bool) -> list[int]:
        missing = [k for k in [0, *self.built] if k not in self.costs.verify_cost and k not in self.costs.measured_at]
        if model_draft and self.costs.draft_cost is None and self.built:
            missing.append(self.built[0])
        return missing

    def width(self, limit: int, model_draft: bool = True) -> int:
        """Width for the next round, at most `limit` (remaining budget / context)."""
        self.last_width = self._choose(limit, model_draft)
        return self.last_width

    def _choose(self, limit: int, model_draft: bool) -> int:
        if self.fixed is not None:
            return min(self.fixed, limit)  # the ONNX Runtime graph takes any K+1 length
        candidates = [k for k in self.built if k <= limit]
        if not candidates:
            return 0
        missing = [k for k in self._unmeasured(model_draft) if k == 0 or k in candidates]
        if missing:  # measure every width once first (widest first: it is the one that may pay most)
            return max(missing)
        stalest = max([0, *candidates], key=self.costs.age)
        if self.costs.age(stalest) >= self.costs.stale_after:  # not measured for a while: measure it again
            return stalest
        best_k, best_speed = 0, 1.0
        plain = self.costs.verify_estimate(0)
        draft = (self.costs.draft_cost or 0.0) if model_draft else 0.0
        for k in candidates:
            speed = expected_speedup(self.acceptance.value, k, draft, self.costs.verify_estimate(k), plain)
            if speed > best_speed:
                best_k, best_speed = k, speed
        if best_k == 0:  # re-check acceptance now and then (counted across requests: short ones too)
            self.costs.plain_choices += 1
            if self.costs.plain_choices % self.probe_every == 0:
                return candidates[0]
        return best_k

    def record(self, k: int, proposed: int, accepted: int, verify_seconds: float, draft_seconds: float,
               model_draft: bool) -> None:
        """Feed one round's measurements back: the target call had proposed+1 tokens."""
        self.costs.record_verify(proposed, verify_seconds)
        if proposed != k:
            self.costs.mark_attempted(k)
        if model_draft:
            self.costs.record_draft(proposed, draft_seconds)
        self.acceptance.record(proposed, accepted)
