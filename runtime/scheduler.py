"""Choosing the speculation width K each round.

Expected-speedup model (Leviathan et al. 2023): with per-token acceptance a, a round with width
k emits (1 - a^(k+1)) / (1 - a) tokens on average and costs k * c_draft + c_verify(k). `auto`
picks the width with the most expected tokens per second from measured costs and a running
acceptance estimate, and falls back to k = 0 (plain decoding) when no width beats it. While in
plain mode it probes the smallest width now and then, so it can come back when acceptance rises.
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
    """Running (EMA) estimates of per-call costs in seconds and of per-token acceptance."""

    smoothing: float = 0.3
    draft_cost: float | None = None  # one draft decode step
    verify_cost: dict[int, float] = field(default_factory=dict)  # k -> one target call with k+1 tokens
    prior_acceptance: float = 0.6  # used until proposals have been measured
    prior_weight: float = 2.0  # the prior counts as this many trials
    decay: float = 0.8  # per round: recent rounds count most (window of ~5 rounds)
    accepted_count: float = 0.0  # decayed count of accepted proposals
    trial_count: float = 0.0  # decayed count of proposals judged (accepted + first rejected)

    def _ema(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.smoothing) * old + self.smoothing * new

    def record_verify(self, k: int, seconds: float) -> None:
        self.verify_cost[k] = self._ema(self.verify_cost.get(k), seconds)

    def record_draft(self, steps: int, seconds: float) -> None:
        if steps:
            self.draft_cost = self._ema(self.draft_cost, seconds / steps)

    @property
    def acceptance(self) -> float:
        """Per-token acceptance estimate: decayed accepted / judged proposals, shrunk towards the prior."""
        return ((self.accepted_count + self.prior_acceptance * self.prior_weight)
                / (self.trial_count + self.prior_weight))

    def record_acceptance(self, proposed: int, accepted: int) -> None:
        """Update from one round: positions 1..accepted were accepted, position accepted+1 (if any) rejected."""
        if proposed == 0:
            return
        self.accepted_count = self.decay * self.accepted_count + accepted
        self.trial_count = self.decay * self.trial_count + accepted + (1 if accepted < proposed else 0)


class WidthScheduler:
    """`fixed` K, or `auto`: measure, then pick the best expected tokens/s (0 = plain decoding)."""

    def __init__(self, built_widths: tuple[int, ...], width: str | int = "auto", *, probe_every: int = 16,
                 costs: CostModel | None = None):
        self.built = tuple(sorted(built_widths))
        self.costs = costs or CostModel()
        self.probe_every = probe_every
        self._plain_rounds = 0
        if width == "auto":
            self.fixed = None
        else:
            k = int(width)
            if k != 0 and k not in self.built:
                raise GenerationError(f"width {k} was not built into this bundle; built widths: "
                                      f"{', '.join(map(str, self.built))} (or 0 for plain decoding, or auto).")
            self.fixed = k

    def _unmeasured(self, model_draft: bool) -> list[int]:
        needed = [0, *self.built]
        missing = [k for k in needed if k not in self.costs.verify_cost]
        if model_draft and self.costs.draft_cost is None and self.built:
            missing.append(self.built[0])
        return missing

    def width(self, limit: int, model_draft: bool = True) -> int:
        """Width for the next round, at most `limit` (remaining budget / context)."""
        if self.fixed is not None:
            return min(self.fixed, limit)  # the ONNX Runtime graph takes any K+1 length
        candidates = [k for k in self.built if k <= limit]
        if not candidates:
            return 0
        missing = [k for k in self._unmeasured(model_draft) if k == 0 or k in candidates]
        if missing:  # measure every width once first (widest first: it is the one that may pay most)
            return max(missing)
        best_k, best_speed = 0, 1.0
        plain = self.costs.verify_cost[0]
        draft = (self.costs.draft_cost or 0.0) if model_draft else 0.0
        for k in candidates:
            speed = expected_speedup(self.costs.acceptance, k, draft, self.costs.verify_cost[k], plain)
            if speed > best_speed:
                best_k, best_speed = k, speed
        if best_k == 0:
            self._plain_rounds += 1
            if self._plain_rounds % self.probe_every == 0:  # re-check acceptance now and then
                return candidates[0]
        return best_k
