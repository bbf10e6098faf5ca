"""Per-request and aggregated measurements of a speculative run.

Definitions (all times in seconds, measured by the generator, never including time the caller
spends between chunks of a stream, so a slow consumer does not inflate them):

- queue_seconds: waiting for the Generator (another request held it).
- prefill_seconds: the target's prompt prefill plus the drafter's own prefill (only the prompt tokens
  not already cached: reused_prompt_tokens rows are kept from an earlier request).
- time_to_first_token (TTFT): request start (after the queue) -> first token ready.
- decode_seconds: first token ready -> last token ready.
- time_per_output_token (TPOT): decode_seconds / (generated_tokens - 1); tokens_per_second = 1 / TPOT.
- delivery: the tokens one round emits become available together and are streamed back to back; an
  inter-chunk gap is the time between two consecutive deliveries (p50/p95/p99 over gaps, never over
  the zero spacing of tokens within one delivery).
- round latency: one draft + verify + accept round.
- rounds = fallback_rounds (K = 0: plain decoding) + draft_misses (K >= 1 asked, the drafter proposed
  nothing, e.g. no n-gram match) + speculative rounds (at least one token proposed).
- acceptance_rate: accepted / drafted tokens; mean_accepted_length: accepted tokens per speculative
  round; rejected_spans: (output index of the first rejected proposal, rejected count) per round.
"""

from __future__ import annotations

