"""Decoders that run on one device-memory plan (device_plan.py) through an executor.

An executor owns the arena (one allocation holding every buffer of both models) and carries out
`CallPlan`s: it binds every tensor at `base + offset`, runs the call, then does the plan's copies.
The decoder only does bookkeeping (how many rows are committed) and asks the planner for calls.
Several decoders (target and draft) share one executor: closing any of them closes it (frees the arena,
the sessions or contexts, the stream), and every decoder on it refuses to step afterwards.

Executors:
- `HostOrtExecutor`: ONNX Runtime's CPU provider on a host-memory arena. It runs exactly the plans the
  GPU executors run (offsets, staging, split calls), so their arithmetic is tested on any machine.
- `CudaOrtExecutor` (cuda_executors.py): ONNX Runtime's CUDA provider on a device arena.
- `TensorRTExecutor` (tensorrt_backend.py): TensorRT engines, one context per profile.
"""

from __future__ import annotations

import contextlib
import ctypes
from pathlib import Path
from typing import Any, Iterable, Protocol

import numpy as np

from spectrt.runtime.errors import BundleError, GenerationError

from ..kv_cache import NP_DTYPES, RowCounter
from .base import CacheBookkeeping
from .device_plan import (ALIGNMENT, CallPlan, Copy, DevicePlan, ModelGeometry, ModelLayout, Profile, dynamic_profile,
                          fixed_step_rows, plan_memory, plan_step)


class Executor(Protocol):
    name: str
    closed: bool

    def write_tokens(self, layout: ModelLayout, token_ids: np.ndarray) -> None:
        """Put a call's token ids [S] int64 at the start of the model's token slots."""

    def run(self, call: CallPlan) -> None:
        """Run one call (shapes and addresses from the plan), then its copies."""

    def read_logits(self, layout: ModelLayout, rows: int) -> np.ndarray:
        """The first `rows` rows of the model's logits buffer, [rows, V] fp32 in host memory: possibly a view into
        a buffer the next call overwrites (the decoder copies it out)."""

    def close(self) -> None:
        """Free the arena and everything else the executor holds; idempotent. Sets `closed`."""


def arena_releases(cuda: Any, base: int, pinned: Iterable[int]) -> list[tuple[Any, int]]:
    """(free function, handle) pairs for an executor's device arena (0: none) and its pinned host buffers."""
    return ([(cuda.free, base)] if base else []) + [(cuda.free_host, host) for host in pinned]


def release_all(releases: list[tuple[Any, int]]) -> None:
    """Call every (free function, handle) pair, even after one fails; then raise the first failure."""
    failures = []
    for release, handle in releases:
        try:
            release(handle)
        except Exception as exc:  # a CUDA error: free the rest anyway
            failures.append(exc)
    if failures:
        raise failures[0]


class PlannedDecoder(CacheBookkeeping):
    """A Decoder (base.Decoder) whose cache, logits and token slots live in an executor's arena."""

    def __init__(self, layout: ModelLayout, executor: Executor):
        self.layout = layout
        self.executor = executor
        self.max_context = layout.geometry.max_context
        self.vocab = layout.geometry.vocab
        self.logits_rows = layout.geometry.logits_rows
        super().__init__(RowCounter(self.max_context))

    def _forward(self, token_ids: np.ndarray) -> np.ndarray:
        if self.executor.closed:
            raise GenerationError(f"the {self.layout.geometry.role} decoder was closed (its {self.executor.name} "
                                  f"executor freed its memory); load the bundle again to generate.")
        token_ids = np.ascontiguousarray(token_ids, dtype=np.int64).reshape(-1)  # [S]
        calls = plan_step(self.layout, self.cache.length, len(token_ids))
        for call in calls:
            self.executor.write_tokens(self.layout, token_ids[call.first_token : call.first_token + call.count])
            self.executor.run(call)
        # the executor's logits buffer is rewritten by the next call (and, on TensorRT, by its token ids): copy
        logits = self.executor.read_logits(self.layout, calls[-1].logits_rows)  # [min(S, R), V]
        return np.array(logits, dtype=np.float32, copy=True)

    def close(self) -> None:
        """Close the executor this decoder shares with the other model's decoder (both stop working)."""
        self.executor.close()


