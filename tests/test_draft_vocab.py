"""A draft whose output layer covers part of the vocabulary (--draft-vocab): a cheaper draft step, the same
output. The draft's logits are the full draft's on the kept ids and -inf elsewhere; speculation stays exact
(greedy and seeded sampling); the manifest says which ids are kept."""

from __future__ import annotations

import numpy as np
import pytest

from spectrt.compiler.build import build_bundle, draft_output_ids
from spectrt.compiler.config import BuildConfig
from spectrt.compiler.progress import Progress
from spectrt.errors import ConfigError
from spectrt.runtime.generator import Generator

KEPT = 150  # of the tiny tokenizer's 300 ids


@pytest.fixture(scope="module")
def bundles(tiny_llama_pair, tmp_path_factory):
    """The same tiny pair built twice: full draft vocabulary, and the lowest KEPT ids only."""
    root = tmp_path_factory.mktemp("draft-vocab")
    target, draft = tiny_llama_pair
    built = {}
    for label, draft_vocab in (("full", 0), ("subset", KEPT)):
        config = BuildConfig(target=str(target), draft=str(draft), widths=(1, 2, 4), max_context=64,
                             out=str(root / label), draft_vocab=draft_vocab)
        built[label] = build_bundle(config, progress=Progress(quiet=True))
    return built


def test_manifest_records_the_kept_ids(bundles):
    models = bundles["subset"].manifest["models"]
    assert models["target"]["output_vocab"] is None
    kept = models["draft"]["output_vocab"]
    assert kept["lowest_ids"] == KEPT and kept["size"] == KEPT + len(kept["special_ids"])
    assert all(i >= KEPT for i in kept["special_ids"])
    assert bundles["full"].manifest["models"]["draft"]["output_vocab"] is None


def test_draft_logits_are_the_full_drafts_on_kept_ids_and_minus_inf_elsewhere(bundles):
    subset, full = (Generator(bundles[label].bundle_dir, threads=1).draft for label in ("subset", "full"))
    kept = np.zeros(subset.vocab, bool)
    kept[list(draft_output_ids(BuildConfig(target="t", draft="d", draft_vocab=KEPT), subset.vocab,
                               tuple(bundles["subset"].manifest["models"]["draft"]["output_vocab"]["special_ids"])))] = True
    tokens = np.array([5, 17, 42, 126, 255, 59, 201])
    for decoder in (subset, full):
        decoder.reset()
    for start in range(0, len(tokens), 3):
        part = tokens[start : start + 3]
        subset_logits, full_logits = subset.step(part).copy(), full.step(part).copy()  # [1, V]
        subset.commit(len(part)), full.commit(len(part))
        assert np.isneginf(subset_logits[:, ~kept]).all()
        np.testing.assert_allclose(subset_logits[:, kept], full_logits[:, kept], rtol=1e-6, atol=1e-6)


def test_speculation_with_a_partial_draft_vocabulary_stays_exact(bundles):
    generator = Generator(bundles["subset"].bundle_dir, threads=1)
    generator.eos_ids = set()
    emitted = []
    for prompt in ([5, 17, 42], [100, 101, 102, 103, 104, 105], [250, 260, 270]):
        plain = generator.generate(prompt_ids=prompt, max_new_tokens=24, draft="none").token_ids
        emitted += plain
        for width in (1, 2, 4, "auto"):
            assert generator.generate(prompt_ids=prompt, max_new_tokens=24, draft="model", width=width).token_ids == plain
        for seed in range(5):
            options = dict(prompt_ids=prompt, max_new_tokens=16, seed=seed, temperature=1.0)
            sampled = generator.generate(**options, draft="none").token_ids
            assert generator.generate(**options, draft="model", width=4).token_ids == sampled
            generator.generate(**options, draft="model", width=4, accept="rejection")  # zero draft probabilities
    assert any(token >= KEPT for token in emitted)  # the target emitted ids the draft can never propose


def test_draft_vocab_must_not_be_negative():
    with pytest.raises(ConfigError, match="draft_vocab must be >= 0"):
        BuildConfig(target="t", draft="d", draft_vocab=-1)