import math
import threading
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
    reused_prompt_tokens: int = 0  # prompt rows kept from an earlier request's cache (not prefilled again)
    generated_tokens: int = 0
    rounds: int = 0
    fallback_rounds: int = 0  # rounds at K = 0 (plain decoding)
    draft_misses: int = 0  # rounds at K >= 1 where the drafter proposed nothing
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    accepted_length_histogram: Counter = field(default_factory=Counter)  # accepted count per speculative round
    width_histogram: Counter = field(default_factory=Counter)  # K per round
    proposed_at_position: Counter = field(default_factory=Counter)  # position (1-based) -> proposals there
    accepted_at_position: Counter = field(default_factory=Counter)
    rejected_spans: list[tuple[int, int]] = field(default_factory=list)  # (output index of first rejected, length)
    exact: bool | None = None  # the target's calls stayed on one numeric path (see runtime/invariance.py)
    pad_rows: int = 0  # rows the target computed only to keep its calls on one numeric path (invariance shaping)
    pad_guesses: int = 0  # of them, rows that carried a free n-gram guess instead of a filler token
    pad_guesses_accepted: int = 0  # guesses the target confirmed: tokens gained from the padding
    seed: int | None = None  # the sampling seed used (drawn when the request passed none); None = greedy
    prediction_tokens: int = 0  # a predicted output's tokens (0: no prediction)
    accepted_prediction_tokens: int = 0  # of them, in the output where it followed the prediction (OpenAI's field)
    rejected_prediction_tokens: int = 0  # the others
    # drafter -> [tokens drafted, tokens accepted] by the drafter that proposed each round (a composite drafter's
    # parts: prediction, ngram, model, head...); accepted / generated tokens is that drafter's share of the output
    source_tokens: dict[str, list[int]] = field(default_factory=dict)
    queue_seconds: float = 0.0
    prefill_seconds: float = 0.0
    draft_seconds: float = 0.0  # drafting, including draft_catchup_seconds
    draft_catchup_seconds: float = 0.0  # the draft reading the prompt (after the first token) and tokens of plain rounds
    verify_seconds: float = 0.0
    total_seconds: float = 0.0  # request start -> finish (after the queue, without consumer time)
    time_to_first_token: float | None = None
    decode_seconds: float = 0.0
    delivery_gaps: list[float] = field(default_factory=list)  # between consecutive deliveries
    round_latencies: list[float] = field(default_factory=list)
    _last_delivery: float = field(default=0.0, repr=False)

    def record_round(self, k: int, proposed: int, accepted: int, output_index: int, draft_s: float,
                     verify_s: float, round_s: float, source: str | None = None) -> None:
        """One round at width k: `proposed` drafted (by the drafter `source`), `accepted` kept; output_index = where
        its tokens start."""
        if proposed and source is not None:
            counts = self.source_tokens.setdefault(source, [0, 0])
            counts[0] += proposed
            counts[1] += accepted
        self.rounds += 1
        self.width_histogram[k] += 1
        self.draft_seconds += draft_s
        self.verify_seconds += verify_s
        self.round_latencies.append(round_s)
        if k == 0:
            self.fallback_rounds += 1
            return
        if proposed == 0:
            self.draft_misses += 1
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

    def record_delivery(self, ready_at: float) -> None:
        """Tokens became available at busy time `ready_at` (seconds since the request started)."""
        if self.time_to_first_token is None:
            self.time_to_first_token = ready_at
        else:
            self.delivery_gaps.append(ready_at - self._last_delivery)
            self.decode_seconds = ready_at - self.time_to_first_token
        self._last_delivery = ready_at

    @property
    def speculative_rounds(self) -> int:
        return self.rounds - self.fallback_rounds - self.draft_misses

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else None

    @property
    def mean_accepted_length(self) -> float | None:
        return self.accepted_tokens / self.speculative_rounds if self.speculative_rounds else None

    @property
    def tokens_per_round(self) -> float | None:
        """Tokens per target call after prefill (the prefill's token excluded)."""
        return (self.generated_tokens - 1) / self.rounds if self.rounds and self.generated_tokens else None

    @property
    def time_per_output_token(self) -> float | None:
        return self.decode_seconds / (self.generated_tokens - 1) if self.generated_tokens > 1 else None

    @property
    def tokens_per_second(self) -> float | None:
        tpot = self.time_per_output_token
        return 1.0 / tpot if tpot else None

    @property
    def end_to_end_tokens_per_second(self) -> float | None:
        return self.generated_tokens / self.total_seconds if self.total_seconds > 0 else None

    def per_position_acceptance(self) -> dict[int, float]:
        return {p: self.accepted_at_position[p] / n for p, n in sorted(self.proposed_at_position.items())}

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "reused_prompt_tokens": self.reused_prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "seed": self.seed,
            "rounds": self.rounds,
            "speculative_rounds": self.speculative_rounds,
            "fallback_rounds": self.fallback_rounds,
            "draft_misses": self.draft_misses,
            "drafted_tokens": self.drafted_tokens,
            "accepted_tokens": self.accepted_tokens,
            "acceptance_rate": self.acceptance_rate,
            "mean_accepted_length": self.mean_accepted_length,
            "tokens_per_round": self.tokens_per_round,
            "accepted_length_histogram": {str(k): v for k, v in sorted(self.accepted_length_histogram.items())},
            "width_histogram": {str(k): v for k, v in sorted(self.width_histogram.items())},
            "per_position_acceptance": {str(k): v for k, v in self.per_position_acceptance().items()},
            "proposed_at_position": {str(k): v for k, v in sorted(self.proposed_at_position.items())},
            "accepted_at_position": {str(k): v for k, v in sorted(self.accepted_at_position.items())},
            "rejected_spans": [list(span) for span in self.rejected_spans],
            "rejected_tokens": sum(length for _, length in self.rejected_spans),
            "exact": self.exact,
            "pad_rows": self.pad_rows,
            "pad_guesses": self.pad_guesses,
            "pad_guesses_accepted": self.pad_guesses_accepted,
            "prediction_tokens": self.prediction_tokens,
            "accepted_prediction_tokens": self.accepted_prediction_tokens,
            "rejected_prediction_tokens": self.rejected_prediction_tokens,
            "source_tokens": {name: {"drafted": d, "accepted": a} for name, (d, a) in sorted(self.source_tokens.items())},
            "queue_seconds": self.queue_seconds,
            "prefill_seconds": self.prefill_seconds,
            "draft_seconds": self.draft_seconds,
            "draft_catchup_seconds": self.draft_catchup_seconds,
            "verify_seconds": self.verify_seconds,
            "total_seconds": self.total_seconds,
            "time_to_first_token": self.time_to_first_token,
            "decode_seconds": self.decode_seconds,
            "time_per_output_token": self.time_per_output_token,
            "deliveries": len(self.delivery_gaps) + (self.time_to_first_token is not None),
            "inter_chunk_gap_p50": percentile(self.delivery_gaps, 50),
            "inter_chunk_gap_p95": percentile(self.delivery_gaps, 95),
            "inter_chunk_gap_p99": percentile(self.delivery_gaps, 99),
            "round_latency_p50": percentile(self.round_latencies, 50),
            "round_latency_p95": percentile(self.round_latencies, 95),
            "round_latency_p99": percentile(self.round_latencies, 99),
            "tokens_per_second": self.tokens_per_second,
            "end_to_end_tokens_per_second": self.end_to_end_tokens_per_second,
        }


