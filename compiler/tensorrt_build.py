"""Compile a spectrt decoder ONNX graph into a TensorRT engine with fixed-width profiles.

Works with `tensorrt` (10.x/11.x) and `tensorrt_rtx` (TensorRT for RTX, which also builds
without a GPU): only the builder/parser/profile API the two share is used. Networks are strongly
typed (precision comes from the ONNX graph's types), which TensorRT 11 requires.
"""

from __future__ import annotations

import shutil
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spectrt.errors import BackendUnavailableError, EngineBuildError

INSTALL_HINT = ("install TensorRT (`pip install spectrt[tensorrt]`, needs an NVIDIA GPU machine) or TensorRT-RTX "
                "(`pip install spectrt[tensorrt-rtx]`, builds engines even without a GPU), or build with --backend onnx.")


def import_tensorrt() -> Any:
    """The TensorRT module: `tensorrt` when installed, else `tensorrt_rtx`."""
    for module_name in ("tensorrt", "tensorrt_rtx"):
        try:
            module = __import__(module_name)
        except ImportError:
            continue
        if hasattr(module, "Builder"):
            return module
    raise BackendUnavailableError(f"--backend tensorrt needs TensorRT, which is not installed: {INSTALL_HINT}")


@dataclass(frozen=True)
class ProfileSpec:
    """One optimization profile: input name -> (min, opt, max) shapes."""

    name: str
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shapes": {k: [list(s) for s in v] for k, v in self.shapes.items()}}


def _kv_inputs(num_layers: int) -> list[str]:
    return [f"past_{kind}_{i}" for i in range(num_layers) for kind in ("key", "value")]


def _profile(name: str, seq: tuple[int, int, int], past: tuple[int, int, int], num_layers: int,
             kv_heads: int, head_dim: int) -> ProfileSpec:
    shapes = {"input_ids": tuple((1, s) for s in seq)}
    for kv_name in _kv_inputs(num_layers):
        shapes[kv_name] = tuple((1, p, kv_heads, head_dim) for p in past)
    return ProfileSpec(name, shapes)


