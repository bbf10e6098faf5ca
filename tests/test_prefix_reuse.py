"""KV-cache reuse across requests: a prompt that starts with tokens already cached prefills only the rest,
for the target and the draft, and the output equals a cold generator's."""

from __future__ import annotations

import pytest

from fake_timing import fake_timed_generator
from spectrt.runtime.generator import Generator


def spy_steps(decoder, starts: list[int] | None = None) -> list[int]:
    """Record the token count of every step of `decoder` (and, into `starts`, its cache length before it)."""
    calls, real = [], decoder.step

    def step(token_ids):
        calls.append(len(token_ids))
        if starts is not None:
            starts.append(decoder.length)
        return real(token_ids)

    decoder.step = step
    return calls


@pytest.mark.parametrize("options", [
    dict(draft="model", width=3),
    dict(draft="ngram", width="auto"),
    dict(draft="none"),
    dict(draft="model", width=3, temperature=0.8, top_p=0.9, seed=5),
    dict(draft="model", width="auto", temperature=0.8, top_p=0.9, seed=5),
])
def test_multi_turn_prefills_only_the_new_tokens(tiny_bundle, options):
    """On a fake clock (a draft step costs a tenth of a target call) `auto` makes the same choices on every
    machine: it speculates, so the draft's prefix reuse is always checked, for auto as for a fixed width."""
    warm = Generator(tiny_bundle, threads=1)
    fake_timed_generator(warm)
    warm.eos_ids = set()
    turn1 = [5, 17, 42, 8, 9, 10, 11, 12]
    out1 = warm.generate(prompt_ids=turn1, max_new_tokens=20, **options).token_ids
    turn2 = turn1 + out1 + [60, 61, 62]  # the conversation so far plus a new user message
    draft_cached = list(warm.draft.cached_tokens)  # what the draft saw of turn 1 (it lags after plain rounds)
    draft_kept = next((i for i, (a, b) in enumerate(zip(draft_cached, turn2[:-1])) if a != b),
                      min(len(draft_cached), len(turn2) - 1))
    draft_starts: list[int] = []
    target_steps, draft_steps = spy_steps(warm.target), spy_steps(warm.draft, draft_starts)
    warm_result = warm.generate(prompt_ids=turn2, max_new_tokens=20, **options)
    # the cache holds turn1 + out1 except the last emitted token (never fed to the target)
    kept = len(turn1) + len(out1) - 1
    assert warm_result.metrics.reused_prompt_tokens == kept
    assert target_steps[0] == len(turn2) - kept  # the prefill computed only the new tokens
    if options["draft"] == "model":
        assert warm_result.metrics.speculative_rounds > 0 and draft_kept > len(turn1)
        # the draft kept its prefix too: it reads on from there (the rest of the prompt, and with auto any tokens
        # of plain rounds before its first proposal) in one call
        assert draft_starts[0] == draft_kept and draft_steps[0] >= len(turn2) - draft_kept
    cold = Generator(tiny_bundle, threads=1)
    fake_timed_generator(cold)
    cold.eos_ids = set()
    cold_result = cold.generate(prompt_ids=turn2, max_new_tokens=20, **options)
    assert cold_result.metrics.reused_prompt_tokens == 0
    assert warm_result.token_ids == cold_result.token_ids


def test_a_different_prompt_reuses_only_the_common_prefix(tiny_generator):
    generator = tiny_generator
    fake_timed_generator(generator)  # `auto` chooses alike on every machine
    generator.eos_ids = set()
    generator.generate(prompt_ids=[1, 2, 3, 4, 5, 6], max_new_tokens=5)
    again = generator.generate(prompt_ids=[1, 2, 3, 9, 9], max_new_tokens=5)
    assert again.metrics.reused_prompt_tokens == 3
    same = generator.generate(prompt_ids=[1, 2, 3, 9, 9], max_new_tokens=5)
    assert same.metrics.reused_prompt_tokens == 4  # never the last prompt token: its logits pick token 1
    assert same.token_ids == again.token_ids
    off = generator.generate(prompt_ids=[1, 2, 3, 9, 9], max_new_tokens=5, reuse_prefix=False)
    assert off.metrics.reused_prompt_tokens == 0 and off.token_ids == again.token_ids


def test_reuse_after_a_failed_request_is_still_exact(tiny_generator, monkeypatch):
    generator = tiny_generator
    generator.eos_ids = set()
    prompt = [7, 8, 9, 10, 11]
    expected = generator.generate(prompt_ids=prompt, max_new_tokens=12, draft="model", width=3).token_ids
    real, calls = generator.target.step, []

    def failing(token_ids):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("interrupted")
        return real(token_ids)

    monkeypatch.setattr(generator.target, "step", failing)
    with pytest.raises(RuntimeError):
        generator.generate(prompt_ids=prompt + [40, 41], max_new_tokens=12, draft="model", width=3)
    monkeypatch.undo()
    result = generator.generate(prompt_ids=prompt, max_new_tokens=12, draft="model", width=3)
    assert result.token_ids == expected and result.metrics.reused_prompt_tokens == len(prompt) - 1