class LatencySummary:
    """A bounded summary of many durations: count, sum, min, max and log-spaced buckets (2% wide; a
    percentile is reported as its bucket's geometric middle, within 1% of the nearest-rank value)
    whatever the number of observations."""

    GROWTH = 1.02  # bucket i holds values in [GROWTH^(i-1), GROWTH^i) * FLOOR: relative error <= 1%
    FLOOR = 1e-7  # seconds; smaller values (and 0) land in bucket 0

    def __init__(self) -> None:
        self.count = 0
        self.sum = 0.0
        self.min: float | None = None
        self.max: float | None = None
        self.buckets: Counter = Counter()

    def _bucket(self, value: float) -> int:
        return 0 if value <= self.FLOOR else 1 + int(math.log(value / self.FLOOR, self.GROWTH))

    def add(self, value: float) -> None:
        self.count += 1
        self.sum += value
        self.min = value if self.min is None else min(self.min, value)
        self.max = value if self.max is None else max(self.max, value)
        self.buckets[self._bucket(value)] += 1

    def extend(self, values: list[float]) -> None:
        for value in values:
            self.add(value)

    def percentile(self, q: float) -> float | None:
        """Geometric middle of the bucket holding the q-th percentile, clamped to [min, max]."""
        if not self.count:
            return None
        rank = max(1, math.ceil(q / 100 * self.count))
        seen = 0
        for bucket in sorted(self.buckets):
            seen += self.buckets[bucket]
            if seen >= rank:
                value = 0.0 if bucket == 0 else self.FLOOR * self.GROWTH ** (bucket - 0.5)
                return min(max(value, self.min), self.max)
        return self.max

    def to_json(self) -> dict[str, Any]:
        return {"count": self.count, "mean": self.sum / self.count if self.count else None, "min": self.min,
                "p50": self.percentile(50), "p95": self.percentile(95), "p99": self.percentile(99), "max": self.max}


COUNTERS = ("prompt_tokens", "reused_prompt_tokens", "generated_tokens", "rounds", "fallback_rounds", "draft_misses",
            "drafted_tokens", "accepted_tokens", "queue_seconds", "prefill_seconds", "draft_seconds", "draft_catchup_seconds",
            "verify_seconds", "total_seconds", "decode_seconds")


class AggregateMetrics:
    """Sums, histograms and bounded latency summaries over every request of a generator (constant memory).

    `add` and `to_json` take a lock, so a reader (a metrics scrape) never sees half a request."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests = 0
        self.finish_reasons: Counter = Counter()
        self.totals = {name: 0 for name in COUNTERS}
        self.decoded_tokens = 0  # generated tokens after each request's first
        self.rejected_spans = 0
        self.rejected_tokens = 0
        self.histograms = {name: Counter() for name in ("accepted_length_histogram", "width_histogram",
                                                         "proposed_at_position", "accepted_at_position")}
        self.latency = {name: LatencySummary() for name in ("queue", "time_to_first_token", "time_per_output_token",
                                                            "inter_chunk_gap", "round_latency")}

    def add(self, metrics: RequestMetrics, finish_reason: str | None = None) -> None:
        with self._lock:
            self._add(metrics, finish_reason)

    def _add(self, metrics: RequestMetrics, finish_reason: str | None) -> None:
        self.requests += 1
        if finish_reason:
            self.finish_reasons[finish_reason] += 1
        for name in COUNTERS:
            self.totals[name] += getattr(metrics, name)
        self.decoded_tokens += max(metrics.generated_tokens - 1, 0)
        self.rejected_spans += len(metrics.rejected_spans)
        self.rejected_tokens += sum(length for _, length in metrics.rejected_spans)
        for name, histogram in self.histograms.items():
            histogram.update(getattr(metrics, name))
        self.latency["queue"].add(metrics.queue_seconds)
        if metrics.time_to_first_token is not None:
            self.latency["time_to_first_token"].add(metrics.time_to_first_token)
        if metrics.time_per_output_token is not None:
            self.latency["time_per_output_token"].add(metrics.time_per_output_token)
        self.latency["inter_chunk_gap"].extend(metrics.delivery_gaps)
        self.latency["round_latency"].extend(metrics.round_latencies)

    def to_json(self) -> dict[str, Any]:
        with self._lock:
            return self._to_json()

    def latency_percentile(self, name: str, q: float) -> float | None:
        """Percentile q of one latency summary (queue, time_to_first_token, time_per_output_token,
        inter_chunk_gap, round_latency) over all requests so far."""
        with self._lock:
            return self.latency[name].percentile(q)

    def _to_json(self) -> dict[str, Any]:
        totals = self.totals
        speculative = totals["rounds"] - totals["fallback_rounds"] - totals["draft_misses"]
        proposed, accepted = self.histograms["proposed_at_position"], self.histograms["accepted_at_position"]
        return {
            "requests": self.requests,
            "finish_reasons": dict(self.finish_reasons),
            **totals,
            "speculative_rounds": speculative,
            "acceptance_rate": totals["accepted_tokens"] / totals["drafted_tokens"] if totals["drafted_tokens"] else None,
            "mean_accepted_length": totals["accepted_tokens"] / speculative if speculative else None,
            "rejected_spans": self.rejected_spans,
            "rejected_tokens": self.rejected_tokens,
            "accepted_length_histogram": {str(k): v for k, v in sorted(self.histograms["accepted_length_histogram"].items())},
            "width_histogram": {str(k): v for k, v in sorted(self.histograms["width_histogram"].items())},
            "per_position_acceptance": {str(p): accepted[p] / n for p, n in sorted(proposed.items())},
            "tokens_per_second": (self.decoded_tokens / totals["decode_seconds"] if totals["decode_seconds"] > 0
                                  else None),
            "latency": {name: summary.to_json() for name, summary in self.latency.items()},
        }
