"""Every executor of the device-memory plan against the existing ONNX Runtime backend (host KV cache).

Executors: `cpu-planned` (ONNX Runtime CPU on a host arena, bound by address exactly as the GPU
executors bind a device arena) runs everywhere; `cuda` (ONNX Runtime CUDA on a device arena) and
`tensorrt` (real engines) need a GPU and skip here with a one-line reason (the TensorRT case runs
wherever the runtime's own checks find a TensorRT module and a CUDA GPU). The TensorRT executor's
own code also runs here, through a stand-in for the TensorRT module and the CUDA runtime that
enforces TensorRT's rules (256-byte addresses, shapes within the context's profile, device memory
set before a call, no memory freed under a live context, nothing freed twice) and computes with
ONNX Runtime; the ONNX Runtime CUDA executor's own code runs on the same CUDA stand-in.
"""

from __future__ import annotations

import ctypes
import json
import weakref
from pathlib import Path

import numpy as np
import pytest

from spectrt.errors import BackendUnavailableError, GenerationError
from spectrt.runtime.backends import planned
from spectrt.runtime.generator import Generator

PROMPTS = ["the cat sat on", "a b a b a b a b", "once upon a time there was a little"]


def _tensorrt_unavailable() -> str | None:
    """Why the runtime's TensorRT path cannot run here (what load_tensorrt would say), or None where it can."""
    from spectrt.runtime.backends.cuda_runtime import cuda_runtime
    from spectrt.runtime.backends.tensorrt_backend import import_tensorrt_runtime

    try:
        import_tensorrt_runtime()
        cuda_runtime()
    except BackendUnavailableError as exc:
        return str(exc)
    return None


def _executor_or_skip(name: str) -> str:
    from spectrt.runtime import generator

    if name == "cuda" and not generator._cuda_path_available():
        pytest.skip("ONNX Runtime CUDA executor: needs onnxruntime-gpu and an NVIDIA GPU (none here)")
    if name == "tensorrt" and (reason := _tensorrt_unavailable()):
        pytest.skip(f"TensorRT executor on real engines: {reason}")
    return name


@pytest.fixture(scope="module")
def tensorrt_bundle(tiny_llama_pair, tmp_path_factory):
    """The tiny bundle's pair and settings with TensorRT engines built on this machine (requested only where
    TensorRT and a GPU are present)."""
    from spectrt.compiler.build import build_bundle
    from spectrt.compiler.config import BuildConfig
    from spectrt.compiler.progress import Progress

    out = tmp_path_factory.mktemp("bundles") / "tiny-tensorrt"
    target, draft = tiny_llama_pair
    build_bundle(BuildConfig(target=str(target), draft=str(draft), widths=(1, 2, 3, 5), max_context=128,
                             backend="all", prefill_opt=16, out=str(out)), progress=Progress(quiet=True))
    return out


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
                                                                                  monkeypatch, request):
    _executor_or_skip(executor)
    calls = []
    real_plan_step = planned.plan_step

    def recording_plan_step(layout, past, count):
        steps = real_plan_step(layout, past, count)
        calls.extend(steps)
        return steps

    monkeypatch.setattr(planned, "plan_step", recording_plan_step)
    if executor == "tensorrt":  # engines of the same pair, compared with ONNX Runtime on their own bundle's graphs
        bundle = request.getfixturevalue("tensorrt_bundle")
        reference = Generator(bundle, threads=1, provider="cpu")
        candidate = Generator(bundle, backend="tensorrt")
    else:
        candidate = Generator(tiny_bundle, threads=1, provider=executor)
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

LIVE_CONTEXTS: "weakref.WeakSet[FakeContext]" = weakref.WeakSet()  # stand-in contexts nobody has released yet


