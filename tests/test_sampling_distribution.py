"""Sampling with speculation preserves the target's distribution (statistical test on a tiny model).

The exact distribution of the first five generated tokens under top-k=2 (32 outcomes) is
enumerated from the target graph; speculative samples must lie within a total-variation bound of
it, and the same check must catch a sampler whose residual step is broken."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest

from spectrt.runtime.sampling import SamplingParams, probs_from_logits

PROMPT = [100, 101, 102, 103]
TOKENS = 5
PARAMS = dict(temperature=1.0, top_k=2)
SAMPLES = 3000
TV_BOUND = 0.06  # expected TV of 3000 samples over 32 outcomes is ~0.03
# the broken samplers (negative controls) drift far more: fewer samples show it, against a bound twice as high as
# the largest TV that many samples of a correct sampler give
CONTROL_SAMPLES = 1200
CONTROL_BOUND = 0.12  # measured on the broken sampler: 0.23; a correct one: below 0.07 expected


def exact_distribution(generator) -> dict[tuple[int, ...], float]:
    target = generator.target
    params = SamplingParams(**PARAMS)
    dist: dict[tuple[int, ...], float] = {}

    def expand(prefix: tuple[int, ...], prob: float) -> None:
        if len(prefix) == TOKENS:
            dist[prefix] = prob
            return
        target.reset()
        probs = probs_from_logits(target.step(np.array(PROMPT + list(prefix)))[-1:], params)[0]
        for token in np.flatnonzero(probs):
            expand(prefix + (int(token),), prob * probs[token])

    expand((), 1.0)
    return dist


def empirical(generator, draft: str, width, accept: str = "coupled", samples: int = SAMPLES) -> Counter:
    counts = Counter()
    for seed in range(samples):
        result = generator.generate(prompt_ids=PROMPT, max_new_tokens=TOKENS, draft=draft, width=width, seed=seed,
                                    accept=accept, **PARAMS)
        counts[tuple(result.token_ids)] += 1
    return counts


def total_variation(counts: Counter, dist: dict) -> float:
    outcomes = set(counts) | set(dist)
    total = sum(counts.values())
    return 0.5 * sum(abs(counts[o] / total - dist.get(o, 0.0)) for o in outcomes)


@pytest.fixture(scope="module")
def generator(tiny_llama_pair, tmp_path_factory):
    """The tiny target with a draft that is the same model plus noise: their distributions overlap but
    differ, so rejections happen and the residual step decides the outcome."""
    from spectrt.compiler.build import build_bundle
    from spectrt.compiler.config import BuildConfig
    from spectrt.compiler.progress import Progress
    from spectrt.runtime.generator import Generator
    from tiny_models import make_model

    root = tmp_path_factory.mktemp("near-draft")
    draft = make_model(root / "draft", "llama", layers=3, seed=1, perturb=0.02)
    out = root / "bundle"
    build_bundle(BuildConfig(target=str(tiny_llama_pair[0]), draft=str(draft), widths=(2, 3, 5), max_context=32,
                             out=str(out)), progress=Progress(quiet=True))
    generator = Generator(out, threads=1)
    generator.eos_ids = set()
    return generator


@pytest.fixture(scope="module")
def exact(generator):
    dist = exact_distribution(generator)
    assert len(dist) == 32 and abs(sum(dist.values()) - 1) < 1e-9
    return dist


# coupled: plain sampling's distribution here; that every drafter and width gives plain sampling's very tokens is
# test_coupled_sampling_is_plain_sampling_token_for_token's (so their distributions need no sampling run of their own)
@pytest.mark.parametrize("accept,draft,width", [
    ("rejection", "model", 3), ("rejection", "ngram", 3), ("rejection", "model", "auto"), ("coupled", "none", 0),
])
def test_speculative_sampling_matches_target_distribution(generator, exact, accept, draft, width):
    drafted_before = generator.aggregate.totals["drafted_tokens"]
    counts = empirical(generator, draft, width, accept)
    assert total_variation(counts, exact) < TV_BOUND
    if draft == "model" and width != "auto":  # auto may choose plain decoding on this machine's costs
        assert generator.aggregate.totals["drafted_tokens"] > drafted_before


def test_broken_residual_is_detected(generator, exact, monkeypatch):
    """If rejected positions resample from the target instead of max(0, target - draft), the output
    distribution drifts from the target's; the bound above must notice."""
    import spectrt.runtime.accept as accept_module

    monkeypatch.setattr(accept_module, "residual", lambda target_row, draft_row, token: target_row)
    counts = empirical(generator, "model", 3, "rejection", samples=CONTROL_SAMPLES)
    assert total_variation(counts, exact) > CONTROL_BOUND


def test_coupled_sampling_is_plain_sampling_token_for_token(generator):
    """With the coupled rule, a seeded speculative run is the seeded plain run, whatever the drafter and width,
    and `auto` (whose widths follow the clock) reproduces."""
    for seed in range(40):
        options = dict(prompt_ids=PROMPT, max_new_tokens=12, seed=seed, temperature=0.9, top_p=0.9)
        plain = generator.generate(**options, draft="none").token_ids
        for draft, width in (("model", 2), ("model", 5), ("model", "auto"), ("ngram", "auto")):
            assert generator.generate(**options, draft=draft, width=width).token_ids == plain, (seed, draft, width)


def test_seeded_runs_reproduce(generator):
    options = dict(prompt_ids=PROMPT, max_new_tokens=16, seed=11, temperature=1.0, top_k=5)
    for accept, width in (("coupled", "auto"), ("rejection", 3)):
        first = generator.generate(**options, draft="model", width=width, accept=accept)
        second = generator.generate(**options, draft="model", width=width, accept=accept)
        assert first.token_ids == second.token_ids and first.metrics.seed == 11
    unseeded = generator.generate(**dict(options, seed=None), draft="model")
    assert unseeded.metrics.seed is not None  # reported, so the run can be repeated
    again = generator.generate(**dict(options, seed=unseeded.metrics.seed), draft="model")
    assert again.token_ids == unseeded.token_ids


@pytest.mark.parametrize("accept", ["coupled", "rejection"])
def test_top_p_end_to_end_keeps_every_token_in_the_nucleus(generator, accept):
    """Each emitted token lies in the top-p nucleus of the target's distribution at its position."""
    top_p = 0.3
    params = SamplingParams(temperature=1.0, top_p=top_p)
    for seed in range(20):
        result = generator.generate(prompt_ids=PROMPT, max_new_tokens=12, seed=seed, temperature=1.0, top_p=top_p,
                                    draft="model", width=3, accept=accept)
        sequence = PROMPT + result.token_ids
        target = generator.target
        target.reset()
        rows = [target.step(np.array(PROMPT))[-1].copy()]  # the graph returns a prefill's last rows only
        target.commit(len(PROMPT))
        for token in result.token_ids[:-1]:
            rows.append(target.step(np.array([token]))[-1].copy())
            target.commit(1)
        logits = np.stack(rows)  # [12, V]
        nucleus = probs_from_logits(logits, params) > 0  # [12, V]
        assert all(nucleus[i, token] for i, token in enumerate(result.token_ids)), seed
        assert nucleus.sum(axis=1).max() < logits.shape[1] // 2  # top-p really cut the vocabulary
