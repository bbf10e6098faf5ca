"""Qwen3, Phi-3 and Gemma 3 (text): tiny random-weight models with each family's options build, validate against
transformers and decode exactly under speculation.

Each model carries what makes its family differ from Llama (tiny_models.FAMILY_OPTIONS): Qwen3's per-head q/k norm
and a head_dim wider than hidden / heads; Phi-3's fused weights, partial rotary and a sliding window on every layer;
Gemma 3's (1 + w) norms, scaled embeddings, GELU-tanh, sandwich norms, query_pre_attn_scalar and interleaved
sliding / global layers with two rope bases. The windows are a few tokens long so every test sequence crosses them.
The reference is transformers' own greedy decoding of the target, not spectrt's plain loop.
"""

from __future__ import annotations

import pytest

from conftest import transformers_greedy
from spectrt.compiler.build import build_bundle
from spectrt.compiler.config import BuildConfig
from spectrt.compiler.progress import Progress
from tiny_models import FAMILY_OPTIONS

FAMILIES = ("qwen3", "phi3", "gemma3_text")
NEW_TOKENS = 20
PROMPTS = ([5, 17, 42, 9, 88, 23, 61, 7, 130, 44, 12, 99],  # longer than every window once decoding starts
           [12, 12, 12, 30, 12, 12, 12, 30, 12, 12, 12, 30, 12, 12])  # repetitive: n-gram lookup drafts


def _build(models, kind, out, **options):
    target, draft = models[kind]
    config = BuildConfig(target=str(target), draft=str(draft), out=str(out), widths=(1, 3), max_context=96,
                         **options)
    return build_bundle(config, progress=Progress(quiet=True))


@pytest.mark.parametrize("kind", FAMILIES)
def test_family_validates_and_decodes_exactly_under_speculation(kind, tiny_family_models, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from spectrt.runtime.generator import Generator

    result = _build(tiny_family_models, kind, tmp_path / "b")
    for role in ("target", "draft"):
        validation = result.manifest["models"][role]["validation"]
        assert validation["max_abs_logit_diff"] < 1e-4 and validation["argmax_agreement"] == 1.0, validation
    arch = result.manifest["models"]["target"]["arch"]
    assert arch["model_type"] == kind
    assert arch["qk_norm"] is (kind != "phi3")
    assert arch["fused_projections"] is (kind == "phi3")
    assert arch["sliding_window"] == FAMILY_OPTIONS[kind].get("sliding_window")
    # the comparison covers positions past the window, where a graph ignoring it differs (measured on the Gemma 3
    # model: max |logit diff| 4.8 with the window dropped from the graph)
    assert result.manifest["models"]["target"]["validation"]["positions"] > 2 * (arch["sliding_window"] or 0)

    reference_model = AutoModelForCausalLM.from_pretrained(tiny_family_models[kind][0], dtype=torch.float32).eval()
    references = [transformers_greedy(reference_model, prompt, NEW_TOKENS) for prompt in PROMPTS]
    generator = Generator(result.bundle_dir, threads=1)
    generator.eos_ids = set()  # random weights: compare full-length runs
    accepted = 0
    for draft in ("model", "ngram", "none", "auto"):
        for width in (1, 3, "auto"):
            for prompt, expected in zip(PROMPTS, references):
                out = generator.generate(prompt_ids=prompt, max_new_tokens=NEW_TOKENS, draft=draft, width=width)
                assert out.token_ids == expected, (draft, width, prompt)
                accepted += out.metrics.accepted_tokens
    assert accepted > 0, "the drafts never got a token accepted: speculation was not exercised"


@pytest.mark.parametrize("kind", FAMILIES)
def test_family_quantized_int8_is_exact_against_its_own_plain_decoding(kind, tiny_family_models, tmp_path):
    """int8 weights (MatMulNBits, int8 activations; int4 on random tiny weights leaves their flat logits below its
    agreement floor, the real Gemma 3 bundle covers 4-bit blocks): validated within int8 limits, and every drafter and width
    gives the bundle's own plain output."""
    from spectrt.runtime.generator import Generator

    result = _build(tiny_family_models, kind, tmp_path / "b", quantize="int8")
    assert result.manifest["models"]["target"]["validation"]["passed"]
    generator = Generator(result.bundle_dir, threads=1)
    generator.eos_ids = set()
    for prompt in PROMPTS:
        plain = generator.generate(prompt_ids=prompt, max_new_tokens=NEW_TOKENS, draft="none").token_ids
        for draft in ("model", "ngram"):
            for width in (1, 3):
                out = generator.generate(prompt_ids=prompt, max_new_tokens=NEW_TOKENS, draft=draft, width=width)
                assert out.token_ids == plain, (draft, width, prompt)
