"""The memory planner (spectrt/plan/): its arithmetic, its device checks, and its ONNX Runtime CPU
prediction against the measured peak RSS of a real generation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from spectrt import plan as memory_plan
from spectrt.cli import main
from spectrt.errors import ConfigError
from spectrt.plan import DEVICES, device_named, make_plan, plan_bundle
from spectrt.plan.calibration import GiB, MiB
from spectrt.plan.shapes import ModelShape, shape_from_entry
from spectrt.runtime.backends.device_plan import dynamic_profile, plan_memory
from spectrt.runtime.kv_cache import KVCache
from spectrt.runtime.manifest import read_manifest

ROOT = Path(__file__).resolve().parents[1]

# A generation in a fresh process; prints its peak resident set (VmHWM: every page it ever had resident, weights
# mapped from the bundle's files included) after loading and after generating.
DRIVER = r"""
import json, re, sys
from spectrt.runtime.generator import Generator

def peak():
    with open("/proc/self/status") as handle:
        return int(re.search(r"VmHWM:\s+(\d+) kB", handle.read()).group(1)) * 1024

bundle, prompt, new_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
generator = Generator(bundle)
loaded = peak()
result = generator.generate(prompt, max_new_tokens=new_tokens, draft="model")
print(json.dumps({"peak": peak(), "after_load": loaded, "prompt_tokens": len(result.prompt_token_ids),
                  "new_tokens": len(result.token_ids)}))
"""

PARAGRAPH = ("Speculative decoding lets a small draft model propose several tokens which the large target model "
             "then checks in a single forward pass. When the draft agrees with the target, many tokens are accepted "
             "at once; when it does not, the target's own token is used and the rejected rows of the cache are "
             "simply forgotten by moving the cache length back. ")


def qwen_like(role: str = "target", **changes) -> ModelShape:
    """Qwen2.5-Coder-1.5B's numbers as the qwen-coder-cpu bundle records them (fp32, no quantization)."""
    shape = ModelShape(role=role, num_layers=28, hidden_size=1536, num_heads=12, num_kv_heads=2, head_dim=128,
                       intermediate_size=8960, vocab=151936, output_rows=151936, tie_word_embeddings=False,
                       attention_bias=True, precision="fp32", quantize="none", block_size=32, max_context=2048,
                       logits_rows=9 if role == "target" else 1, widths=(1, 2, 4, 8) if role == "target" else ())
    return replace(shape, **changes)


# -- arithmetic -----------------------------------------------------------------------------------------------------


def test_kv_cache_bytes_are_what_the_runtime_allocates():
    shape = qwen_like()
    assert shape.kv_bytes(2048) == 28 * 2 * 2048 * 2 * 128 * 4 == 117_440_512
    small = qwen_like(num_layers=3, num_kv_heads=2, head_dim=16, precision="fp16", max_context=64)
    assert small.kv_bytes(64) == KVCache(3, 64, 2, 16, "fp16").nbytes
    geometry = small.geometry()
    arena = plan_memory([(geometry, (dynamic_profile(geometry),))])
    assert arena.breakdown()["kv_cache"] == small.kv_bytes(64)  # the device arena holds the same caches


def _entries(bundle: Path) -> dict[str, ModelShape]:
    manifest = read_manifest(bundle)
    return {e.role: shape_from_entry(manifest, e) for e in (manifest.target, manifest.draft)}


def test_weight_arithmetic_is_the_external_data_file_the_build_writes(tiny_bundle):
    from spectrt.runtime.backends.planned import geometry

    manifest = read_manifest(tiny_bundle)
    for role, shape in _entries(tiny_bundle).items():
        assert shape.data_file_bytes() == (tiny_bundle / f"{role}.onnx.data").stat().st_size, role
        assert shape.geometry() == geometry(getattr(manifest, role)), role  # the executors' own device plan


