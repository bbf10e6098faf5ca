"""Names, meanings and buckets of spectrt's serving metrics, shared by `spectrt serve` (prometheus_client)
and the Triton model (Triton's custom metrics API), so one dashboard serves both. No dependencies."""

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.4, 0.6, 1.0, 1.5, 2.5, 5.0,
                   10.0, 30.0)
ACCEPTED_LENGTH_BUCKETS = (0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 16)

# counter name without the spectrt_ prefix and _total suffix: (what it counts, the RequestMetrics field it sums)
TOKEN_COUNTERS = {
    "prompt_tokens": ("prompt tokens", "prompt_tokens"),
    "reused_prompt_tokens": ("prompt tokens whose KV rows were reused from an earlier request", "reused_prompt_tokens"),
    "generated_tokens": ("generated tokens", "generated_tokens"),
    "drafted_tokens": ("tokens proposed by the drafter", "drafted_tokens"),
    "accepted_tokens": ("proposed tokens the target accepted", "accepted_tokens"),
    "rounds": ("draft-verify rounds (target calls after the prefill)", "rounds"),
    "fallback_rounds": ("rounds at width 0 (plain decoding)", "fallback_rounds"),
    "draft_misses": ("rounds at width >= 1 where the drafter proposed nothing (n-gram misses)", "draft_misses"),
    "pad_rows": ("target rows computed only to keep calls on one numeric path (row-count invariance)", "pad_rows"),
    "pad_guesses_accepted": ("free n-gram guesses in pad rows that the target confirmed (tokens gained)",
                             "pad_guesses_accepted"),
}
# gauge name after spectrt_suffix_cache_, the SuffixCache.stats() field it shows, what it says
SUFFIX_CACHE_GAUGES = (
    ("tokens", "tokens", "Tokens of earlier requests the suffix cache holds."),
    ("max_tokens", "max_tokens", "Tokens the suffix cache holds at most (--suffix-cache-tokens)."),
    ("bytes", "bytes", "Memory the suffix cache takes now (ring, index and recent requests)."),
    ("max_bytes", "max_bytes", "Memory the suffix cache can take at most."),
    ("requests", "requests", "Requests the suffix cache has remembered since the server started."),
)
EXACT_HELP = ("1 if speculative output is token for token plain decoding's on this machine (the row counts of the "
              "target's calls were checked here and calls are shaped to those that agree), else 0; `strategy` says "
              "how: as-is, pad, off or none-found")
