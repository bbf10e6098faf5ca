"""Tiny random llama/qwen2 pairs export, validate against transformers and land in a valid bundle."""

from __future__ import annotations

import json

import numpy as np
import pytest

from spectrt.compiler.build import build_bundle
from spectrt.compiler.config import BuildConfig
from spectrt.compiler.progress import Progress
from spectrt.runtime.manifest import read_manifest, verify_files
from tiny_models import make_model


def _build(target, draft, out, **options):
    config = BuildConfig(target=str(target), draft=str(draft), out=str(out), **options)
    return build_bundle(config, progress=Progress(quiet=True))


@pytest.mark.parametrize("pair", ["tiny_llama_pair", "tiny_qwen_pair"])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tiny_pair_builds_validated_bundle(pair, precision, request, tmp_path):
    target, draft = request.getfixturevalue(pair)
    result = _build(target, draft, tmp_path / "bundle", widths=(1, 3), max_context=64, precision=precision)
    manifest = read_manifest(result.bundle_dir)
    verify_files(manifest)
    for role in ("target", "draft"):
        validation = manifest.raw["models"][role]["validation"]
        assert validation["passed"]
        assert validation["positions"] > 20
        if precision == "fp32":
            assert validation["max_abs_logit_diff"] < 1e-4
            assert validation["argmax_agreement"] == 1.0
        else:
            assert validation["max_abs_logit_diff"] < 0.1
    # validation really drove the graph with K+1-token verification chunks
    assert {2, 4} <= set(manifest.raw["models"]["target"]["validation"]["chunk_lengths"])
    assert manifest.target.widths == (1, 3)
    assert manifest.draft.widths == ()
    assert manifest.target.precision == precision
    assert manifest.target.logits_vocab == manifest.draft.logits_vocab == manifest.raw["tokenizer"]["size"]
    assert (result.bundle_dir / "tokenizer.json").is_file()
    assert manifest.generation["chat_template"]
    assert manifest.generation["eos_token_ids"] == [0]
    assert not list(result.bundle_dir.parent.glob(".*building*")), "temporary build folder left behind"


def test_qwen2_bias_and_padded_draft_vocab_are_explicit(tiny_qwen_pair, tmp_path):
    """The qwen draft has 320 embedding rows, the target 300: both graphs emit exactly the tokenizer's width."""
    target, draft = tiny_qwen_pair
    result = _build(target, draft, tmp_path / "b", widths=(2,), max_context=32)
    models = result.manifest["models"]
    assert models["target"]["arch"]["attention_bias"] is True
    assert models["draft"]["arch"]["vocab_size"] == 320 and models["target"]["arch"]["vocab_size"] == 300
    assert models["target"]["arch"]["tie_word_embeddings"] is False
    size = result.manifest["tokenizer"]["size"]
    assert models["draft"]["logits_vocab"] == models["target"]["logits_vocab"] == size
    assert models["draft"]["graph"]["outputs"][0]["shape"] == [1, "logits_rows", size]


@pytest.mark.parametrize("rope_scaling", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
])
def test_rope_scaling_variants_validate(rope_scaling, tmp_path):
    target = make_model(tmp_path / "t", "llama", layers=1, seed=5, rope_scaling=rope_scaling)
    result = _build(target, target, tmp_path / "b", widths=(2,), max_context=200)
    validation = result.manifest["models"]["target"]["validation"]
    assert validation["passed"] and validation["max_abs_logit_diff"] < 1e-4
    assert result.manifest["models"]["target"]["arch"]["rope_type"] == rope_scaling["rope_type"]


def test_graph_uses_only_plain_onnx_ops(tiny_llama_pair, tmp_path):
    import onnx

    target, draft = tiny_llama_pair
    result = _build(target, draft, tmp_path / "b", widths=(2,), max_context=32, validate=False)
    model = onnx.load(str(result.bundle_dir / "target.onnx"), load_external_data=False)
    assert all(node.domain in ("", "ai.onnx") for node in model.graph.node)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    assert model.graph.input[0].name == "input_ids"
    assert result.manifest["models"]["target"]["validation"] is None
    # weights live in the external data file, the graph itself stays small
    assert (result.bundle_dir / "target.onnx").stat().st_size < 200_000


def test_manifest_records_provenance(tiny_llama_pair, tmp_path):
    target, draft = tiny_llama_pair
    result = _build(target, draft, tmp_path / "b", widths=(2,), max_context=32, validate=False)
    manifest = json.loads((result.bundle_dir / "manifest.json").read_text())
    assert manifest["schema_version"] == 1
    assert set(manifest["provenance"]["tool_versions"]) >= {"spectrt", "torch", "transformers", "onnx"}
    assert "model.safetensors" in manifest["models"]["target"]["source"]["files"]
    for facts in manifest["files"].values():
        assert len(facts["sha256"]) == 64 and facts["size"] > 0
    assert manifest["build"]["widths"] == [2] and manifest["build"]["max_context"] == 32
    assert str(tmp_path) not in json.dumps(manifest["build"]), "machine-specific paths leaked into the manifest"


def test_onnx_verify_chunk_matches_single_steps(tiny_llama_pair, tmp_path):
    """Verifying K+1 tokens in one call gives the same logits and cache rows as K+1 single steps."""
    from spectrt.runtime.backends.onnxruntime_backend import OrtDecoder

    target, draft = tiny_llama_pair
    result = _build(target, draft, tmp_path / "b", widths=(4,), max_context=64, validate=False)
    manifest = read_manifest(result.bundle_dir)
    entry = manifest.target

    def decoder():
        return OrtDecoder(result.bundle_dir / entry.onnx_path, num_layers=entry.num_layers, kv_heads=entry.num_kv_heads,
                          head_dim=entry.head_dim, precision="fp32", max_context=64, vocab=entry.logits_vocab,
                          logits_rows=entry.logits_rows)

    tokens = np.array([5, 17, 42, 8, 99, 150, 3, 77, 11], dtype=np.int64)
    chunked, single = decoder(), decoder()
    chunked.step(tokens[:4]); chunked.commit(4)
    verify_logits = chunked.step(tokens[4:9]).copy()  # 5 tokens = K+1 for K=4
    single_logits = []
    for token in tokens:
        single_logits.append(single.step(token[None]).copy()); single.commit(1)
    np.testing.assert_allclose(verify_logits, np.concatenate(single_logits[4:]), atol=1e-5)
    chunked.commit(5)
    np.testing.assert_allclose(chunked.cache.keys[0][:, :9], single.cache.keys[0][:, :9], atol=1e-5)
    # rollback is moving a length: re-verifying after rollback reproduces the same logits
    chunked.rollback(4)
    np.testing.assert_allclose(chunked.step(tokens[4:9]), verify_logits, atol=1e-6)
