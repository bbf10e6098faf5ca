"""Greedy speculative output equals plain greedy output of the target, token for token (tiny models).

The reference is transformers' own greedy decoding of the target model, not our loop with k=0."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import transformers_greedy

NEW_TOKENS = 24
PROMPTS = [
    [5, 17, 42],
    [100, 101, 102, 103, 104, 105, 106, 107],
    [7],
    [12, 12, 12, 12, 30, 12, 12, 12, 12, 30, 12, 12],  # repetitive: n-gram lookup finds matches
    list(range(40, 80)),
]


@pytest.fixture(scope="module")
def target_model(tiny_llama_pair):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_pair[0], dtype=torch.float32)
    model.eval()
    return model


@pytest.fixture(scope="module")
def references(target_model):
    return [transformers_greedy(target_model, p, NEW_TOKENS) for p in PROMPTS]


def _no_eos(generator):
    generator.eos_ids = set()  # random weights: compare full-length runs
    return generator


@pytest.mark.parametrize("draft", ["model", "ngram", "none"])
@pytest.mark.parametrize("width", [1, 2, 3, 5, "auto"])
def test_greedy_speculative_equals_target_greedy(tiny_generator, references, draft, width):
    generator = _no_eos(tiny_generator)
    for prompt_ids, expected in zip(PROMPTS, references):
        result = generator.generate(prompt_ids=prompt_ids, max_new_tokens=NEW_TOKENS, draft=draft, width=width)
        assert result.token_ids == expected, f"prompt {prompt_ids}"
        assert result.finish_reason == "length"
        metrics = result.metrics
        assert metrics.generated_tokens == NEW_TOKENS
        assert metrics.accepted_tokens <= metrics.drafted_tokens
        if draft == "none":
            assert metrics.drafted_tokens == 0 and metrics.fallback_rounds == metrics.rounds


def test_model_drafter_really_speculates_and_gets_rejections(tiny_generator):
    generator = _no_eos(tiny_generator)
    result = generator.generate(prompt_ids=PROMPTS[1], max_new_tokens=40, draft="model", width=3)
    metrics = result.metrics
    assert metrics.drafted_tokens > 0
    assert metrics.rejected_spans, "a 1-layer random draft should disagree with a 3-layer random target"
    assert sum(metrics.accepted_length_histogram.values()) == metrics.speculative_rounds
    assert metrics.rounds == metrics.fallback_rounds + metrics.draft_misses + metrics.speculative_rounds
    assert set(metrics.per_position_acceptance()) <= {1, 2, 3}


def test_ngram_drafter_accepts_on_repetitive_text(tiny_generator, references):
    generator = _no_eos(tiny_generator)
    result = generator.generate(prompt_ids=PROMPTS[3], max_new_tokens=NEW_TOKENS, draft="ngram", width=5)
    assert result.token_ids == references[3]
    assert result.metrics.drafted_tokens > 0


@given(prompt=st.lists(st.integers(0, 280), min_size=1, max_size=30), width=st.sampled_from([1, 2, 3, 5, "auto"]),
       draft=st.sampled_from(["model", "ngram"]), new_tokens=st.integers(1, 20))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_property_speculative_equals_plain(tiny_generator, target_model, prompt, width, draft, new_tokens):
    generator = _no_eos(tiny_generator)
    expected = transformers_greedy(target_model, prompt, new_tokens)
    result = generator.generate(prompt_ids=prompt, max_new_tokens=new_tokens, draft=draft, width=width)
    assert result.token_ids == expected


def test_generation_stops_at_max_context(tiny_generator, target_model):
    generator = _no_eos(tiny_generator)
    prompt = list(range(1, 121))  # 120 of 128 positions used
    result = generator.generate(prompt_ids=prompt, max_new_tokens=50, draft="model", width=5)
    assert result.finish_reason == "context"
    # the cached rows (128, less any kept free for padded calls on this CPU) + the last emitted token
    assert len(prompt) + len(result.token_ids) == generator.max_context + 1
    assert result.token_ids == transformers_greedy(target_model, prompt, len(result.token_ids))


def test_eos_ends_generation(tiny_generator, references):
    generator = tiny_generator
    expected = references[1]
    stop_token = expected[6]
    first = expected.index(stop_token)
    generator.eos_ids = {stop_token}
    result = generator.generate(prompt_ids=PROMPTS[1], max_new_tokens=NEW_TOKENS, draft="model", width=5)
    assert result.finish_reason == "eos"
    assert result.token_ids == expected[:first]