class FakeCuda:
    """Host memory posing as device memory: every address is a real pointer ONNX Runtime can bind. Keeps the
    account of allocations and refuses what CUDA would punish: a double free, a free of memory that a live
    execution context still uses, work on a destroyed stream."""

    STREAM = 7

    def __init__(self):
        self.live: dict[int, tuple[str, int]] = {}  # pointer -> (kind: device | host, bytes), not freed yet
        self.blocks: list[tuple[int, int]] = []  # (pointer, bytes) of every allocation, freed or not
        self.buffers = []  # every buffer ever handed out, kept so a use after free reads stale bytes, not a crash
        self.log: list[tuple[str, int]] = []  # (call, pointer or stream), in order
        self.streams: list[int] = []  # created and not destroyed
        self.synchronized = 0

    def _allocate(self, nbytes, kind):
        buffer = np.zeros(nbytes + 512, np.uint8)
        self.buffers.append(buffer)
        pointer = buffer.ctypes.data + (-buffer.ctypes.data % 512)
        self.live[pointer] = (kind, nbytes)
        self.blocks.append((pointer, nbytes))
        self.log.append((f"malloc_{kind}", pointer))
        return pointer

    def malloc(self, nbytes):
        return self._allocate(nbytes, "device")

    def malloc_host(self, nbytes):
        return self._allocate(nbytes, "host")

    def _release(self, pointer, kind):
        assert self.live.get(pointer, ("",))[0] == kind, f"{kind} memory {pointer:#x} freed twice or never allocated"
        nbytes = self.live.pop(pointer)[1]
        assert not any(c.memory is not None and pointer <= c.memory < pointer + nbytes for c in LIVE_CONTEXTS), \
            "device memory freed while an execution context that uses it is alive"
        self.log.append((f"free_{kind}", pointer))

    def free(self, pointer):
        self._release(pointer, "device")

    def free_host(self, pointer):
        self._release(pointer, "host")

    def memcpy(self, destination, source, nbytes, kind):
        ctypes.memmove(destination, source, nbytes)

    def memcpy_async(self, destination, source, nbytes, kind, stream):
        assert stream in self.streams, "work must go to the executor's own (live) stream"
        ctypes.memmove(destination, source, nbytes)

    def synchronize(self):
        self.synchronized += 1
        self.log.append(("synchronize", 0))

    def stream_create(self):
        self.streams.append(self.STREAM)
        self.log.append(("stream_create", self.STREAM))
        return self.STREAM

    def stream_synchronize(self, stream):
        assert stream in self.streams
        self.synchronized += 1
        self.log.append(("stream_synchronize", stream))

    def stream_destroy(self, stream):
        assert stream in self.streams, f"stream {stream} destroyed twice or never created"
        self.streams.remove(stream)
        self.log.append(("stream_destroy", stream))

    def contexts_using_memory(self) -> list:
        """Live stand-in execution contexts whose device memory came from this FakeCuda."""
        return [c for c in LIVE_CONTEXTS
                if c.memory is not None and any(p <= c.memory < p + n for p, n in self.blocks)]

    def unreleased(self) -> list:
        """What was allocated or created and not freed or destroyed."""
        return [*self.live.items(), *(("stream", s) for s in self.streams)]


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
        self._contexts = []  # weak: the executor owns its contexts, releasing them is what close() must do

    @property
    def contexts(self):
        """The contexts created on this engine that are still alive."""
        return [context for context in (ref() for ref in self._contexts) if context is not None]

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
        self._contexts.append(weakref.ref(context))
        LIVE_CONTEXTS.add(context)
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
        assert self.memory is not None and stream == FakeCuda.STREAM
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
    target_contexts, draft_contexts = trt.engines["target"].contexts, trt.engines["draft"].contexts
    assert len(target_contexts) == 1 + len(reference.built_widths)  # one context per profile
    assert len(draft_contexts) == len(trt.engines["draft"].profiles) >= 2  # prefill, decode (and decode of 2 tokens)
    # which profiles the generations above used depends on the `auto` width's timings and on the call shaping
    # measured here: drive every profile directly instead, at fixed lengths, against the ONNX Runtime decoders
    for context in (*target_contexts, *draft_contexts):
        context.calls = 0
    _assert_same_logits_after_a_prefill(_unshaped(candidate.target), _unshaped(reference.target),
                                        [width + 1 for width in reference.built_widths])  # prefill, every verify
    _assert_same_logits_after_a_prefill(candidate.draft, reference.draft, [1, 2])  # 2: after a fully accepted round
    assert all(c.calls for c in target_contexts), "prefill and every verify profile ran"
    assert all(c.calls for c in draft_contexts), "every draft profile ran"
    assert cuda.synchronized > 0


def _unshaped(decoder):
    return getattr(decoder, "inner", decoder)  # behind the row-count shaping, if any


def _assert_same_logits_after_a_prefill(candidate, reference, counts, prefix=(3, 1, 4, 1, 5, 9, 2)):
    """For each count: prefill `prefix`, then one step of `count` tokens; both decoders give the same logits."""
    for count in counts:
        for decoder in (candidate, reference):
            decoder.reset()
            decoder.step(np.array(prefix, np.int64))
            decoder.commit(len(prefix))
        tokens = np.arange(10, 10 + count, dtype=np.int64)
        assert np.array_equal(candidate.step(tokens), reference.step(tokens)), count


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


# -- lifetime and logits ownership, on every executor the tests can run ----------------------------------------------

class HostCudaOrtExecutor(planned.CudaOrtExecutor):
    """The ONNX Runtime CUDA executor's own code (allocation, copies, close) on FakeCuda's host memory, which ONNX
    Runtime's CPU provider binds."""

    device = "cpu"


STANDIN_KINDS = ["cpu", "cpu-planned", "cuda-standin", "tensorrt-standin"]


def _generator_on(kind: str, tiny_bundle: Path, tmp_path: Path, monkeypatch) -> tuple[Generator, FakeCuda | None]:
    """A Generator on the tiny bundle run by `kind` (the stand-ins through FakeCuda, which is returned)."""
    from spectrt.runtime.backends import cuda_runtime, tensorrt_backend

    if kind in ("cpu", "cpu-planned"):
        return Generator(tiny_bundle, threads=1, provider=kind), None
    cuda = FakeCuda()
    if kind == "cuda-standin":
        monkeypatch.setattr(planned, "load_cuda_planned", lambda entries, onnx_files, options: planned._ort_planned(
            entries, onnx_files, options, ["CPUExecutionProvider"], lambda sessions: HostCudaOrtExecutor(sessions, cuda)))
        return Generator(tiny_bundle, threads=1, provider="cuda"), cuda
    bundle = _bundle_with_standin_engines(tiny_bundle, tmp_path)
    trt = FakeTrt(bundle)
    monkeypatch.setattr(tensorrt_backend, "import_tensorrt_runtime", lambda preferred=None: trt)
    monkeypatch.setattr(cuda_runtime, "cuda_runtime", lambda: cuda)
    return Generator(bundle, backend="tensorrt"), cuda


