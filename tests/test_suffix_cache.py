"""The suffix cache across requests (issue 21, part 2): earlier requests' prompts and outputs drafted by the n-gram
drafter; bounded memory under many requests; tenants kept apart; multi-turn conversations stored once; and output
equal to plain decoding's whatever the cache holds."""

from __future__ import annotations

import random
import tracemalloc
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spectrt.runtime.drafters import NgramDrafter
from spectrt.runtime.errors import GenerationError
from spectrt.runtime.generator import GenerateConfig, Generator
from spectrt.runtime.suffix_cache import CacheView, SuffixCache

PICKER = SimpleNamespace(constraint=None)


def longest_agreement(stored: list[list[int]], context: list[int], limit: int) -> int:
    """Brute force: the longest run of tokens before some position of a stored sequence equal to the end of
    `context` (up to `limit`), over positions that have a token after them."""
    best = 0
    for sequence in stored:
        for position in range(1, len(sequence)):
            count = 0
            while (count < min(limit, position, len(context))
                   and sequence[position - 1 - count] == context[len(context) - 1 - count]):
                count += 1
            best = max(best, count)
    return best


# -- the index ----------------------------------------------------------------------------------------------------


def test_an_earlier_request_is_found_and_read_on_to_its_end():
    cache = SuffixCache(max_tokens=1000)
    cache.add([1, 2, 3, 4], [5, 6, 7, 8, 9])
    match = cache.match([50, 51, 2, 3, 4, 5, 6])
    assert match is not None and match.length == 5 and len(match.positions) == 1
    view = CacheView(cache)
    start = match.positions[0]
    assert [view.read(start, i, []) for i in range(4)] == [7, 8, 9, None]  # None: the sequence ended
    assert cache.match([50, 51, 52, 4, 5]) is None  # 2 tokens: shorter than the shortest anchor


def test_tenants_are_kept_apart():
    cache = SuffixCache(max_tokens=1000)
    cache.add([1, 2, 3, 4, 5], [6, 7, 8], key="alice")
    assert cache.match([3, 4, 5], "alice") is not None
    assert cache.match([3, 4, 5], "bob") is None and cache.match([3, 4, 5]) is None
    cache.add([1, 2, 3, 4, 5], [9, 9, 9])  # the shared partition
    shared = cache.match([3, 4, 5])
    assert cache.token_at(shared.positions[0], shared.positions[0]) == 9


def test_later_turns_store_only_what_is_new():
    cache = SuffixCache(max_tokens=100_000, overlap=8)
    rng = random.Random(0)
    conversation: list[int] = [rng.randrange(1000) for _ in range(300)]  # system prompt + first question
    stored = 0
    for turn in range(6):
        answer = [rng.randrange(1000) for _ in range(80)]
        stored += cache.add(conversation, answer, key="agent")
        conversation = [*conversation, *answer, *[rng.randrange(1000) for _ in range(40)]]  # + the tool's result
    held = cache.stats()["tokens"]
    assert held == stored < 300 + 6 * 80 + 5 * 40 + 6 * 8  # each turn adds its new part and an overlap only
    # the whole conversation is still found: the first turn's answer, read from the cache
    first_answer_context = conversation[290:300 + 5]
    assert cache.match(first_answer_context, "agent").length >= 12


def test_memory_stays_within_the_bound_over_1000_requests():
    capacity = 6_000
    cache = SuffixCache(max_tokens=capacity)
    rng = random.Random(1)
    requests = [([rng.randrange(5000) for _ in range(rng.randrange(10, 120))],
                 [rng.randrange(5000) for _ in range(rng.randrange(1, 60))], f"tenant-{i % 70}")  # > 64 tenants
                for i in range(1000)]
    first, last = requests[0], requests[-1]
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        for i, (prompt, output, key) in enumerate(requests):
            cache.add(prompt, output, key=key)
            if i % 50 == 0:
                stats = cache.stats()
                assert stats["tokens"] <= capacity and stats["index_entries"] <= 2 * capacity
                assert stats["bytes"] <= stats["max_bytes"]
        used, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    stats = cache.stats()
    assert stats["requests"] == 1000 and stats["evicted_tokens"] > 0 and stats["tokens"] == capacity
    held = used - base  # what the cache holds now
    assert held <= stats["max_bytes"] and peak - base <= stats["max_bytes"] * 1.2
    assert 0.7 * held <= stats["bytes"] <= 1.3 * held  # the reported bytes are what the cache really holds
    prompt, output, key = last
    assert cache.match([*prompt, *output[:1]], key) is not None  # the latest request is there
    prompt, output, key = first
    assert cache.match([*prompt[-12:], *output[:1]], key) is None  # the first was overwritten


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=40), min_size=1, max_size=4),
       st.lists(st.integers(0, 3), min_size=3, max_size=30), st.integers(30, 200))
