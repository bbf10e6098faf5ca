"""Weight-only quantized ONNX (onnxruntime MatMulNBits) for the CPU path."""

from __future__ import annotations

import numpy as np
import pytest

from spectrt.compiler.build import build_bundle
from spectrt.compiler.config import BuildConfig
from spectrt.compiler.onnx_graph import dequantize_blockwise, quantize_blockwise
from spectrt.compiler.progress import Progress
from spectrt.errors import ConfigError
from spectrt.runtime.generator import Generator


def test_int4_reproduces_an_affine_4bit_grid_exactly():
    """A weight on an affine 4-bit grid (per 32-block: (q - zero) * scale, q in 0..15 with both ends present)
    round-trips, odd block counts included (zero points are padded per row)."""
    rng = np.random.default_rng(0)
    n, k = 8, 96
    q = rng.integers(0, 16, size=(n, k // 32, 32))
    q[..., 0], q[..., 1] = 0, 15
    scale = rng.uniform(0.01, 0.1, size=(n, k // 32, 1))
    zero = rng.integers(0, 16, size=(n, k // 32, 1))
    weight = ((q - zero) * scale).reshape(n, k).astype(np.float32)
    packed, scales, zeros = quantize_blockwise(weight, 4, 32)
    assert packed.shape == (n, 3, 16) and packed.dtype == np.uint8 and zeros.shape == (n * 2,)
    np.testing.assert_allclose(dequantize_blockwise(packed, scales, zeros, 4, 32, k), weight, atol=1e-6)


def test_int4_error_is_small_on_gaussian_and_float_minimum_grids():
    """Off-grid weights (Gaussian; GGUF Q4_1/Q4_K style grids whose minimum is not a whole number of steps)
    stay within about a quantization step; the fitted scale beats plain min/max rounding on average."""
    rng = np.random.default_rng(3)
    gaussian = rng.normal(size=(64, 256)).astype(np.float32)
    q = rng.integers(0, 16, size=(64, 8, 32))
    d = rng.uniform(0.01, 0.1, size=(64, 8, 1))
    low = -d * rng.uniform(0.5, 14.5, size=(64, 8, 1))  # weights straddle 0, as real layers' blocks do
    gguf_like = (low + d * q).reshape(64, 256).astype(np.float32)
    for weight in (gaussian, gguf_like):
        packed, scales, zeros = quantize_blockwise(weight, 4, 32)
        restored = dequantize_blockwise(packed, scales, zeros, 4, 32, 256)
        blocks = weight.reshape(64, 8, 32)
        step = ((blocks.max(-1) - blocks.min(-1)) / 15)[..., None]  # [N, B, 1]
        error = np.abs(restored.reshape(64, 8, 32) - blocks)
        assert (error <= step * 1.5).all()  # a shrunk scale may clip an outlier by a little
        plain_minmax_rms = np.sqrt(np.mean((step / 2) ** 2 / 3))  # uniform rounding error of a min/max grid
        assert np.sqrt(np.mean(error ** 2)) < plain_minmax_rms * 1.05


def test_int8_symmetric_error_is_small_on_gaussian_weights():
    weight = np.random.default_rng(1).normal(size=(16, 64)).astype(np.float32)
    packed, scales, offsets = quantize_blockwise(weight, 8, 32)
    assert offsets is None and packed.shape == (16, 2, 32)
    restored = dequantize_blockwise(packed, scales, offsets, 8, 32, 64)
    assert np.linalg.norm(restored - weight) / np.linalg.norm(weight) < 0.01


@pytest.mark.parametrize("bits", [4, 8])
def test_matmul_nbits_graph_matches_numpy_dequantized_matmul(bits):
    """Our packing is what onnxruntime's MatMulNBits reads (accuracy_level 0 = exact fp32 compute)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from spectrt.compiler.onnx_graph import ExternalDataWriter, GraphBuilder, GraphSpec

    rng = np.random.default_rng(2)
    weight = rng.normal(size=(40, 64)).astype(np.float32)  # [N, K]
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        writer = ExternalDataWriter(Path(tmp) / "m.onnx.data")
        gb = GraphBuilder(writer, np.float32, TensorProto.FLOAT)
        spec = GraphSpec("fp32", 8, 8, quantize=f"int{bits}", accuracy_level=0)
        gb.nodes.append(helper.make_node("Identity", [gb.linear("x", "w", weight, spec)], ["y"]))
        writer.close()
        graph = helper.make_graph(gb.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 64])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], gb.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
        path = Path(tmp) / "m.onnx"
        path.write_bytes(model.SerializeToString())
        x = rng.normal(size=(1, 3, 64)).astype(np.float32)
        got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    packed, scales, offsets = quantize_blockwise(weight, bits, 32)
    expected = x @ dequantize_blockwise(packed, scales, offsets, bits, 32, 64).T
    np.testing.assert_allclose(got.reshape(expected.shape), expected, rtol=1e-4, atol=1e-4)


def _snap_to_int4_grid(folder):
    """Put every linear weight of a saved model on an affine 4-bit grid, like a GGUF Q4_1 source model."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("proj.weight"):
                packed, scales, offsets = quantize_blockwise(param.numpy(), 4, 32)
                param.copy_(torch.from_numpy(dequantize_blockwise(packed, scales, offsets, 4, 32, param.shape[1])))
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("quantize,draft_quantize", [("int8", None), ("int4", None), ("none", "int4")])
def test_quantized_bundle_validates_and_speculation_stays_exact(tiny_llama_pair, tmp_path, quantize, draft_quantize):
    import shutil

    target, draft = (shutil.copytree(p, tmp_path / p.name) for p in tiny_llama_pair)
    _snap_to_int4_grid(target), _snap_to_int4_grid(draft)
    config = BuildConfig(target=str(target), draft=str(draft), widths=(2, 4), max_context=64, out=str(tmp_path / "b"),
                         quantize=quantize, draft_quantize=draft_quantize)
    result = build_bundle(config, progress=Progress(quiet=True))
    models = result.manifest["models"]
    assert (models["target"]["quantization"] or {}).get("scheme", "none") == quantize
    assert models["draft"]["quantization"]["scheme"] == (draft_quantize or quantize)
    assert models["target"]["validation"]["passed"] and models["draft"]["validation"]["passed"]
    generator = Generator(result.bundle_dir, threads=1)
    generator.eos_ids = set()
    for prompt in ([5, 17, 42], [100, 101, 102, 103, 104, 105]):
        plain = generator.generate(prompt_ids=prompt, max_new_tokens=20, draft="none").token_ids
        for width in (2, 4, "auto"):
            assert generator.generate(prompt_ids=prompt, max_new_tokens=20, draft="model", width=width).token_ids == plain


def test_quantize_with_tensorrt_is_refused():
    with pytest.raises(ConfigError, match="MatMulNBits.*TensorRT cannot parse"):
        BuildConfig(target="t", draft="d", quantize="int4", backend="all")
    with pytest.raises(ConfigError, match="TensorRT cannot parse"):
        BuildConfig(target="t", draft="d", draft_quantize="int8", backend="tensorrt")


def test_int4_on_weights_off_the_grid_is_refused_with_advice(tiny_llama_pair, tmp_path):
    """Random Gaussian weights lose too much at int4: the build refuses instead of shipping a drifting graph."""
    from spectrt.errors import ExportError

    target, draft = tiny_llama_pair
    with pytest.raises(ExportError, match="do not survive this quantization.*--quantize int8"):
        build_bundle(BuildConfig(target=str(target), draft=str(draft), widths=(2,), max_context=32,
                                 out=str(tmp_path / "b"), quantize="int4"), progress=Progress(quiet=True))


def test_quantized_target_gives_a_token_the_same_logits_alone_or_in_a_verify_chunk(tiny_llama_pair, tmp_path):
    """With int8 activations (MatMulNBits accuracy level 4), a K+1-token call and one-token calls give every
    position bit-identical logits through the runtime's target (its calls shaped to the row counts that agree on
    this machine)."""
    import shutil

    target, draft = (shutil.copytree(p, tmp_path / p.name) for p in tiny_llama_pair)
    _snap_to_int4_grid(target), _snap_to_int4_grid(draft)
    result = build_bundle(BuildConfig(target=str(target), draft=str(draft), widths=(4, 10), max_context=64,
                                      out=str(tmp_path / "b"), quantize="int4"),
                          progress=Progress(quiet=True))
    models = result.manifest["models"]
    assert models["target"]["quantization"]["accuracy_level"] == 4
    assert models["draft"]["quantization"]["accuracy_level"] == 4
    assert models["target"]["logits_rows"] == 11
    decoder = Generator(result.bundle_dir).target
    tokens = np.array([5, 17, 42, 126, 255, 59, 259, 163, 271, 96, 112])
    decoder.step(np.array([7, 8, 9])), decoder.commit(3)
    chunk = decoder.step(tokens).copy()
    decoder.rollback(3)
    singles = []
    for token in tokens:
        singles.append(decoder.step(token[None]).copy())
        decoder.commit(1)
    assert np.array_equal(chunk, np.concatenate(singles))
