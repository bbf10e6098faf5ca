"""Every executor of the device-memory plan against the existing ONNX Runtime backend (host KV cache).

Executors: `cpu-planned` (ONNX Runtime CPU on a host arena, bound by address exactly as the GPU
executors bind a device arena) runs everywhere; `cuda` (ONNX Runtime CUDA on a device arena) and
`tensorrt` (real engines) need a GPU and skip here with a one-line reason. The TensorRT executor's
own code also runs here, through a stand-in for the TensorRT module and the CUDA runtime that
enforces TensorRT's rules (256-byte addresses, shapes within the context's profile, device memory
set before a call) and computes with ONNX Runtime.
"""

from __future__ import annotations

import ctypes
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from spectrt.errors import BackendUnavailableError
from spectrt.runtime.backends import device_plan, planned
from spectrt.runtime.generator import Generator

PROMPTS = ["the cat sat on", "a b a b a b a b", "once upon a time there was a little"]


def _executor_or_skip(name: str) -> str:
    from spectrt.runtime import generator

    if name == "cuda" and not generator._cuda_path_available():
        pytest.skip("ONNX Runtime CUDA executor: needs onnxruntime-gpu and an NVIDIA GPU (none here)")
    if name == "tensorrt":
        pytest.skip("TensorRT executor on real engines: needs TensorRT and a GPU that runs them (none here; "
                    "scripts/gpu_check.sh runs it on a GPU machine)")
    return name


@pytest.fixture(scope="module")
def reference(tiny_bundle):
    return Generator(tiny_bundle, threads=1, provider="cpu")


def _assert_same_greedy_output(candidate: Generator, reference: Generator) -> None:
    """Every drafter and width (plain, each built one, auto), every prompt: the same tokens."""
    for draft in ("model", "ngram"):
        for width in (0, *reference.built_widths, "auto"):
            for prompt in PROMPTS:
                options = dict(max_new_tokens=24, draft=draft, width=width)
                expected = reference.generate(prompt, **options).token_ids
                assert candidate.generate(prompt, **options).token_ids == expected, (draft, width, prompt)


@pytest.mark.parametrize("executor", ["cpu-planned", "cuda", "tensorrt"])
def test_greedy_output_equals_the_onnxruntime_backend_at_every_width_and_drafter(executor, tiny_bundle, reference,
                                                                                  monkeypatch):
    _executor_or_skip(executor)
    calls = []
    real_plan_step = planned.plan_step

    def recording_plan_step(layout, past, count):
        steps = real_plan_step(layout, past, count)
        calls.extend(steps)
        return steps

    monkeypatch.setattr(planned, "plan_step", recording_plan_step)
    candidate = Generator(tiny_bundle, threads=1, provider=executor) if executor != "tensorrt" else \
        Generator(tiny_bundle, backend="tensorrt")
    assert isinstance(getattr(candidate.target, "inner", candidate.target), planned.PlannedDecoder)
    _assert_same_greedy_output(candidate, reference)
    # the tiny models' rows (target 2x16 fp32 = 128 B, draft 1x16 = 64 B) are not 256-byte multiples: the run
    # went through staging at unaligned rows and in place at aligned ones
    assert any(c.copies for c in calls) and any(not c.copies for c in calls)


def test_a_long_step_at_an_unaligned_row_is_split_and_stays_exact(tiny_bundle, reference, monkeypatch):
    """Prefix reuse leaves the cache at an unaligned row before a long prefill: two calls, same tokens."""
    splits = []
    real_plan_step = planned.plan_step

    def recording_plan_step(layout, past, count):
        steps = real_plan_step(layout, past, count)
        if len(steps) > 1:
            splits.append((layout.geometry.role, past, count))
        return steps

    monkeypatch.setattr(planned, "plan_step", recording_plan_step)
    candidate = Generator(tiny_bundle, threads=1, provider="cpu-planned")
    shared = "one two three four five six seven"  # the second prompt repeats this prefix, then goes on
    longer = shared + " eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen"
    for prompt in (shared, longer):
        expected = reference.generate(prompt, max_new_tokens=16, draft="model", width=2).token_ids
        assert candidate.generate(prompt, max_new_tokens=16, draft="model", width=2).token_ids == expected
    assert splits, "no step was split: the test no longer covers the split path"


def test_backend_tensorrt_says_what_is_missing(tiny_bundle):
    with pytest.raises(BackendUnavailableError) as info:
        Generator(tiny_bundle, backend="tensorrt")
    message = str(info.value)
    assert "no TensorRT engine for its target and draft model" in message and "spectrt compile" in message
    try:
        from spectrt.runtime.backends.cuda_runtime import cuda_runtime

        cuda_runtime()
    except BackendUnavailableError:
        assert "CUDA" in message  # no GPU or no CUDA runtime here: said too
    import importlib.util

    if not any(importlib.util.find_spec(m) for m in ("tensorrt", "tensorrt_rtx")):
        assert "TensorRT's Python module" in message


