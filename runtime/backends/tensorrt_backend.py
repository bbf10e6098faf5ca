"""TensorRT executor: the bundle's engines run on one device-memory plan (device_plan.py).

Written against the API that TensorRT 10.3 (JetPack 6) through 10.x/11.x and TensorRT-RTX share:
`deserialize_cuda_engine`, `create_execution_context(USER_MANAGED)` + `set_device_memory(ptr, size)`
sized with `get_device_memory_size_for_profile_v2`, `set_optimization_profile_async`, `set_input_shape`,
`set_tensor_address` (every return value checked) and `execute_async_v3` on a non-default stream.

- TensorRT: one execution context per optimization profile (no profile switches on the hot path),
  all sharing the plan's one activation area (draft and target never run at the same time).
- TensorRT-RTX: a single context per engine whose profile is switched when needed (each RTX context
  holds much host memory), created from a runtime config with shape-generic kernels
  (`DynamicShapesKernelSpecializationStrategy.NONE`): the past length changes every step, and the
  default (LAZY) compiles a kernel per new shape.
- Shapes and addresses are set only when they changed since the context's last call.
- Logits rows come back through pinned host memory; the stream is synchronized once per step. That
  buffer also carries the next call's token ids in, so the decoder copies the logits out (base.Decoder).
- `close()` waits for the stream, releases the contexts, then frees the arena, the pinned buffers and
  the stream (contexts before the memory they use); `__del__` does it if nobody did.

No machine of this project can run an engine: this code is exercised in the tests through a stand-in
for the TensorRT module and the CUDA runtime that checks the same rules (256-byte addresses, shapes
within the profile) and computes with ONNX Runtime, and on a GPU by scripts/gpu_check.sh.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any

import numpy as np

from spectrt.runtime.errors import BackendUnavailableError, BundleError, GenerationError

from .device_plan import ALIGNMENT, CallPlan, DevicePlan, ModelLayout, plan_memory
from .planned import PlannedDecoder, arena_releases, decoders_on, geometry, profiles_from_manifest, release_all
from .tensorrt_logger import collecting_logger

MODULES = ("tensorrt", "tensorrt_rtx")
TRT_DTYPES = {"fp32": "FLOAT", "fp16": "HALF", "int64": "INT64"}


def import_tensorrt_runtime(preferred: str | None = None) -> Any:
    """The TensorRT module that can run the engines: `preferred` (the module the engines were built with) first."""
    order = [m for m in (os.environ.get("SPECTRT_TENSORRT_MODULE"), preferred, *MODULES) if m]
    tried = []
    for name in dict.fromkeys(order):
        try:
            module = __import__(name)
        except ImportError:
            tried.append(name)
            continue
        if hasattr(module, "Runtime"):
            return module
    raise BackendUnavailableError(
        "the TensorRT backend needs TensorRT's Python module, which is not installed here (tried "
        f"{', '.join(tried)}): on a workstation `pip install tensorrt` (or tensorrt-rtx for the engines built with it), "
        "on Jetson the JetPack package python3-libnvinfer; or run the ONNX graphs with backend='onnxruntime'.")


class TensorRTExecutor:
    """Runs CallPlans on TensorRT engines; `trt` is the TensorRT module, `cuda` a cuda_runtime.CudaRuntime."""

    name = "tensorrt"

    def __init__(self, trt: Any, cuda: Any, engine_files: dict[str, Path]):
        self.trt = trt
        self.cuda = cuda
        self.rtx = trt.__name__.startswith("tensorrt_rtx")
        self.logger = collecting_logger(trt)
        self.runtime = trt.Runtime(self.logger)
        self.engines = {role: self._deserialize(role, path) for role, path in engine_files.items()}
        self.plan: DevicePlan | None = None
        self.base = 0
        self.stream = 0
        self._host: dict[str, int] = {}  # role -> pinned host memory: token ids in, logits rows out
        self._contexts: dict[str, dict[int, Any]] = {}
        self._bound: dict[int, dict[str, Any]] = {}  # id(context) -> what was set last (shapes, addresses, profile)
        self.closed = False

    def _deserialize(self, role: str, path: Path) -> Any:
        import mmap

        # mapped, not read: file pages can be dropped again (on Jetson's unified memory a read copy would hold the
        # engine twice while TensorRT builds its own)
        with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            engine = self.runtime.deserialize_cuda_engine(mapped)
        if engine is None:
            raise BundleError(f"TensorRT ({self.trt.__name__} {self.trt.__version__}) could not load the {role} engine "
                              f"{Path(path).name}: {'; '.join(self.logger.messages[-3:]) or 'no message'}. Engines "
                              f"only run with the TensorRT version and GPU they were built for: rebuild them on this "
                              f"machine (`spectrt compile BUNDLE`).")
        return engine

    def activation_bytes(self, role: str) -> dict[int, int]:
        """Device memory a context of each profile needs (the plan's shared activation area is the largest)."""
        engine = self.engines[role]
        sizes = {}
        for index in range(engine.num_optimization_profiles):
            if hasattr(engine, "get_device_memory_size_for_profile_v2"):
                sizes[index] = int(engine.get_device_memory_size_for_profile_v2(index))
            else:  # before 10.1: one size for every profile
                sizes[index] = int(getattr(engine, "device_memory_size_v2", engine.device_memory_size))
        return sizes

    def check_io(self, layout: ModelLayout) -> None:
        """Every tensor of the plan exists in the engine with the plan's type, in linear layout."""
        engine = self.engines[layout.geometry.role]
        names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
        kv = layout.geometry.kv_dtype
        if "features" in names:
            raise BundleError(f"the {layout.geometry.role} engine returns the target's features (a bundle with a draft "
                              f"head), which the TensorRT executor does not bind yet; run this bundle with --backend "
                              f"onnxruntime.")
        wanted = {"input_ids": "int64", "logits": "fp32"}
        for layer in range(layout.geometry.num_layers):
            for kind in ("key", "value"):
                wanted[f"past_{kind}_{layer}"] = kv
                wanted[f"new_{kind}_{layer}"] = kv
        for name, dtype in wanted.items():
            if name not in names:
                raise BundleError(f"the {layout.geometry.role} engine has no tensor '{name}'; rebuild the engines.")
            actual = engine.get_tensor_dtype(name)
            if actual != getattr(self.trt.DataType, TRT_DTYPES[dtype]):
                raise BundleError(f"the {layout.geometry.role} engine's tensor '{name}' is {actual}, the bundle says "
                                  f"{dtype}; rebuild the engines.")
            if engine.get_tensor_format(name) != self.trt.TensorFormat.LINEAR:
                raise BundleError(f"the {layout.geometry.role} engine's tensor '{name}' is not in linear layout.")

    def allocate(self, plan: DevicePlan) -> None:
        """Allocate the arena, the stream, the pinned buffers and the contexts; each is recorded as soon as it
        exists, so close() frees what an allocation that failed halfway made."""
        self.plan = plan
        self.base = self.cuda.malloc(plan.nbytes)
        assert self.base % ALIGNMENT == 0
        self.stream = self.cuda.stream_create()
        for role, layout in plan.models.items():
            self._host[role] = self.cuda.malloc_host(max(layout.logits.nbytes, layout.token_ids.nbytes))
        activation = self.base + plan.activation.offset
        for role, layout in plan.models.items():
            self.check_io(layout)
            engine = self.engines[role]
            indices = [0] if self.rtx else [p.index for p in layout.profiles]
            contexts = self._contexts.setdefault(role, {})
            for index in indices:
                context = self._create_context(engine)
                contexts[index] = context
                context.set_device_memory(activation, plan.activation.nbytes)
                self._select_profile(context, index)

    def close(self) -> None:
        """Free everything allocate() made, once: wait for the stream's work, release the execution contexts
        (they use the arena's activation area), then the engines and the runtime (in that order, as TensorRT
        wants), then free the arena and the pinned buffers and destroy the stream. Idempotent; the decoders on
        this executor refuse to step afterwards."""
        if self.closed:
            return
        self.closed = True
        try:
            if self.stream:
                self.cuda.stream_synchronize(self.stream)
        finally:
            # TensorRT's Python objects free their native side when their last reference goes
            self._contexts, self._bound = {}, {}
            releases = arena_releases(self.cuda, self.base, self._host.values())
            releases += [(self.cuda.stream_destroy, self.stream)] if self.stream else []
            self.base, self._host, self.stream = 0, {}, 0
            self.engines = {}
            self.runtime = None
            release_all(releases)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def _create_context(self, engine: Any) -> Any:
        trt = self.trt
        strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        if self.rtx and hasattr(engine, "create_runtime_config"):
            config = engine.create_runtime_config()
            config.set_execution_context_allocation_strategy(strategy)
            if hasattr(trt, "DynamicShapesKernelSpecializationStrategy"):
                config.dynamic_shapes_kernel_specialization_strategy = trt.DynamicShapesKernelSpecializationStrategy.NONE
            context = engine.create_execution_context(config)
        else:
            context = engine.create_execution_context(strategy)
        if context is None:
            raise GenerationError("TensorRT could not create an execution context: "
                                  + ("; ".join(self.logger.messages[-3:]) or "no message"))
        return context

    def _select_profile(self, context: Any, index: int) -> None:
        bound = self._bound.setdefault(id(context), {})
        if bound.get("profile") == index:
            return
        if not context.set_optimization_profile_async(index, self.stream):
            raise GenerationError(f"TensorRT refused optimization profile {index}.")
        self.cuda.stream_synchronize(self.stream)  # a profile switch may enqueue copies
        bound.clear()
        bound["profile"] = index

    def write_tokens(self, layout: ModelLayout, token_ids: np.ndarray) -> None:
        from .cuda_runtime import MEMCPY_HOST_TO_DEVICE

        token_ids = np.ascontiguousarray(token_ids, dtype=np.int64)
        host = self._host[layout.geometry.role]
        self.cuda.stream_synchronize(self.stream)  # the previous step's copy out of this buffer has finished
        ctypes.memmove(host, token_ids.ctypes.data, token_ids.nbytes)
        self.cuda.memcpy_async(self.base + layout.token_ids.offset, host, token_ids.nbytes,
                               MEMCPY_HOST_TO_DEVICE, self.stream)

    def run(self, call: CallPlan) -> None:
        from .cuda_runtime import MEMCPY_DEVICE_TO_DEVICE

        contexts = self._contexts[call.role]
        context = contexts[0] if self.rtx else contexts[call.profile.index]
        if self.rtx:
            self._select_profile(context, call.profile.index)
        bound = self._bound.setdefault(id(context), {})
        for name, shape in call.input_shapes.items():
            if bound.get(("shape", name)) != shape:
                if not context.set_input_shape(name, shape):
                    raise GenerationError(f"TensorRT refused shape {shape} for '{name}' in profile "
                                          f"{call.profile.name}: {'; '.join(self.logger.messages[-2:])}")
                bound[("shape", name)] = shape
        for name, offset in call.addresses.items():
            address = self.base + offset
            if bound.get(("address", name)) != address:
                if not context.set_tensor_address(name, address):
                    raise GenerationError(f"TensorRT refused address {address:#x} for '{name}' (offset {offset}; "
                                          f"TensorRT needs {ALIGNMENT}-byte alignment).")
                bound[("address", name)] = address
        if not context.execute_async_v3(self.stream):
            raise GenerationError(f"TensorRT failed to run the {call.role} engine (profile {call.profile.name}, "
                                  f"{call.count} tokens after {call.past_length}): "
                                  + ("; ".join(self.logger.messages[-3:]) or "no message"))
        for copy in call.copies:
            self.cuda.memcpy_async(self.base + copy.destination, self.base + copy.source, copy.nbytes,
                                   MEMCPY_DEVICE_TO_DEVICE, self.stream)

    def read_logits(self, layout: ModelLayout, rows: int) -> np.ndarray:
        from .cuda_runtime import MEMCPY_DEVICE_TO_HOST

        count = rows * layout.geometry.vocab
        host = self._host[layout.geometry.role]
        self.cuda.memcpy_async(host, self.base + layout.logits.offset, count * 4, MEMCPY_DEVICE_TO_HOST,
                               self.stream)
        self.cuda.stream_synchronize(self.stream)
        return np.ctypeslib.as_array((ctypes.c_float * count).from_address(host)).reshape(rows, -1)


def load_tensorrt(manifest: Any, entries: dict[str, Any], *, trt: Any = None, cuda: Any = None
                  ) -> dict[str, PlannedDecoder]:
    """Planned decoders for `entries` (role -> ModelEntry) running the bundle's TensorRT engines."""
    problems = []
    missing = [role for role, entry in entries.items() if not entry.tensorrt]
    if missing:
        problems.append(f"the bundle has no TensorRT engine for its {' and '.join(missing)} model (build with "
                        f"--backend tensorrt, or add engines to it: `spectrt compile BUNDLE`)")
    if trt is None:
        built_with = next((e.tensorrt.get("module") for e in entries.values() if e.tensorrt), None)
        try:
            trt = import_tensorrt_runtime(built_with)
        except BackendUnavailableError as exc:
            problems.append(str(exc).rstrip("."))
    if cuda is None:
        from .cuda_runtime import cuda_runtime

        try:
            cuda = cuda_runtime()
        except BackendUnavailableError as exc:
            problems.append(str(exc).rstrip("."))
    if problems:
        raise BackendUnavailableError("the TensorRT backend cannot run here: " + "; and ".join(problems) + ".")
    executor = TensorRTExecutor(trt, cuda, {role: manifest.file(entry.tensorrt_path)
                                            for role, entry in entries.items()})
    models = [(geometry(entry), profiles_from_manifest(entry, executor.activation_bytes(role)))
              for role, entry in entries.items()]
    return decoders_on(plan_memory(models), executor)