def test_quantized_weight_arithmetic_counts_scales_zero_points_and_the_reduced_draft_vocab(tiny_llama_pair, tmp_path):
    from spectrt.compiler.build import build_bundle
    from spectrt.compiler.config import BuildConfig
    from spectrt.compiler.progress import Progress

    target, draft = tiny_llama_pair
    out = tmp_path / "q4"
    build_bundle(BuildConfig(target=str(target), draft=str(draft), widths=(1, 3), max_context=64, quantize="int4",
                             draft_vocab=200, validate=False, out=str(out)), progress=Progress(quiet=True))
    shapes = _entries(out)
    assert shapes["target"].quantize == "int4" and shapes["draft"].output_rows < shapes["draft"].vocab
    for role, shape in shapes.items():
        assert shape.data_file_bytes() == (out / f"{role}.onnx.data").stat().st_size, role
    # recipe mode on the same folders: the same shapes (hence the same arithmetic)
    recipe = memory_plan.plan_recipe("q4", {"target": target, "draft": draft}, widths=(1, 3), max_context=64,
                                     precision="fp32", quantize={"target": "int4", "draft": "int4"}, draft_vocab=200)
    for role, shape in shapes.items():
        assert replace(recipe.models[role], weight_file_bytes=None) == replace(shape, weight_file_bytes=None), role


def test_recipe_mode_agrees_with_bundle_mode_on_the_smollm2_pair(smollm2_gguf, smollm2_layer_skip_draft,
                                                                 smollm2_bundle):
    """GGUF metadata (target) and a Hugging Face config.json (draft) give the shapes the build recorded; the weights
    from the arithmetic agree with the bundle's file sizes."""
    bundle = plan_bundle(smollm2_bundle)
    recipe = memory_plan.plan_recipe("smollm2", {"target": smollm2_gguf, "draft": smollm2_layer_skip_draft},
                                     widths=(1, 2, 4), max_context=512, precision="fp32",
                                     quantize={"target": "none", "draft": "none"})
    for role in ("target", "draft"):
        from_files, from_configs = bundle.models[role], recipe.models[role]
        assert replace(from_configs, weight_file_bytes=None) == replace(from_files, weight_file_bytes=None), role
        assert from_configs.weight_bytes() == pytest.approx(from_files.weight_bytes(), rel=0.01), role
    for backend in ("onnxruntime-cpu", "onnxruntime-cuda", "tensorrt"):
        assert recipe.backend(backend).total == pytest.approx(bundle.backend(backend).total, rel=0.03), backend


def test_recipe_and_bundle_of_a_qwen2_int4_pair_agree_through_the_cli(tiny_qwen_pair, tmp_path):
    """The CPU recipe's settings (int4 weights, int8 output layers, the draft's reduced vocabulary) on Qwen2's
    layout (qkv bias, untied output layer): `spectrt plan RECIPE` before the build agrees with `spectrt plan BUNDLE`
    after it, the weights to the byte."""
    target, draft = tiny_qwen_pair
    recipe_file = tmp_path / "qwen-int4.toml"
    out = tmp_path / "qwen-int4"
    recipe_file.write_text(f'''target = "{target}"
draft = "{draft}"
widths = [1, 2, 3]
max_context = 64
precision = "fp32"
backend = "onnx"
quantize = "int4"
draft_vocab = 200
validate = false
out = "{out}"
''')
    runner = CliRunner()
    built = runner.invoke(main, ["build", str(recipe_file), "--json"])
    assert built.exit_code == 0, built.output
    plans = {}
    for source in (out, recipe_file):
        result = runner.invoke(main, ["plan", str(source), "--json"])
        assert result.exit_code == 0, result.output
        plans[source] = json.loads(result.output)
    bundle, recipe = plans[out], plans[recipe_file]
    assert set(bundle["backends"]) == set(recipe["backends"]) == {"onnxruntime-cpu", "onnxruntime-cuda"}
    assert bundle["models"]["draft"]["output_rows"] < bundle["models"]["draft"]["vocab"]
    for role in ("target", "draft"):
        files = bundle["models"][role]["weight_file_bytes"]
        assert files == sum((out / name).stat().st_size for name in (f"{role}.onnx", f"{role}.onnx.data"))
        assert recipe["models"][role]["weight_file_bytes"] is None
        assert recipe["models"][role]["quantize"] == bundle["models"][role]["quantize"] == "int4"
        # the recipe's weight arithmetic is the external-data file to the byte (the .onnx protobuf is estimated)
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in recipe["models"][role].items()
                  if k != "weight_bytes"}
        assert ModelShape(**fields).data_file_bytes() == (out / f"{role}.onnx.data").stat().st_size, role
    assert recipe["backends"]["onnxruntime-cpu"]["total_bytes"] == \
        pytest.approx(bundle["backends"]["onnxruntime-cpu"]["total_bytes"], rel=0.03)