def decoder_profiles(role: str, widths: tuple[int, ...], max_context: int, num_layers: int, kv_heads: int,
                     head_dim: int, prefill_opt: int = 128) -> list[ProfileSpec]:
    """Profile 0 is prefill (any length); the target adds one fixed K+1 profile per width, the draft one of length 1.

    Past length is dynamic from 0 to whatever still fits in max_context next to the new tokens.
    """
    profiles = [_profile("prefill", (1, min(prefill_opt, max_context), max_context),
                         (0, 0, max_context - 1), num_layers, kv_heads, head_dim)]
    lengths = [k + 1 for k in widths] if role == "target" else [1]
    for length in lengths:
        name = f"verify_k{length - 1}" if role == "target" else "decode"
        past_max = max_context - length
        profiles.append(_profile(name, (length, length, length), (0, past_max // 2, past_max),
                                 num_layers, kv_heads, head_dim))
    return profiles


def _make_logger(trt: Any) -> Any:
    class CollectingLogger(trt.ILogger):
        """Keeps warnings/errors so a failed build can say what TensorRT said."""

        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity <= trt.ILogger.Severity.WARNING:
                self.messages.append(f"[{severity.name}] {msg}")

    return CollectingLogger()


def _capsule_pointer(capsule: Any) -> int:
    import ctypes

    get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    get_pointer.restype = ctypes.c_void_p
    get_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
    return get_pointer(capsule, None)


def _make_file_writer(trt: Any, handle: Any) -> Any:
    import ctypes

    class FileStreamWriter(trt.IStreamWriter):
        """Writes the engine to disk chunk by chunk instead of holding the whole plan in memory."""

        def __init__(self) -> None:
            trt.IStreamWriter.__init__(self)
            self.written = 0

        def write(self, data: Any, size: int | None = None) -> int:
            if size is None:  # bindings that pass a buffer object
                chunk = memoryview(data).cast("B")
                handle.write(chunk)
                size = chunk.nbytes
            else:  # bindings that pass a capsule/pointer plus a size
                pointer = data if isinstance(data, int) else _capsule_pointer(data)
                handle.write(ctypes.string_at(pointer, size))
            self.written += size
            return size

    return FileStreamWriter()


def _serialize_to_file(trt: Any, builder: Any, network: Any, config: Any, engine_path: Path, logger: Any) -> None:
    """Build and write the plan; streams it to disk when the TensorRT version can (saves a plan-sized copy)."""
    tmp_path = engine_path.with_name(engine_path.name + ".partial")
    try:
        with open(tmp_path, "wb") as handle:
            if hasattr(builder, "build_serialized_network_to_stream") and hasattr(trt, "IStreamWriter"):
                writer = _make_file_writer(trt, handle)
                ok = builder.build_serialized_network_to_stream(network, config, writer) and writer.written > 0
            else:
                serialized = builder.build_serialized_network(network, config)
                ok = serialized is not None
                if ok:
                    handle.write(memoryview(serialized))
                    del serialized
        if not ok:
            raise EngineBuildError(f"TensorRT failed to build an engine for {engine_path.name}: "
                                   + ("; ".join(logger.messages[-8:]) or "no message from TensorRT"))
        tmp_path.replace(engine_path)
    finally:
        tmp_path.unlink(missing_ok=True)


def gpu_compute_capability() -> str | None:
    """The local GPU's compute capability (e.g. '8.7' on Jetson Orin), or None without a GPU."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if out.returncode == 0 and lines else None


@dataclass(frozen=True)
class EngineInfo:
    path: Path
    module: str
    version: str
    profiles: list[dict[str, Any]]
    compute_capabilities: list[str]
    gpu_compute_capability: str | None
    build_seconds: float
    size_bytes: int


def _parse_onnx(trt: Any, builder: Any, logger: Any, onnx_path: Path) -> tuple[Any, Any]:
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    if network is None:
        raise EngineBuildError("TensorRT could not create a network definition.")
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = []
        for i in range(parser.num_errors):
            err = parser.get_error(i)
            errors.append(f"node {err.node()} ({err.node_name() or '?'}, {err.node_operator() or '?'}): {err.desc()}")
        raise EngineBuildError(f"TensorRT could not parse {onnx_path.name}: " + "; ".join(errors or logger.messages[-5:]))
    return network, parser


def _add_profiles(builder: Any, config: Any, network: Any, profiles: list[ProfileSpec]) -> list[dict[str, Any]]:
    """Add every profile, then read the shapes back from TensorRT to record what was really set."""
    inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    recorded = []
    for spec in profiles:
        profile = builder.create_optimization_profile()
        missing = inputs - set(spec.shapes)
        if missing:
            raise EngineBuildError(f"profile '{spec.name}' has no shapes for inputs {sorted(missing)}")
        for name, (smin, sopt, smax) in spec.shapes.items():
            if name not in inputs:
                raise EngineBuildError(f"profile '{spec.name}' names input '{name}', which the network does not have")
            profile.set_shape(name, smin, sopt, smax)
        if hasattr(profile, "is_valid") and not profile.is_valid():  # not every TensorRT flavour has it
            raise EngineBuildError(f"profile '{spec.name}' is invalid (min <= opt <= max must hold for every input)")
        index = config.add_optimization_profile(profile)
        if index < 0:
            raise EngineBuildError(f"TensorRT refused optimization profile '{spec.name}' ({spec.shapes['input_ids']})")
        read_back = {name: [list(s) for s in profile.get_shape(name)] for name in sorted(spec.shapes)}
        recorded.append({"index": index, "name": spec.name, "shapes": read_back})
    return recorded


def build_engine(onnx_path: Path, engine_path: Path, profiles: list[ProfileSpec], *, workspace_mb: int | None = None,
                 timing_cache: Path | None = None, compute_capabilities: tuple[str, ...] = ()) -> EngineInfo:
    """Parse `onnx_path`, add `profiles`, build and write the serialized engine to `engine_path`."""
    import time

    trt = import_tensorrt()
    start = time.perf_counter()
    logger = _make_logger(trt)
    builder = trt.Builder(logger)
    if builder is None:
        raise EngineBuildError("TensorRT could not create a builder: " + "; ".join(logger.messages[-5:]))
    network, _parser = _parse_onnx(trt, builder, logger, Path(onnx_path))
    config = builder.create_builder_config()
    if workspace_mb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    if compute_capabilities:
        if not hasattr(config, "set_compute_capability"):
            raise EngineBuildError("--compute-capabilities is a TensorRT-RTX option; TensorRT builds for the local GPU.")
        config.num_compute_capabilities = len(compute_capabilities)
        for i, cc in enumerate(compute_capabilities):
            try:
                value = getattr(trt.ComputeCapability, cc.upper())
            except AttributeError:
                known = [m for m in trt.ComputeCapability.__members__ if m.startswith("SM")]
                raise EngineBuildError(f"unknown compute capability '{cc}'; TensorRT-RTX knows {known}") from None
            if not config.set_compute_capability(value, i):
                raise EngineBuildError(f"TensorRT-RTX refused compute capability {cc}")
    cache = None
    if timing_cache is not None:  # TensorRT-RTX accepts but ignores timing caches (it tunes at run time)
        blob = Path(timing_cache).read_bytes() if Path(timing_cache).is_file() else b""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            cache = config.create_timing_cache(blob)
            if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
                raise EngineBuildError(f"TensorRT could not use timing cache {timing_cache}; delete it and rebuild.")
    recorded = _add_profiles(builder, config, network, profiles)
    engine_path = Path(engine_path)
    _serialize_to_file(trt, builder, network, config, engine_path, logger)
    del network, _parser
    if cache is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            Path(timing_cache).write_bytes(memoryview(config.get_timing_cache().serialize()))
    return EngineInfo(
        path=engine_path,
        module=trt.__name__,
        version=trt.__version__,
        profiles=recorded,
        compute_capabilities=list(compute_capabilities),
        gpu_compute_capability=gpu_compute_capability(),
        build_seconds=time.perf_counter() - start,
        size_bytes=engine_path.stat().st_size,
    )