def _sessions(decoder) -> list:
    """The ONNX Runtime sessions a decoder holds (its own, or its executor's)."""
    if getattr(decoder, "session", None) is not None:
        return [decoder.session]
    return list(getattr(getattr(decoder, "executor", None), "sessions", {}).values())


@pytest.mark.parametrize("kind", STANDIN_KINDS)
def test_generator_close_frees_everything_once_and_later_steps_refuse(kind, tiny_bundle, tmp_path, monkeypatch):
    generator_, cuda = _generator_on(kind, tiny_bundle, tmp_path, monkeypatch)
    assert generator_.generate("the cat sat on", max_new_tokens=6, draft="model", width=2).token_ids
    target, draft = _unshaped(generator_.target), generator_.draft
    sessions = [weakref.ref(s) for s in (*_sessions(target), *_sessions(draft))]
    if kind != "tensorrt-standin":  # the stand-in engines hold their own sessions: TensorRT has none to release
        assert sessions
    allocated = [entry for entry in (cuda.log if cuda else []) if entry[0].startswith(("malloc", "stream_create"))]
    assert not kind.endswith("standin") or allocated
    if kind == "tensorrt-standin":
        assert cuda.contexts_using_memory()  # one per profile, until close()
    calls_before_close = len(cuda.log) if cuda else 0
    generator_.close()
    assert all(ref() is None for ref in sessions), "a session outlived close()"
    if cuda is not None:
        assert cuda.unreleased() == [], "allocated and never freed"
        frees = [pointer for call, pointer in cuda.log if call.startswith("free")]
        assert sorted(frees) == sorted(p for call, p in allocated if call.startswith("malloc"))  # each exactly once
        closing = [call for call, _ in cuda.log[calls_before_close:]]
        assert "synchronize" in closing[0], f"close() must wait for the device before it frees: {closing}"
    if kind == "tensorrt-standin":
        assert not cuda.contexts_using_memory(), "an execution context outlived close()"
        assert [call for call, _ in cuda.log].count("stream_destroy") == 1
    calls_after_close = len(cuda.log) if cuda else 0
    for decoder in (target, draft):  # closing again, one decoder after another of a shared executor: nothing more
        decoder.close()
        with pytest.raises(GenerationError, match="closed"):
            decoder.step(np.array([1, 2], np.int64))
    assert (len(cuda.log) if cuda else 0) == calls_after_close


def _shaped_planned_target(tiny_bundle: Path) -> object:
    """The planned target behind a ShapedDecoder that runs every token as its own call (multi-call steps)."""
    from spectrt.runtime.invariance import CallShape, ShapedDecoder

    inner = _unshaped(Generator(tiny_bundle, threads=1, provider="cpu-planned").target)
    return ShapedDecoder(inner, CallShape(rows=(1,), seconds=(1.0,), visible=inner.logits_rows), None)


@pytest.mark.parametrize("kind", [*STANDIN_KINDS, "shaped"])
def test_logits_of_a_step_stay_the_callers_through_later_steps_and_a_rollback(kind, tiny_bundle, tmp_path,
                                                                              monkeypatch):
    """Verification keeps a step's logits and reads its rows lazily: no later step of the decoder, nor of the other
    decoder on its executor, nor its token ids written into a shared host buffer, may change them."""
    if kind == "shaped":
        decoders = [_shaped_planned_target(tiny_bundle)]
    else:
        generator_, _ = _generator_on(kind, tiny_bundle, tmp_path, monkeypatch)
        decoders = [_unshaped(generator_.target), generator_.draft]
        if generator_.target is not decoders[0]:  # the shaping this machine measured wraps the target
            decoders.append(generator_.target)
    for decoder in decoders:
        decoder.reset()
        held = decoder.step(np.array([5, 6, 7], np.int64))  # [min(3, R), V]
        kept = held.copy()
        decoder.commit(3)
        following = decoder.step(np.array([8], np.int64)).copy()  # [1, V]
        assert not np.array_equal(following[0], kept[0])  # a view of a reused buffer would now show these
        decoder.commit(1)
        for other in decoders:  # the other model's step on a shared executor
            if other is not decoder:
                other.step(np.array([9], np.int64))
        assert np.array_equal(held, kept), f"{kind} {type(decoder).__name__}: a later step changed held logits"
        decoder.rollback(2)
        decoder.step(np.array([9, 10, 11], np.int64))
        assert np.array_equal(held, kept), f"{kind} {type(decoder).__name__}: a step after a rollback changed held logits"