def test_activation_estimate_grows_with_the_call_and_tensorrt_plans_for_its_profile_maxima():
    shape = qwen_like()
    assert shape.activation_bytes(1, 100) < shape.activation_bytes(9, 100) < shape.activation_bytes(512, 0)
    assert shape.largest_call(context=2048, prefill=2000) == (2000, 0)
    assert shape.largest_call(context=2048, prefill=1) == (9, 2039)  # the widest verification at the end
    assert shape.largest_call(context=2048, prefill=2000, prefill_chunk=64) == (64, 1936)  # its last chunk
    nbytes, why = memory_plan.tensorrt_activation_estimate(shape)
    assert "2048 new after 2047 cached" in why
    # worked out by hand from the graph (fp32, S = 2048 new, T = 4095, S + 1 = 2049 query rows):
    resident = 2 * 2048 * 1536 * 4 + 2049 * 4095 * 4 + 2 * 2048 * 128 * 4  # residual + norm, mask, rope cos/sin
    attention = 2 * 12 * 2049 * 4095 * 4 + 12 * 2049 * 128 * 4 + 4 * 4095 * 2 * 128 * 4  # scores+probs, q, k/v
    mlp = 4 * 2048 * 8960 * 4  # gate_up [S, 2I] and its two halves
    logits = 9 * 151936 * 4  # the target's 9 logits rows
    assert nbytes == resident + max(attention, mlp) + logits == 901_160_348
    # the scores [heads, S+1, T] fp32 (and their softmax) dominate a long prefill
    assert nbytes > 2 * 12 * 2049 * 4095 * 4


def test_the_cpu_plan_counts_the_targets_prefill_in_chunks_and_the_drafts_in_one_call():
    """The runtime's exactness shaping prefills the target in chunks of at most 64 rows (runtime/invariance.py);
    a draft reads the prompt in one call. (Measured on Gemma 3 270M: planning the target's 1382-token prefill as one
    call overestimated the peak by 24%.)"""
    plan = _plan()
    notes = {term.note.split(":")[0]: term.note for term in plan.backend("onnxruntime-cpu").terms
             if term.name == "activations"}
    assert "64 new after 1984 cached (a prefill chunk" in notes["target"]
    assert "2048 new after 0 cached" in notes["draft"]


# -- plans and devices ----------------------------------------------------------------------------------------------


def _plan(**changes) -> memory_plan.MemoryPlan:
    models = {"target": qwen_like(**changes), "draft": qwen_like("draft", num_layers=24, hidden_size=896,
                                                                 num_heads=14, head_dim=64, intermediate_size=4864)}
    return make_plan("qwen-fp32", "test", models, tokenizer_bytes=11 << 20)


