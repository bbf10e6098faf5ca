"""`spectrt demo`'s recipes: the default Qwen pair is the GGUF files' own blocks (issue 19), int4 and SmolLM2 on
request; each recipe loads, and a bundle built by another recipe is rebuilt rather than reused."""

from __future__ import annotations

import pytest

from spectrt.compiler.config import load_recipe
from spectrt.demo import DRAFTS, RECIPES, _recipe_path, _stale_reason, run_demo


def test_every_demo_variant_has_a_loadable_recipe_and_a_drafter():
    configs = {variant: load_recipe(_recipe_path(variant)) for variant in RECIPES}
    assert set(DRAFTS) == set(RECIPES)
    assert configs["gguf"].quantize == "gguf" and configs["gguf"].draft_quantize == "gguf"
    assert configs["int4"].quantize == "int4"
    assert configs["gguf"].target == configs["int4"].target  # the same pair, two weight schemes
    assert len({c.out_dir() for c in configs.values()}) == len(configs)  # one bundle folder each


def test_a_bundle_of_the_other_recipe_is_stale():
    gguf, int4 = load_recipe(_recipe_path("gguf")), load_recipe(_recipe_path("int4"))
    manifest = {"build": int4.to_json(), "models": {"target": {"logits_rows": 9}}}
    assert _stale_reason(manifest, int4) is None
    assert "quantize 'int4', recipe 'gguf'" in _stale_reason(manifest, gguf)


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="variant 'fp8' unknown"):
        run_demo(variant="fp8", max_new_tokens=4, prompt=None, say=print, show=print)