def test_the_match_is_the_longest_earlier_context(sequences, context, capacity):
    cache = SuffixCache(max_tokens=capacity, max_candidates=10_000)
    for sequence in sequences:
        cache.add(sequence, [])
    held: list[list[int]] = []  # what the ring still holds, sequence by sequence
    room = capacity
    for sequence in reversed(sequences):
        kept = sequence[-room:] if room else []
        room -= len(kept)
        if kept:
            held.insert(0, kept)
    longest = longest_agreement(held, context, cache.max_match)
    match = cache.match(context)
    if longest < cache.anchors[0]:
        assert match is None
        return
    assert match is not None and match.length == longest
    for position in match.positions:  # each really agrees that far, and has a token after it
        assert cache.token_at(position, position) is not None
        assert all(cache.token_at(position - 1 - i, position - match.length) == context[-1 - i]
                   for i in range(match.length))


def test_the_ngram_drafter_drafts_an_earlier_output_where_it_matches_further_back():
    cache = SuffixCache(max_tokens=1000)
    earlier_prompt, earlier_output = [7, 8, 9, 10, 11], [20, 21, 22, 23, 24, 25, 26]
    cache.add(earlier_prompt, earlier_output)
    with_cache = NgramDrafter(cache=CacheView(cache))
    alone = NgramDrafter()
    prompt = [1, 2, 9, 10, 11, 20]  # ends like the earlier request; its own text has no earlier 11 20
    for drafter in (with_cache, alone):
        drafter.start(prompt)
    assert with_cache.propose(prompt, 4, PICKER)[0].tolist() == [21, 22, 23, 24]
    assert alone.propose(prompt, 4, PICKER)[0].tolist() == []
    with_cache.accepted([*prompt, 21, 22, 5], 4, 2)  # learns from the cache's hit rate apart from its own
    assert any(kind.startswith("cache-") for kind, _ in with_cache._rates)


# -- the runtime on a tiny bundle ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def generator(tiny_bundle):
    return Generator(tiny_bundle, threads=1)


def test_output_equals_plain_whatever_the_cache_holds(generator):
    prompt = "the shared cache holds"
    plain = generator.generate(prompt, max_new_tokens=40, draft="none", suffix_cache=False)
    ids = plain.token_ids
    prompt_ids = plain.prompt_token_ids
    widest = max(generator.built_widths)
    cache = generator.suffix_cache
    cache.clear()
    # other clients' text: the same prompt continued otherwise (in this tenant), this very output (in another)
    cache.add(prompt_ids, [*ids[:5], *[(t + 1) % 50 for t in ids[5:]]], key="victim")
    cache.add(prompt_ids, ids, key="other")
    for _ in range(20):
        cache.add([random.Random(3).randrange(100) for _ in range(60)], ids[::-1], key="victim")
    for options in ({}, {"prediction": ids}, {"prediction": ids[:10] + [3, 4] + ids[20:]},
                    {"prediction": "some unrelated text"}):
        for draft in ("ngram", "none"):
            result = generator.generate(prompt, max_new_tokens=40, draft=draft, width=widest,
                                        suffix_cache_key="victim", **options)
            assert result.token_ids == ids, (options, draft)
    sampled = dict(max_new_tokens=30, temperature=0.8, seed=11)
    sampled_plain = generator.generate(prompt, draft="none", suffix_cache=False, **sampled)
    cache.add(prompt_ids, [(t + 3) % 50 for t in sampled_plain.token_ids], key="victim")
    result = generator.generate(prompt, draft="ngram", suffix_cache_key="victim", **sampled)
    assert result.token_ids == sampled_plain.token_ids  # coupled acceptance: plain sampling's tokens


def test_a_repeated_request_is_drafted_from_the_cache(generator):
    prompt = "a request that comes back"
    widest = max(generator.built_widths)
    generator.suffix_cache.clear()
    options = dict(max_new_tokens=48, draft="ngram", width=widest)
    first = generator.generate(prompt, suffix_cache_key="repeat", **options)
    again = generator.generate(prompt, suffix_cache_key="repeat", **options)
    alone = generator.generate(prompt, suffix_cache=False, **options)
    assert again.token_ids == first.token_ids == alone.token_ids
    # drafted from the first run: nearly every token accepted, in a handful of verification calls
    assert again.metrics.accepted_tokens >= 0.8 * len(again.token_ids)
    assert again.metrics.rounds < alone.metrics.rounds
    elsewhere = generator.generate(prompt, suffix_cache_key="another tenant", **options)
    assert elsewhere.metrics.rounds > again.metrics.rounds  # the first run was not in this tenant's partition


