"""Prometheus metrics of `spectrt serve` (the standard `prometheus_client` library, one registry per server).

Every request's own `RequestMetrics` is added exactly once when it finishes, so the counters are the
sums of the requests' numbers. Labels: `bundle` and `drafter` (model, ngram, none, head, grammar...);
requests also by `finish_reason`. Durations are seconds, measured by the generator (see the README's
Metrics table). The scheduler gauges are read from the generator's snapshot at every scrape.
"""

from __future__ import annotations

from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .metric_names import ACCEPTED_LENGTH_BUCKETS, EXACT_HELP, LATENCY_BUCKETS, SUFFIX_CACHE_GAUGES, TOKEN_COUNTERS


class ServerMetrics:
    """The metric families of one server; `observe` adds a finished request."""

    def __init__(self, bundle: str, queue_depth: Callable[[], int],
                 scheduler_state: Callable[[], dict[str, dict[str, Any]]], exactness=None,
                 suffix_cache_stats: Callable[[], dict[str, int]] | None = None,
                 batch_stats: Callable[[], dict[str, Any]] | None = None):
        self.bundle = bundle
        self.registry = CollectorRegistry()
        if exactness is not None:  # the generator's InvarianceReport
            exact = Gauge("spectrt_exact", EXACT_HELP, ("bundle", "strategy"), registry=self.registry)
            exact.labels(bundle, exactness.strategy).set(1.0 if exactness.exact else 0.0)
        labels = ("bundle", "drafter")
        self.requests = Counter("spectrt_requests", "Requests finished, by finish reason (eos, length, stop, context; "
                                "cancelled: the client went away; error: the generation failed).",
                                (*labels, "finish_reason"), registry=self.registry)
        self.rejected = Counter("spectrt_queue_full_rejections", "Requests refused with 429 because the queue was full.",
                                ("bundle",), registry=self.registry)
        self.tokens = {name: Counter(f"spectrt_{name}", f"Sum over finished requests: {doc}.", labels,
                                     registry=self.registry) for name, (doc, _) in TOKEN_COUNTERS.items()}
        self.rejected_spans = Counter("spectrt_rejected_spans", "Rounds in which the target rejected part of the "
                                      "proposal.", labels, registry=self.registry)
        self.rejected_tokens = Counter("spectrt_rejected_tokens", "Proposed tokens the target rejected.", labels,
                                       registry=self.registry)
        self.cancelled_tokens = Counter("spectrt_cancelled_generated_tokens", "Tokens generated for requests whose "
                                        "client went away before the end (counted when the generator stopped them).",
                                        labels, registry=self.registry)

        def histogram(name: str, doc: str, buckets=LATENCY_BUCKETS) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=self.registry)

        self.ttft = histogram("spectrt_time_to_first_token_seconds", "Request start (after the queue) until its "
                              "first token was ready.")
        self.tpot = histogram("spectrt_time_per_output_token_seconds", "Decode time per token after the first, one "
                              "observation per request.")
        self.gap = histogram("spectrt_inter_chunk_gap_seconds", "Time between two consecutive deliveries of a "
                             "request (the tokens of one round arrive together).")
        self.round = histogram("spectrt_round_latency_seconds", "One draft + verify + accept round.")
        self.queue_wait = histogram("spectrt_queue_wait_seconds", "Time a request waited for the generator.")
        self.accepted_length = histogram("spectrt_accepted_length", "Accepted proposals per speculative round "
                                         "(tokens).", ACCEPTED_LENGTH_BUCKETS)
        depth = Gauge("spectrt_queue_depth", "Requests waiting for the generator.", ("bundle",), registry=self.registry)
        depth.labels(bundle).set_function(lambda: float(queue_depth()))
        self.width = Gauge("spectrt_scheduler_width", "Speculation width of the latest round.", labels,
                           registry=self.registry)
        self.acceptance = Gauge("spectrt_acceptance_estimate", "Long-run per-token acceptance estimate the `auto` "
                                "scheduler starts greedy requests from.", labels, registry=self.registry)
        self._scheduler_state = scheduler_state
        if batch_stats is not None:  # a generator that decodes several requests together (max_batch > 1)
            for name, read, doc in (
                    ("batch_running_requests", lambda b: b["running_requests"],
                     "Requests decoding now (cache slots in use by running requests)."),
                    ("batch_slots", lambda b: b["max_batch"], "Requests the generator decodes together at most."),
                    ("batch_target_calls", lambda b: b["calls"].get("target", 0),
                     "Target model calls so far (each holds one or more requests' steps)."),
                    ("batch_target_sequences", lambda b: b["sequences"].get("target", 0),
                     "Requests' steps those target calls held (/ calls: the mean batch size)."),
                    ("batch_max_sequences_per_call", lambda b: b["max_sequences_per_call"],
                     "The most requests' steps one call has held.")):
                gauge = Gauge(f"spectrt_{name}", doc, ("bundle",), registry=self.registry)
                gauge.labels(bundle).set_function(lambda read=read: float(read(batch_stats())))
        if suffix_cache_stats is not None:  # the generator's suffix cache across requests
            for name, field, doc in SUFFIX_CACHE_GAUGES:
                gauge = Gauge(f"spectrt_suffix_cache_{name}", doc, ("bundle",), registry=self.registry)
                gauge.labels(bundle).set_function(lambda field=field: float(suffix_cache_stats()[field]))

    def observe(self, drafter: str, finish_reason: str, metrics: dict[str, Any] | None,
                gaps: list[float] = (), rounds: list[float] = (), accepted_lengths: dict[int, int] | None = None) -> None:
        """Add one finished request (metrics None: it produced no metrics, e.g. cancelled or failed)."""
        labels = (self.bundle, drafter)
        self.requests.labels(*labels, finish_reason).inc()
        if metrics is None:
            return
        for name, (_, field) in TOKEN_COUNTERS.items():
            self.tokens[name].labels(*labels).inc(metrics[field])
        self.rejected_spans.labels(*labels).inc(len(metrics["rejected_spans"]))
        self.rejected_tokens.labels(*labels).inc(metrics["rejected_tokens"])
        self.queue_wait.labels(*labels).observe(metrics["queue_seconds"])
        if metrics["time_to_first_token"] is not None:
            self.ttft.labels(*labels).observe(metrics["time_to_first_token"])
        if metrics["time_per_output_token"] is not None:
            self.tpot.labels(*labels).observe(metrics["time_per_output_token"])
        for gap in gaps:
            self.gap.labels(*labels).observe(gap)
        for seconds in rounds:
            self.round.labels(*labels).observe(seconds)
        for accepted, count in (accepted_lengths or {}).items():
            for _ in range(count):
                self.accepted_length.labels(*labels).observe(accepted)
        self.refresh_scheduler()

    def observe_cancelled_tokens(self, drafter: str, tokens: int) -> None:
        """A request stopped early because its client went away, after `tokens` tokens."""
        self.cancelled_tokens.labels(self.bundle, drafter).inc(tokens)

    def refresh_scheduler(self) -> None:
        """Set the scheduler gauges from the generator's current state (a consistent snapshot)."""
        for name, state in self._scheduler_state().items():
            if state["width"] is not None:
                self.width.labels(self.bundle, name).set(state["width"])
            if state["acceptance"] is not None:
                self.acceptance.labels(self.bundle, name).set(state["acceptance"])
