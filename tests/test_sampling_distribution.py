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
SAMPLES = 4000
TV_BOUND = 0.06  # expected TV of 4000 samples over 32 outcomes is ~0.03


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


def empirical(generator, draft: str, width) -> Counter:
    counts = Counter()
    for seed in range(SAMPLES):
        result = generator.generate(prompt_ids=PROMPT, max_new_tokens=TOKENS, draft=draft, width=width, seed=seed,
                                    **PARAMS)
        counts[tuple(result.token_ids)] += 1
    return counts


def total_variation(counts: Counter, dist: dict) -> float:
    outcomes = set(counts) | set(dist)
    return 0.5 * sum(abs(counts[o] / SAMPLES - dist.get(o, 0.0)) for o in outcomes)


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


@pytest.mark.parametrize("draft,width", [("model", 2), ("model", 3), ("ngram", 3), ("none", 0)])
def test_speculative_sampling_matches_target_distribution(generator, exact, draft, width):
    counts = empirical(generator, draft, width)
    assert total_variation(counts, exact) < TV_BOUND
    if draft == "model":
        metrics = generator.aggregate.requests[-1]
        assert metrics.drafted_tokens > 0


def test_broken_residual_is_detected(generator, exact, monkeypatch):
    """If rejected positions resample from the target instead of max(0, target - draft), the output
    distribution drifts from the target's; the bound above must notice."""
    import spectrt.runtime.accept as accept_module

    monkeypatch.setattr(accept_module, "residual", lambda target_row, draft_row, token: target_row)
    counts = empirical(generator, "model", 3)
    assert total_variation(counts, exact) > TV_BOUND