def test_gpu_plans_hold_the_device_arena_and_a_cpu_plan_only_host_memory():
    plan = _plan()
    cpu, cuda, trt = (plan.backend(b) for b in ("onnxruntime-cpu", "onnxruntime-cuda", "tensorrt"))
    assert cpu.device_bytes == 0 and cpu.host_bytes == cpu.total
    # both caches at 2048 rows: target 28 layers x 2 KV heads x 128, draft 24 layers x 2 x 64, keys and values, fp32
    kv = 2 * 2048 * 4 * (28 * 2 * 128 + 24 * 2 * 64)
    assert cpu.term("kv_cache") == cuda.term("kv_cache") == trt.term("kv_cache") == kv == 167_772_160
    # the device arena's buffers, as runtime/backends/device_plan.py lays them out (its own tests check the layout)
    arena = plan_memory([(s.geometry(), (dynamic_profile(s.geometry()),)) for s in plan.models.values()]).breakdown()
    for name in ("staging", "logits", "token_ids"):
        assert cuda.term(name) == trt.term(name) == arena[name]
    assert arena["logits"] >= (9 + 1) * 151936 * 4  # the target's 9 rows and the draft's row, fp32
    assert cuda.device_bytes > cuda.term("weights") > 0 and cuda.host_bytes > 0
    # TensorRT reserves the largest profile's activations, a 2048-token prefill after 2047 rows: the target's is
    # 901_160_348 B (worked out above); the draft's is larger, its 14 query heads' scores dominating:
    resident = 2 * 2048 * 896 * 4 + 2049 * 4095 * 4 + 2 * 2048 * 64 * 4
    attention = 2 * 14 * 2049 * 4095 * 4 + 14 * 2049 * 64 * 4 + 4 * 4095 * 2 * 64 * 4
    assert trt.term("activations") == resident + attention + 1 * 151936 * 4 == 1_005_382_540


def test_a_shorter_context_needs_less_host_memory_on_cpu_but_the_same_device_arena():
    full, short = _plan(), make_plan("q", "test", _plan().models, tokenizer_bytes=11 << 20, context=256)
    assert short.backend("onnxruntime-cpu").total < full.backend("onnxruntime-cpu").total
    assert short.backend("onnxruntime-cuda").term("kv_cache") == full.backend("onnxruntime-cuda").term("kv_cache")
    with pytest.raises(ConfigError, match="context 4096"):
        make_plan("q", "test", _plan().models, tokenizer_bytes=0, context=4096)


def test_cache_slots_multiply_the_cpu_kv_cache_and_gpu_plans_say_why_they_are_missing():
    one = _plan()
    four = make_plan("q", "test", one.models, tokenizer_bytes=11 << 20, cache_slots=4)
    cpu_one, cpu_four = one.backend("onnxruntime-cpu"), four.backend("onnxruntime-cpu")
    assert cpu_four.term("kv_cache") == 4 * cpu_one.term("kv_cache")
    assert cpu_four.total - cpu_one.total == 3 * cpu_one.term("kv_cache")
    assert [p.backend for p in four.backends] == ["onnxruntime-cpu"]
    assert any("4 cache slots" in note for note in four.notes)


def test_named_devices_reserve_carveouts_and_the_os():
    nano, thor = DEVICES["orin-nano-8gb"], DEVICES["agx-thor-128gb"]
    assert nano.usable == 7620 * MiB - 1 * GiB
    assert nano.usable < DEVICES["orin-nx-16gb"].usable < DEVICES["agx-orin-64gb"].usable < thor.usable < 128 * GiB


def test_fit_decisions_follow_the_device_and_memory_gb():
    plan = _plan()  # fp32 Qwen pair: 8-9 GiB of weights
    for name, fits in (("orin-nano-8gb", False), ("agx-orin-64gb", True)):
        checked = make_plan("q", "test", plan.models, tokenizer_bytes=0, device=device_named(name, None))
        assert all(checked.fits(b.backend) is fits for b in checked.backends), name
    nx = make_plan("q", "test", plan.models, tokenizer_bytes=0, device=device_named("orin-nx-16gb", None))
    assert nx.fits("onnxruntime-cpu") and nx.fits("onnxruntime-cuda")
    # TensorRT reads a whole engine file into host memory before deserializing it: on unified memory the weights
    # are there twice while loading
    trt = nx.backend("tensorrt")
    assert trt.peak_phase == "load" and trt.term("load") == plan.models["target"].weight_bytes()
    assert not nx.fits("tensorrt")
    total = plan.backend("onnxruntime-cpu").total
    just_enough = device_named(None, total / GiB + 0.01)
    too_little = device_named(None, total / GiB - 0.01)
    assert just_enough.reserved == 0 and just_enough.usable >= total
    assert make_plan("q", "t", plan.models, tokenizer_bytes=11 << 20, device=just_enough).fits("onnxruntime-cpu")
    assert not make_plan("q", "t", plan.models, tokenizer_bytes=11 << 20, device=too_little).fits("onnxruntime-cpu")
    assert plan.fits("onnxruntime-cpu") is None  # no device given