def test_the_generator_keeps_its_bound_and_refuses_bad_settings(tiny_bundle):
    small = Generator(tiny_bundle, threads=1, suffix_cache_tokens=300)
    for i in range(120):
        small.generate(f"request number {i} of many", max_new_tokens=3, draft="ngram", suffix_cache_key=f"t{i % 5}")
    stats = small.suffix_cache.stats()
    assert stats["requests"] == 120 and stats["tokens"] == 300 and stats["bytes"] <= stats["max_bytes"]
    assert Generator(tiny_bundle, threads=1, suffix_cache_tokens=0).suffix_cache is None
    with pytest.raises(GenerationError, match="suffix_cache_tokens must be an integer >= 0"):
        Generator(tiny_bundle, suffix_cache_tokens=-1)
    with pytest.raises(GenerationError, match="suffix_cache must be true or false"):
        GenerateConfig(suffix_cache="yes")
    with pytest.raises(GenerationError, match="suffix_cache_key must be a string"):
        GenerateConfig(suffix_cache_key="x" * 300)
    before = small.suffix_cache.stats()["requests"]
    small.generate("not remembered", max_new_tokens=3, suffix_cache=False)
    assert small.suffix_cache.stats()["requests"] == before


def test_the_server_partitions_the_cache_by_prompt_cache_key_and_reports_its_memory(tiny_bundle):
    import httpx
    from test_serve import Server, metric_sum

    server = Server(tiny_bundle, "--suffix-cache-tokens", "5000")
    try:
        body = {"model": "tiny", "prompt": "the server remembers", "max_tokens": 40, "temperature": 0,
                "draft": "ngram", "width": 5}

        def rounds_of(extra: dict) -> tuple[str, float]:
            before = metric_sum(server.metrics(), "spectrt_rounds_total")
            response = httpx.post(f"{server.url}/v1/completions", json=body | extra, timeout=60)
            assert response.status_code == 200, response.text
            return response.json()["choices"][0]["text"], metric_sum(server.metrics(), "spectrt_rounds_total") - before

        text, first = rounds_of({"prompt_cache_key": "alice"})
        again_text, again = rounds_of({"prompt_cache_key": "alice"})
        bob_text, bob = rounds_of({"prompt_cache_key": "bob"})
        assert again_text == bob_text == text
        assert again < first and bob == first  # alice's output drafted alice's repeat; bob's partition was empty
        samples = server.metrics()
        assert metric_sum(samples, "spectrt_suffix_cache_requests") == 3
        assert 0 < metric_sum(samples, "spectrt_suffix_cache_tokens") <= 5000
        assert 0 < metric_sum(samples, "spectrt_suffix_cache_bytes") <= metric_sum(samples, "spectrt_suffix_cache_max_bytes")
        rounds_of({"suffix_cache": False})
        assert metric_sum(server.metrics(), "spectrt_suffix_cache_requests") == 3  # not remembered
        bad = httpx.post(f"{server.url}/v1/completions", json=body | {"prompt_cache_key": "k" * 300}, timeout=60)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt_cache_key"
    finally:
        server.stop()


def test_the_cli_default_is_the_runtime_default():
    from spectrt.cli import SUFFIX_CACHE_TOKENS
    from spectrt.runtime.suffix_cache import DEFAULT_MAX_TOKENS

    assert SUFFIX_CACHE_TOKENS == DEFAULT_MAX_TOKENS


# -- lookup first, the model elsewhere ----------------------------------------------------------------------------


def test_lookup_first_drafts_sure_runs_without_the_model_and_counts_each_part(generator):
    prompt = "lookup first, then the model"
    widest = max(generator.built_widths)
    generator.suffix_cache.clear()
    plain = generator.generate(prompt, max_new_tokens=40, draft="none")
    first = generator.generate(prompt, max_new_tokens=40, draft="ngram+model", width="auto", suffix_cache_key="lf")
    again = generator.generate(prompt, max_new_tokens=40, draft="ngram+model", width="auto", suffix_cache_key="lf")
    assert first.token_ids == again.token_ids == plain.token_ids
    shares = again.metrics.source_tokens
    # the repeat is drafted from the cache: the lookup is sure of long runs and takes most of the output
    assert shares["ngram"][1] >= 0.6 * len(plain.token_ids)
    assert sum(accepted for _, accepted in shares.values()) == again.metrics.accepted_tokens
    assert max(again.metrics.width_histogram) == widest
    sampled = dict(max_new_tokens=30, temperature=0.9, seed=5)
    assert generator.generate(prompt, draft="ngram+model", suffix_cache_key="lf", **sampled).token_ids == \
        generator.generate(prompt, draft="none", **sampled).token_ids
    with pytest.raises(GenerationError, match="does not take a constraint"):
        generator.generate(prompt, max_new_tokens=4, draft="ngram+model", regex="[a-z]+")
