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


def test_phi3_longrope_validates_within_its_original_context_and_refuses_beyond_it(tmp_path):
    """Phi-3-mini-128k's LongRoPE: transformers uses the short factors while the sequence fits the original context
    and switches every position to the long ones past it, which a fixed graph cannot follow; spectrt builds the
    first case exactly and refuses the second with what to pass instead."""
    from spectrt.errors import ConfigError
    from tiny_models import make_model

    rotary_pairs = 4  # head_dim 16, partial rotary 0.5 -> 8 rotated dims
    longrope = {"rope_type": "longrope", "original_max_position_embeddings": 64,
                "short_factor": [1.0, 1.1, 1.3, 1.6][:rotary_pairs], "long_factor": [1.0, 2.0, 4.0, 8.0][:rotary_pairs]}
    model = make_model(tmp_path / "phi3-longrope", "phi3", layers=1, seed=9, tie=False, rope_scaling=longrope,
                       original_max_position_embeddings=64, **FAMILY_OPTIONS["phi3"])  # Phi3Config's own field wins
    result = build_bundle(BuildConfig(target=str(model), draft=str(model), out=str(tmp_path / "b"), widths=(2,),
                                      max_context=64), progress=Progress(quiet=True))
    validation = result.manifest["models"]["target"]["validation"]
    assert validation["max_abs_logit_diff"] < 1e-4, validation
    assert result.manifest["models"]["target"]["arch"]["rope_type"] == "longrope"
    with pytest.raises(ConfigError, match="original context \\(64\\) of its LongRoPE.*--max-context <= 64"):
        build_bundle(BuildConfig(target=str(model), draft=str(model), out=str(tmp_path / "b2"), widths=(2,),
                                 max_context=128), progress=Progress(quiet=True))


def test_wide_heads_give_every_row_the_same_bits_at_every_row_count(tmp_path):
    """Gemma 3's 256-dim heads: onnxruntime's CPU MatMul summing 256 deep gave a row other bits at some row counts
    and cache lengths (the Gemma 3 270M bundle lost exactness at width 8), so the graph sums the scores over 128-dim
    slices. Probed here on a tiny 256-dim-head model: rows 0-1 of calls of 3..10 rows after 20..500 cached tokens
    must equal those of a 3-row call (2 rows + the attention's padded row) after the same cache. (With the slicing
    switched off, onnx_graph.SCORE_CHUNK = 1024, this probe found rows differing after 123 cached tokens in 6-9-row
    calls on an AMD EPYC, AVX2, 2 threads.) The model has only global layers: Gemma's rotary module then still
    takes a layer type."""
    import numpy as np
    import onnxruntime as ort

    from tiny_models import make_model

    options = dict(FAMILY_OPTIONS["gemma3_text"], head_dim=256, layer_types=["full_attention"])
    model = make_model(tmp_path / "wide", "gemma3_text", layers=1, heads=4, kv_heads=1, seed=4,
                       max_position_embeddings=1024, **options)
    result = build_bundle(BuildConfig(target=str(model), draft=str(model), out=str(tmp_path / "b"), widths=(8,),
                                      max_context=560, validate=False), progress=Progress(quiet=True))
    session_options = ort.SessionOptions()
    session_options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(result.bundle_dir / "target.onnx"), session_options,
                                   providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 300, size=540).astype(np.int64)

    def call(tokens, cache):
        feeds = {"input_ids": tokens[None, :]}
        feeds.update({f"past_{kind}_0": cache[kind] for kind in ("key", "value")})
        logits, key, value = session.run(["logits", "new_key_0", "new_value_0"], feeds)
        return logits[0], key, value

    empty = np.zeros((1, 0, 1, 256), np.float32)
    differing = []
    for cached in (20, 61, 123, 200, 333, 500):
        _, key, value = call(ids[:cached], {"key": empty, "value": empty})
        cache = {"key": key, "value": value}
        reference = call(ids[cached:cached + 2], cache)[0]  # [2, V]: the first two rows
        for rows in range(3, 10):
            logits = call(ids[cached:cached + rows], cache)[0]  # the last `rows` rows (logits_rows 9)
            first_two = logits[:2]
            if not np.array_equal(first_two.view(np.uint32), reference.view(np.uint32)):
                differing.append((cached, rows))
    assert not differing, f"(cached, rows) whose first rows differ from a 2-row call's: {differing}"
