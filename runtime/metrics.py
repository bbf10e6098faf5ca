"""Per-request and aggregated measurements of a speculative run."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


@dataclass
class RequestMetrics:
    """Filled in by the loop; read with the properties or `to_json()`."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    rounds: int = 0
    fallback_rounds: int = 0  # rounds at k = 0 (plain decoding)
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    accepted_length_histogram: Counter = field(default_factory=Counter)  # accepted count per speculative round
    width_histogram: Counter = field(default_factory=Counter)  # k per round
    proposed_at_position: Counter = field(default_factory=Counter)  # position (1-based) -> proposals there
    accepted_at_position: Counter = field(default_factory=Counter)
    rejected_spans: list[tuple[int, int]] = field(default_factory=list)  # (output index of first rejected, length)
    prefill_seconds: float = 0.0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    total_seconds: float = 0.0
    time_to_first_token: float | None = None
    token_latencies: list[float] = field(default_factory=list)  # seconds between consecutive emitted tokens

    def record_round(self, k: int, proposed: int, accepted: int, output_index: int, draft_s: float, verify_s: float) -> None:
        """One draft-verify round: `proposed` drafted, `accepted` kept; output_index = where the round's tokens start."""
        self.rounds += 1
        self.width_histogram[k] += 1
        self.draft_seconds += draft_s
        self.verify_seconds += verify_s
        if proposed == 0:
            self.fallback_rounds += 1
            return
        self.drafted_tokens += proposed
        self.accepted_tokens += accepted
        self.accepted_length_histogram[accepted] += 1
        for position in range(1, proposed + 1):
            self.proposed_at_position[position] += 1
            if position <= accepted:
                self.accepted_at_position[position] += 1
        if accepted < proposed:
            self.rejected_spans.append((output_index + accepted, proposed - accepted))

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else None

    @property
    def mean_accepted_length(self) -> float | None:
        speculative = self.rounds - self.fallback_rounds
        return self.accepted_tokens / speculative if speculative else None

    @property
    def tokens_per_round(self) -> float | None:
        return self.generated_tokens / self.rounds if self.rounds else None

    @property
    def tokens_per_second(self) -> float | None:
        decode = self.total_seconds - self.prefill_seconds
        return (self.generated_tokens - 1) / decode if self.generated_tokens > 1 and decode > 0 else None

    @property
    def end_to_end_tokens_per_second(self) -> float | None:
        return self.generated_tokens / self.total_seconds if self.total_seconds > 0 else None

    def per_position_acceptance(self) -> dict[int, float]:
        return {p: self.accepted_at_position[p] / n for p, n in sorted(self.proposed_at_position.items())}

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "rounds": self.rounds,
            "fallback_rounds": self.fallback_rounds,
            "drafted_tokens": self.drafted_tokens,
            "accepted_tokens": self.accepted_tokens,
            "acceptance_rate": self.acceptance_rate,
            "mean_accepted_length": self.mean_accepted_length,
            "tokens_per_round": self.tokens_per_round,
            "accepted_length_histogram": {str(k): v for k, v in sorted(self.accepted_length_histogram.items())},
            "width_histogram": {str(k): v for k, v in sorted(self.width_histogram.items())},
            "per_position_acceptance": {str(k): v for k, v in self.per_position_acceptance().items()},
            "rejected_spans": [list(span) for span in self.rejected_spans],
            "rejected_tokens": sum(length for _, length in self.rejected_spans),
            "prefill_seconds": self.prefill_seconds,
            "draft_seconds": self.draft_seconds,
            "verify_seconds": self.verify_seconds,
            "total_seconds": self.total_seconds,
            "time_to_first_token": self.time_to_first_token,
            "token_latency_p50": percentile(self.token_latencies, 50),
            "token_latency_p95": percentile(self.token_latencies, 95),
            "token_latency_p99": percentile(self.token_latencies, 99),
            "tokens_per_second": self.tokens_per_second,
            "end_to_end_tokens_per_second": self.end_to_end_tokens_per_second,
        }


@dataclass
class AggregateMetrics:
    """Sums over requests (rates recomputed from the sums; latency percentiles over all tokens)."""

    requests: list[RequestMetrics] = field(default_factory=list)

    def add(self, metrics: RequestMetrics) -> None:
        self.requests.append(metrics)

    def to_json(self) -> dict[str, Any]:
        total = RequestMetrics()
        for m in self.requests:
            for name in ("prompt_tokens", "generated_tokens", "rounds", "fallback_rounds", "drafted_tokens",
                         "accepted_tokens", "prefill_seconds", "draft_seconds", "verify_seconds", "total_seconds"):
                setattr(total, name, getattr(total, name) + getattr(m, name))
            for name in ("accepted_length_histogram", "width_histogram", "proposed_at_position", "accepted_at_position"):
                getattr(total, name).update(getattr(m, name))
            total.rejected_spans.extend(m.rejected_spans)
            total.token_latencies.extend(m.token_latencies)
        data = total.to_json()
        ttfts = [m.time_to_first_token for m in self.requests if m.time_to_first_token is not None]
        data["requests"] = len(self.requests)
        data["time_to_first_token"] = percentile(ttfts, 50)
        data["time_to_first_token_p95"] = percentile(ttfts, 95)
        decode_seconds = sum(m.total_seconds - m.prefill_seconds for m in self.requests)
        decode_tokens = sum(max(m.generated_tokens - 1, 0) for m in self.requests)
        data["tokens_per_second"] = decode_tokens / decode_seconds if decode_seconds > 0 else None
        data.pop("rejected_spans")
        return data