def test_provider_auto_stays_on_cpu_without_a_device_resident_path(tiny_bundle):
    from spectrt.runtime import generator

    generator_ = Generator(tiny_bundle, threads=1)
    target = getattr(generator_.target, "inner", generator_.target)  # behind the row-count shaping, if any
    if not generator._cuda_path_available():
        from spectrt.runtime.backends.onnxruntime_backend import OrtDecoder

        assert isinstance(target, OrtDecoder) and target.providers == ["CPUExecutionProvider"]
    else:
        assert isinstance(target, planned.PlannedDecoder)


# -- the TensorRT executor through a stand-in of TensorRT and CUDA ----------------------------------------------------

class FakeCuda:
    """Host memory posing as device memory: every address is a real pointer ONNX Runtime can bind."""

    def __init__(self):
        self.buffers = []
        self.synchronized = 0

    def malloc(self, nbytes):
        buffer = np.zeros(nbytes + 512, np.uint8)
        self.buffers.append(buffer)
        return buffer.ctypes.data + (-buffer.ctypes.data % 512)

    malloc_host = malloc

    def memcpy_async(self, destination, source, nbytes, kind, stream):
        assert stream == 7, "work must go to the executor's own stream"
        ctypes.memmove(destination, source, nbytes)

    def stream_create(self):
        return 7

    def stream_synchronize(self, stream):
        self.synchronized += 1


class FakeTrt:
    """The parts of the TensorRT Python API the executor uses; an 'engine' file names the ONNX graph it stands
    for, which ONNX Runtime runs."""

    __name__ = "tensorrt"
    __version__ = "10.3.0-standin"

    class ILogger:
        class Severity:
            WARNING = 2

        def __init__(self):
            pass

    class DataType:
        FLOAT, HALF, INT64 = "FLOAT", "HALF", "INT64"

    class TensorFormat:
        LINEAR = "LINEAR"

    class ExecutionContextAllocationStrategy:
        USER_MANAGED = "USER_MANAGED"

    def __init__(self, bundle: Path):
        from spectrt.runtime.backends.onnxruntime_backend import OrtOptions, open_checked_session
        from spectrt.runtime.manifest import read_manifest

        manifest = read_manifest(bundle)
        self.engines: dict[str, FakeEngine] = {}
        fake = self

        class Runtime:
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, data):
                role = json.loads(bytes(data))["stands_for"]
                entry = manifest.target if role == "target" else manifest.draft
                session = open_checked_session(manifest.file(entry.onnx_path), entry, OrtOptions(threads=1),
                                               providers=["CPUExecutionProvider"])
                fake.engines[role] = FakeEngine(session, entry.tensorrt["profiles"], entry.logits_rows)
                return fake.engines[role]

        self.Runtime = Runtime


class FakeEngine:
    def __init__(self, session, profiles, logits_rows):
        self.session = session
        self.profiles = profiles
        self.logits_rows = logits_rows
        self.io = {a.name: a for a in (*session.get_inputs(), *session.get_outputs())}
        self.names = list(self.io)
        self.num_optimization_profiles = len(profiles)
        self.contexts = []

    @property
    def num_io_tensors(self):
        return len(self.names)

    def get_tensor_name(self, index):
        return self.names[index]

    def get_tensor_dtype(self, name):
        return {"tensor(float)": "FLOAT", "tensor(float16)": "HALF", "tensor(int64)": "INT64"}[self.io[name].type]

    def get_tensor_format(self, name):
        return "LINEAR"

    def get_device_memory_size_for_profile_v2(self, index):
        return 4096 * (index + 1)

    def create_execution_context(self, strategy):
        assert strategy == "USER_MANAGED"
        context = FakeContext(self)
        self.contexts.append(context)
        return context