@pytest.mark.parametrize("name, memory_gb, message", [("orin-nano-8gb", 8.0, "not both"), (None, 0.0, "positive"),
                                                      ("jetson-tx2", None, "unknown")])
def test_device_choice_errors_say_what_to_do(name, memory_gb, message):
    with pytest.raises(ConfigError, match=message):
        device_named(name, memory_gb)


def test_cli_plans_a_bundle_and_checks_a_device(tiny_bundle):
    runner = CliRunner()
    result = runner.invoke(main, ["plan", str(tiny_bundle), "--device", "orin-nano-8gb"])
    assert result.exit_code == 0, result.output
    assert "fits orin-nano-8gb" in result.output and "NO" not in result.output
    assert "onnxruntime-cpu" in result.output and "KV cache" in result.output
    result = runner.invoke(main, ["plan", str(tiny_bundle), "--memory-gb", "0.05", "--json", "--backend",
                                  "onnxruntime-cpu"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert list(data["backends"]) == ["onnxruntime-cpu"] and data["backends"]["onnxruntime-cpu"]["fits"] is False
    assert data["device"]["usable"] == int(0.05 * GiB)


def test_cli_plans_a_recipe_before_building(tiny_llama_pair, tmp_path):
    target, draft = tiny_llama_pair
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(f'target = "{target}"\ndraft = "{draft}"\nwidths = [1, 2]\nmax_context = 96\n')
    runner = CliRunner()
    result = runner.invoke(main, ["plan", str(recipe), "--json", "--precision", "fp16"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["models"]["target"]["max_context"] == 96 and data["models"]["draft"]["precision"] == "fp16"
    options = runner.invoke(main, ["plan", "--target", str(target), "--draft", str(draft), "--widths", "1,2",
                                   "--max-context", "96", "--precision", "fp16", "--json"])
    assert options.exit_code == 0, options.output
    assert json.loads(options.output)["backends"] == data["backends"]
    missing = runner.invoke(main, ["plan", "--target", str(target)])
    assert missing.exit_code == 2 and "--draft" in missing.output


# -- measured -------------------------------------------------------------------------------------------------------


def _prompt_of(bundle: Path, tokens: int) -> str:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    ids = tokenizer.encode(PARAGRAPH * 20).ids[:tokens]
    return tokenizer.decode(ids)


def measure_generation(bundle: Path, prompt: str, new_tokens: int, cache: Path) -> dict[str, int]:
    """Peak RSS of a generation in a fresh process (its verified-files record kept in `cache`)."""
    env = os.environ | {"SPECTRT_CACHE": str(cache)}
    result = subprocess.run([sys.executable, "-c", DRIVER, str(bundle), prompt, str(new_tokens)], capture_output=True,
                            text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_cpu_prediction_is_within_15_percent_of_measured_peak_rss(smollm2_bundle, tmp_path):
    """SmolLM2-135M fp32 target + its 27-layer draft, a prompt of ~440 tokens of the 512-token context: the
    planner's onnxruntime-cpu total for that context and prefill against the process's VmHWM."""
    new_tokens = 40
    measured = measure_generation(smollm2_bundle, _prompt_of(smollm2_bundle, 440), new_tokens, tmp_path)
    context = measured["prompt_tokens"] + measured["new_tokens"]
    plan = plan_bundle(smollm2_bundle, context=context, prefill=measured["prompt_tokens"],
                       backends=["onnxruntime-cpu"])
    predicted = plan.backend("onnxruntime-cpu").total
    error = predicted / measured["peak"] - 1
    print(f"\nSmolLM2 pair: prompt {measured['prompt_tokens']} + {measured['new_tokens']} tokens: measured peak "
          f"{measured['peak'] / MiB:.0f} MiB (after load {measured['after_load'] / MiB:.0f} MiB), predicted "
          f"{predicted / MiB:.0f} MiB ({error:+.1%})")
    assert abs(error) <= 0.15, memory_plan.format_plan(plan)