def geometry(entry: Any) -> ModelGeometry:
    """ModelGeometry of a manifest ModelEntry (its graph must return the last logits_rows positions)."""
    if entry.logits_rows is None:
        raise BundleError(f"the bundle's {entry.role} graph returns logits for every position (an older bundle); "
                          f"the planned backends need graphs with logits_rows: rebuild the bundle.")
    max_fixed_step = fixed_step_rows(entry.widths)
    return ModelGeometry(entry.role, entry.num_layers, entry.num_kv_heads, entry.head_dim, entry.precision,
                         entry.logits_vocab, entry.max_context, entry.logits_rows, max_fixed_step)


class HostOrtExecutor:
    """ONNX Runtime (CPU provider) on a host-memory arena, bound by raw address exactly as a device arena is."""

    name = "onnxruntime-host"
    device = "cpu"

    def __init__(self, sessions: dict[str, Any]):
        self.sessions = sessions  # role -> InferenceSession
        self.plan: DevicePlan | None = None
        self._arena: np.ndarray | None = None
        self.base = 0
        self.closed = False

    def allocate(self, plan: DevicePlan) -> None:
        self.plan = plan
        self._arena = np.zeros(plan.nbytes + ALIGNMENT, np.uint8)
        self.base = -self._arena.ctypes.data % ALIGNMENT + self._arena.ctypes.data
        assert self.base % ALIGNMENT == 0

    def _view(self, offset: int, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
        start = self.base - self._arena.ctypes.data + offset
        count = int(np.prod(shape))
        return self._arena[start : start + count * np.dtype(dtype).itemsize].view(dtype).reshape(shape)

    def write_tokens(self, layout: ModelLayout, token_ids: np.ndarray) -> None:
        self._view(layout.token_ids.offset, np.int64, (len(token_ids),))[:] = token_ids

    def run(self, call: CallPlan) -> None:
        session = self.sessions[call.role]
        binding = session.io_binding()
        kv_dtype = NP_DTYPES[self.plan.models[call.role].geometry.kv_dtype]
        for name, shape in call.input_shapes.items():
            dtype = np.int64 if name == "input_ids" else kv_dtype
            binding.bind_input(name, self.device, 0, dtype, shape, self.base + call.addresses[name])
        for name, shape in call.output_shapes.items():
            dtype = np.float32 if name == "logits" else kv_dtype
            binding.bind_output(name, self.device, 0, dtype, shape, self.base + call.addresses[name])
        session.run_with_iobinding(binding)
        self._copy_rows(call.copies)

    def _copy_rows(self, copies: tuple[Copy, ...]) -> None:
        """The plan's copies after a call: staged K/V rows into the cache."""
        for copy in copies:
            ctypes.memmove(self.base + copy.destination, self.base + copy.source, copy.nbytes)

    def read_logits(self, layout: ModelLayout, rows: int) -> np.ndarray:
        return self._view(layout.logits.offset, np.float32, (rows, layout.geometry.vocab))

    def close(self) -> None:
        """Drop the sessions and the arena (ONNX Runtime frees a session when its last reference goes)."""
        self.closed = True
        self.sessions = {}
        self._arena = None
        self.base = 0


def decoders_on(plan: DevicePlan, executor: Any) -> dict[str, PlannedDecoder]:
    """Give `executor` the arena of `plan`, and one PlannedDecoder per model of it."""
    try:
        executor.allocate(plan)
    except BaseException:
        with contextlib.suppress(Exception):  # the allocation's error is the one to report
            executor.close()  # frees what was allocated before the failure
        raise
    return {role: PlannedDecoder(layout, executor) for role, layout in plan.models.items()}


def _ort_planned(entries: dict[str, Any], onnx_files: dict[str, Path], options: Any, providers: list[str],
                 make_executor: Any) -> dict[str, PlannedDecoder]:
    """Checked ONNX Runtime sessions for `entries` on `providers`, one arena for all (one dynamic profile each)."""
    from .onnxruntime_backend import open_checked_session

    sessions = {role: open_checked_session(onnx_files[role], entry, options, providers=providers)
                for role, entry in entries.items()}
    geometries = [geometry(entry) for entry in entries.values()]
    return decoders_on(plan_memory([(g, (dynamic_profile(g),)) for g in geometries]), make_executor(sessions))


def load_host_planned(entries: dict[str, Any], onnx_files: dict[str, Path], options: Any) -> dict[str, PlannedDecoder]:
    """Planned decoders for `entries` (role -> ModelEntry) on one host arena."""
    return _ort_planned(entries, onnx_files, options, ["CPUExecutionProvider"], HostOrtExecutor)


def profiles_from_manifest(entry: Any, activation_bytes: dict[int, int]) -> tuple[Profile, ...]:
    """The engine's optimization profiles as recorded in the manifest (input_ids gives S, past_key_0 gives P)."""
    profiles = []
    for record in entry.tensorrt["profiles"]:
        shapes = record["shapes"]
        seq = shapes["input_ids"]
        past = shapes["past_key_0"]
        profiles.append(Profile(record["index"], record["name"], (seq[0][1], seq[2][1]), (past[0][1], past[2][1]),
                                activation_bytes.get(record["index"], 0)))
    return tuple(profiles)


class CudaOrtExecutor(HostOrtExecutor):
    """ONNX Runtime's CUDA provider on a device arena (cudaMalloc): the KV cache never leaves the GPU; per step
    the token ids go in and the logits rows the picker needs come back (into pinned host memory).

    `run_with_iobinding` synchronizes the device at its end (ONNX Runtime's default), so the copies after a
    call, and the logits read, see its results."""

    name = "onnxruntime-cuda"
    device = "cuda"

    def __init__(self, sessions: dict[str, Any], cuda: Any):
        super().__init__(sessions)
        self.cuda = cuda  # cuda_runtime.CudaRuntime
        self._host: dict[str, int] = {}  # role -> pinned host memory for its logits rows

    def allocate(self, plan: DevicePlan) -> None:
        self.plan = plan
        self.base = self.cuda.malloc(plan.nbytes)  # cudaMalloc returns 256-byte (or better) aligned memory
        assert self.base % ALIGNMENT == 0
        for role, layout in plan.models.items():  # one by one: close() frees those made before a failure
            self._host[role] = self.cuda.malloc_host(layout.logits.nbytes)

    def write_tokens(self, layout: ModelLayout, token_ids: np.ndarray) -> None:
        from .cuda_runtime import MEMCPY_HOST_TO_DEVICE

        token_ids = np.ascontiguousarray(token_ids, dtype=np.int64)
        self.cuda.memcpy(self.base + layout.token_ids.offset, token_ids.ctypes.data, token_ids.nbytes,
                         MEMCPY_HOST_TO_DEVICE)
        self.cuda.synchronize()  # a pageable H2D copy may return before its DMA ends; ORT runs on its own stream

    def _copy_rows(self, copies: tuple[Copy, ...]) -> None:
        from .cuda_runtime import MEMCPY_DEVICE_TO_DEVICE

        for copy in copies:
            self.cuda.memcpy(self.base + copy.destination, self.base + copy.source, copy.nbytes,
                             MEMCPY_DEVICE_TO_DEVICE)
        if copies:
            self.cuda.synchronize()  # device-to-device cudaMemcpy does not wait for the copy to end

    def read_logits(self, layout: ModelLayout, rows: int) -> np.ndarray:
        from .cuda_runtime import MEMCPY_DEVICE_TO_HOST

        nbytes = rows * layout.geometry.vocab * 4
        host = self._host[layout.geometry.role]
        self.cuda.memcpy(host, self.base + layout.logits.offset, nbytes, MEMCPY_DEVICE_TO_HOST)
        pinned = (ctypes.c_float * (rows * layout.geometry.vocab)).from_address(host)
        return np.ctypeslib.as_array(pinned).reshape(rows, layout.geometry.vocab)

    def close(self) -> None:
        """Wait for the device, drop the sessions (their CUDA memory goes with them), free the arena and the pinned
        buffers, each once. Idempotent."""
        if self.closed:
            return
        self.closed = True
        try:
            if self.base:
                self.cuda.synchronize()  # nothing may still read or write the arena
        finally:
            self.sessions = {}
            releases = arena_releases(self.cuda, self.base, self._host.values())
            self.base, self._host = 0, {}
            release_all(releases)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def load_cuda_planned(entries: dict[str, Any], onnx_files: dict[str, Path], options: Any) -> dict[str, PlannedDecoder]:
    """Planned decoders for `entries` on one device arena, run by ONNX Runtime's CUDA provider."""
    from .cuda_runtime import cuda_runtime
    from .onnxruntime_backend import _import_ort

    ort = _import_ort()
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        from spectrt.runtime.errors import BackendUnavailableError

        raise BackendUnavailableError(f"ONNX Runtime here has no CUDA provider (have {ort.get_available_providers()});"
                                      f" install onnxruntime-gpu on a machine with an NVIDIA GPU, or use provider 'cpu'.")
    cuda = cuda_runtime()
    return _ort_planned(entries, onnx_files, options, ["CUDAExecutionProvider", "CPUExecutionProvider"],
                        lambda sessions: CudaOrtExecutor(sessions, cuda))