class FakeContext:
    """Refuses what TensorRT refuses: unaligned addresses, shapes outside the profile, no device memory."""

    def __init__(self, engine):
        self.engine = engine
        self.profile = None
        self.memory = None
        self.shapes = {}
        self.addresses = {}
        self.calls = 0

    def set_device_memory(self, pointer, size):
        needed = max(self.engine.get_device_memory_size_for_profile_v2(i)
                     for i in range(self.engine.num_optimization_profiles))
        assert pointer % 256 == 0 and size >= needed
        self.memory = pointer

    def set_optimization_profile_async(self, index, stream):
        self.profile = index
        return True

    def set_input_shape(self, name, shape):
        low, _, high = self.engine.profiles[self.profile]["shapes"][name]
        if not all(lo <= s <= hi for lo, s, hi in zip(low, shape, high)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, address):
        if address % 256:
            return False
        self.addresses[name] = address
        return True

    def execute_async_v3(self, stream):
        assert self.memory is not None and stream == 7
        count = self.shapes["input_ids"][1]
        kv_dtype = np.float16 if self.engine.io["past_key_0"].type == "tensor(float16)" else np.float32
        binding = self.engine.session.io_binding()
        for name, arg in self.engine.io.items():
            if name in self.shapes:  # inputs: the shapes set on this context, at the addresses set on it
                dtype = np.int64 if name == "input_ids" else kv_dtype
                binding.bind_input(name, "cpu", 0, dtype, self.shapes[name], self.addresses[name])
            elif name == "logits":
                shape = (1, min(count, self.engine.logits_rows), arg.shape[2])
                binding.bind_output(name, "cpu", 0, np.float32, shape, self.addresses[name])
            else:
                binding.bind_output(name, "cpu", 0, kv_dtype, (1, count, *self.shapes["past_key_0"][2:]),
                                    self.addresses[name])
        self.engine.session.run_with_iobinding(binding)
        self.calls += 1
        return True


def _bundle_with_standin_engines(bundle: Path, tmp_path: Path) -> Path:
    """A copy of the bundle whose manifest records 'engines' (files naming the graph they stand for) with the
    profiles `spectrt build --backend tensorrt` gives engines, hashed in the files table like real ones."""
    import hashlib
    import shutil

    from spectrt.compiler.tensorrt_build import decoder_profiles

    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    for role, model in manifest["models"].items():
        arch = model["arch"]
        specs = decoder_profiles(role, tuple(model.get("widths") or ()), model["max_context"], arch["num_layers"],
                                 arch["num_kv_heads"], arch["head_dim"], prefill_opt=16)
        name = f"{role}.engine"
        (copy / name).write_text(json.dumps({"stands_for": role}))
        data = (copy / name).read_bytes()
        manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        model["backends"]["tensorrt"] = {"path": name, "module": "tensorrt", "version": FakeTrt.__version__,
                                         "profiles": [{"index": i, **spec.to_json()} for i, spec in enumerate(specs)]}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def test_tensorrt_executor_runs_the_plan_within_tensorrts_rules(tiny_bundle, reference, tmp_path, monkeypatch):
    from spectrt.runtime.backends import cuda_runtime, tensorrt_backend

    bundle = _bundle_with_standin_engines(tiny_bundle, tmp_path)
    trt, cuda = FakeTrt(bundle), FakeCuda()
    monkeypatch.setattr(tensorrt_backend, "import_tensorrt_runtime", lambda preferred=None: trt)
    monkeypatch.setattr(cuda_runtime, "cuda_runtime", lambda: cuda)
    candidate = Generator(bundle, backend="tensorrt")
    assert candidate.target.executor.name == "tensorrt"
    _assert_same_greedy_output(candidate, reference)
    target_contexts = trt.engines["target"].contexts
    assert len(target_contexts) == 1 + len(reference.built_widths)  # one context per profile
    assert all(c.calls for c in target_contexts), "prefill and every verify profile ran"
    # the draft's 2-token step (after a fully accepted round: whether one happens above depends on timing)
    for decoder in (candidate.draft, reference.draft):
        decoder.reset()
        decoder.step(np.array([5, 6, 7], np.int64))
        decoder.commit(3)
    assert np.array_equal(candidate.draft.step(np.array([8, 9], np.int64)),
                          reference.draft.step(np.array([8, 9], np.int64)))
    draft_contexts = trt.engines["draft"].contexts
    assert len(draft_contexts) == len(trt.engines["draft"].profiles) >= 2  # prefill, decode (and decode of 2 tokens)
    assert all(c.calls for c in draft_contexts), "every draft profile ran"
    assert cuda.synchronized > 0


def test_cli_backend_tensorrt_fails_in_one_line_and_cpu_planned_generates_the_same_text(tiny_bundle):
    from click.testing import CliRunner

    from spectrt.cli import main

    runner = CliRunner()
    failed = runner.invoke(main, ["generate", str(tiny_bundle), "hello", "--backend", "tensorrt"])
    assert failed.exit_code == 2 and "error: the TensorRT backend cannot run here" in failed.output
    assert "Traceback" not in failed.output
    outputs = [runner.invoke(main, ["generate", str(tiny_bundle), "the cat", "--max-new-tokens", "12", "--json",
                                    "--provider", provider, "--threads", "1"]) for provider in ("cpu", "cpu-planned")]
    assert all(r.exit_code == 0 for r in outputs), [r.output for r in outputs]
    cpu, planned_ = (json.loads(r.output) for r in outputs)
    assert cpu["token_ids"] == planned_["token_ids"] and len(cpu["token_ids"]) == 12
