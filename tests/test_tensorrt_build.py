"""TensorRT compile with tensorrt_rtx (builds without a GPU): profiles are exactly the requested widths.

No machine here can *run* an engine (no GPU): these tests check parsing, building and the
profiles TensorRT accepted, not execution.
"""

from __future__ import annotations

import pytest

from spectrt.compiler.build import build_bundle
from spectrt.compiler.config import BuildConfig
from spectrt.compiler.progress import Progress
from spectrt.compiler.tensorrt_build import import_tensorrt
from spectrt.runtime.manifest import read_manifest, verify_files

MAX_CONTEXT = 96


def _kv_inputs(entry):
    return [spec for spec in entry["graph"]["inputs"] if spec["name"] != "input_ids"]


@pytest.mark.parametrize("pair,precision", [("tiny_llama_pair", "fp16"), ("tiny_qwen_pair", "fp32")])
def test_engines_have_exactly_the_requested_profiles(pair, precision, request, tmp_path):
    trt = import_tensorrt()
    target, draft = request.getfixturevalue(pair)
    widths = (2, 3, 5)
    config = BuildConfig(target=str(target), draft=str(draft), widths=widths, max_context=MAX_CONTEXT,
                         precision=precision, backend="all", out=str(tmp_path / "b"), prefill_opt=16,
                         timing_cache=str(tmp_path / "timing.cache"))
    result = build_bundle(config, progress=Progress(quiet=True))
    manifest = read_manifest(result.bundle_dir)
    verify_files(manifest)
    assert (tmp_path / "timing.cache").stat().st_size > 0

    target_trt = manifest.raw["models"]["target"]["backends"]["tensorrt"]
    assert target_trt["module"] == trt.__name__ and target_trt["version"] == trt.__version__
    assert target_trt["strongly_typed"] is True
    profiles = target_trt["profiles"]
    assert [p["name"] for p in profiles] == ["prefill", "verify_k2", "verify_k3", "verify_k5"]
    assert [p["index"] for p in profiles] == [0, 1, 2, 3]
    assert profiles[0]["shapes"]["input_ids"] == [[1, 1], [1, 16], [1, MAX_CONTEXT]]
    kv_names = [spec["name"] for spec in _kv_inputs(manifest.raw["models"]["target"])]
    for k, profile in zip(widths, profiles[1:]):
        # fixed shape: min = opt = max = K+1 new tokens
        assert profile["shapes"]["input_ids"] == [[1, k + 1]] * 3
        assert set(profile["shapes"]) == {"input_ids", *kv_names}
        kv_heads = manifest.target.num_kv_heads
        head_dim = manifest.target.head_dim
        for name in kv_names:
            smin, _sopt, smax = profile["shapes"][name]
            assert smin == [1, 0, kv_heads, head_dim]
            assert smax == [1, MAX_CONTEXT - (k + 1), kv_heads, head_dim]

    draft_profiles = manifest.raw["models"]["draft"]["backends"]["tensorrt"]["profiles"]
    assert [p["name"] for p in draft_profiles] == ["prefill", "decode", "decode_s2"]
    draft_kv = (manifest.draft.num_kv_heads, manifest.draft.head_dim)
    for profile, length in zip(draft_profiles[1:], (1, 2)):  # one draft step; two tokens after a full acceptance
        assert profile["shapes"]["input_ids"] == [[1, length]] * 3
        past_max = MAX_CONTEXT - length
        assert profile["shapes"]["past_key_0"] == [[1, 0, *draft_kv], [1, past_max // 2, *draft_kv],
                                                   [1, past_max, *draft_kv]]
    for role in ("target", "draft"):
        engine = result.bundle_dir / manifest.raw["models"][role]["backends"]["tensorrt"]["path"]
        assert engine.stat().st_size > 10_000


def test_network_parses_strongly_typed_with_graph_dtypes(tiny_llama_pair, tmp_path):
    """Parse the exported fp16 graph as TensorRT sees it: inputs, dtypes and dynamic dims are what we declared."""
    trt = import_tensorrt()
    target, draft = tiny_llama_pair
    config = BuildConfig(target=str(target), draft=str(draft), widths=(2,), max_context=32, precision="fp16",
                         out=str(tmp_path / "b"), validate=False)
    result = build_bundle(config, progress=Progress(quiet=True))
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    assert parser.parse_from_file(str(result.bundle_dir / "target.onnx"))
    inputs = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    assert inputs["input_ids"].dtype == trt.int64 and tuple(inputs["input_ids"].shape) == (1, -1)
    assert inputs["past_key_0"].dtype == trt.float16 and tuple(inputs["past_key_0"].shape) == (1, -1, 2, 16)
    outputs = {network.get_output(i).name: network.get_output(i) for i in range(network.num_outputs)}
    assert outputs["logits"].dtype == trt.float32
    assert outputs["new_value_2"].dtype == trt.float16


@pytest.mark.parametrize("kind,precision", [("gemma3_text", "fp16"), ("phi3", "fp32")])  # Qwen3 adds only q/k norms
def test_new_families_compile_to_engines(kind, precision, tiny_family_models, tmp_path):
    """Each newer family's graph (q/k norms, GELU-tanh, sliding-window masks, partial rotary, fused weights) parses
    and builds into engines with the requested verification profiles (built only: no GPU runs them here)."""
    import_tensorrt()
    target, draft = tiny_family_models[kind]
    config = BuildConfig(target=str(target), draft=str(draft), widths=(2, 4), max_context=64, precision=precision,
                         backend="all", out=str(tmp_path / "b"), prefill_opt=16)
    result = build_bundle(config, progress=Progress(quiet=True))
    manifest = read_manifest(result.bundle_dir)
    verify_files(manifest)
    profiles = manifest.raw["models"]["target"]["backends"]["tensorrt"]["profiles"]
    assert [p["name"] for p in profiles] == ["prefill", "verify_k2", "verify_k4"]
    assert profiles[2]["shapes"]["input_ids"] == [[1, 5]] * 3
    for role in ("target", "draft"):
        engine = result.bundle_dir / manifest.raw["models"][role]["backends"]["tensorrt"]["path"]
        assert engine.stat().st_size > 10_000
