"""Compile a spectrt decoder ONNX graph into a TensorRT engine with fixed-width profiles.

Works with `tensorrt` (10.x/11.x) and `tensorrt_rtx` (TensorRT for RTX, which also builds
without a GPU): only the builder/parser/profile API the two share is used. Networks are strongly
typed (precision comes from the ONNX graph's types), which TensorRT 11 requires.

`compile_model_engine` is the one path from a model's graph to its engine and manifest record, shared by
`spectrt build --backend tensorrt` (compiler/build.py) and `spectrt compile` (compiler/engines.py). This
module imports neither torch, transformers nor onnx: `spectrt compile` runs where only TensorRT is.
"""

from __future__ import annotations

import shutil
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spectrt.errors import BackendUnavailableError, EngineBuildError, SpectrtError

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
    """Profile 0 is prefill (any length); then fixed-length profiles (min = opt = max new tokens S).

    Target: one per built width K, "verify_k{K}" with S = K+1. Draft: "decode" (S = 1, one draft step) and
    "decode_s2" (S = 2: after a fully accepted round the draft lacks the row of its last proposal, so the
    runtime feeds that token and the target's bonus token together). Past length is dynamic from 0 to
    whatever still fits in max_context next to the new tokens.
    """
    profiles = [_profile("prefill", (1, min(prefill_opt, max_context), max_context),
                         (0, 0, max_context - 1), num_layers, kv_heads, head_dim)]
    if role == "target":
        fixed = [(f"verify_k{k}", k + 1) for k in widths]
    else:
        fixed = [("decode", 1), ("decode_s2", 2)]
    for name, length in fixed:
        past_max = max_context - length
        profiles.append(_profile(name, (length, length, length), (0, past_max // 2, past_max),
                                 num_layers, kv_heads, head_dim))
    return profiles


def entry_profiles(role: str, entry: dict[str, Any], widths: tuple[int, ...], prefill_opt: int = 128) -> list[ProfileSpec]:
    """decoder_profiles for a manifest model entry (its arch and max_context) and the target's built widths."""
    arch = entry["arch"]
    return decoder_profiles(role, tuple(widths), entry["max_context"], arch["num_layers"], arch["num_kv_heads"],
                            arch["head_dim"], prefill_opt)


def _make_logger(trt: Any) -> Any:
    from spectrt.runtime.backends.tensorrt_logger import collecting_logger

    return collecting_logger(trt)


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


def partial_path(engine_path: Path) -> Path:
    """Where the plan is written while it is being built (renamed to `engine_path` once complete)."""
    return Path(engine_path).with_name(Path(engine_path).name + ".partial")


def _serialize_to_file(trt: Any, builder: Any, network: Any, config: Any, engine_path: Path, logger: Any) -> None:
    """Build and write the plan; streams it to disk when the TensorRT version can (saves a plan-sized copy)."""
    tmp_path = partial_path(engine_path)
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
    config = builder.create_builder_config()  # options first: a bad option fails before a long parse
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
    network, _parser = _parse_onnx(trt, builder, logger, Path(onnx_path))
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


# -- one engine per model, each in a fresh process ---------------------------------------------------


def tensorrt_record(info: EngineInfo, path: str) -> dict[str, Any]:
    """The manifest's models.<role>.backends.tensorrt record of the engine `info` describes, stored at bundle
    path `path` (engines/README.md)."""
    return {"path": path, "module": info.module, "version": info.version, "profiles": info.profiles,
            "compute_capabilities": info.compute_capabilities,
            "built_on_gpu_compute_capability": info.gpu_compute_capability,
            "build_seconds": round(info.build_seconds, 2), "strongly_typed": True}


def compile_model_engine(onnx_path: Path, engine_path: Path, profiles: list[ProfileSpec], *,
                         record_path: str | None = None, workspace_mb: int | None = None,
                         timing_cache: Path | None = None, compute_capabilities: tuple[str, ...] = ()) -> dict[str, Any]:
    """Build one model's engine from its ONNX graph in a fresh process and return its manifest record.

    The engine is written to `engine_path`; the record names it `record_path` (default: its file name), so a
    caller may build into a temporary file and rename it afterwards. Both `spectrt build --backend tensorrt`
    and `spectrt compile` go through here."""
    record_path = record_path or Path(engine_path).name
    info = build_engine_isolated(onnx_path, engine_path, profiles, label=record_path, workspace_mb=workspace_mb,
                                 timing_cache=timing_cache, compute_capabilities=tuple(compute_capabilities))
    return tensorrt_record(info, record_path)


class RemoteTraceback(Exception):
    """The traceback of an exception raised in the build process (chained as the cause of the re-raised one)."""

    def __str__(self) -> str:
        return "\n" + str(self.args[0])


def build_engine_isolated(onnx_path: Path, engine_path: Path, profiles: list[ProfileSpec], *,
                          label: str | None = None, **options: Any) -> EngineInfo:
    """`build_engine` in a fresh spawned process.

    TensorRT's peak memory (about twice the weights) does not stack on the caller's, an out-of-memory kill
    of the builder becomes a clear error instead of killing the caller, and an interrupt (Ctrl-C) or error
    here stops the builder at once (TensorRT would otherwise finish the build before Python sees the
    signal). A half-written plan (`partial_path`) never outlives this call. `label` names the engine in
    messages (default: its file name)."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    engine_path = Path(engine_path)
    label = label or engine_path.name
    process = context.Process(target=_build_worker, args=(sender, Path(onnx_path), engine_path, profiles, options),
                              name=f"spectrt-tensorrt-build-{engine_path.name}", daemon=True)
    process.start()
    sender.close()
    message = None
    answered = False
    try:
        try:
            message = receiver.recv()
        except EOFError:  # the process died without an answer
            pass
        answered = True
    finally:
        receiver.close()
        _stop_process(process, wait=60.0 if answered else 0.0)
        partial_path(engine_path).unlink(missing_ok=True)
    if message is None:
        raise EngineBuildError(_died_message(label, process.exitcode))
    status, payload, remote_traceback = message
    if status == "ok":
        return payload
    cause = RemoteTraceback(remote_traceback)
    if isinstance(payload, SpectrtError):
        raise payload from cause
    if isinstance(payload, OSError):
        raise EngineBuildError(f"building {label} failed reading or writing a file: {payload}") from cause
    if payload is None:  # an exception that cannot cross processes
        last = remote_traceback.strip().splitlines()[-1] if remote_traceback.strip() else "no traceback"
        raise EngineBuildError(f"building {label} failed in the TensorRT build process: {last}") from cause
    raise payload from cause


def _build_worker(sender: Any, onnx_path: Path, engine_path: Path, profiles: list[ProfileSpec],
                  options: dict[str, Any]) -> None:
    """The build process: one build_engine call, its EngineInfo or exception sent back through `sender`."""
    import pickle
    import signal
    import traceback

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the caller, which stops this process
    try:
        message = ("ok", build_engine(onnx_path, engine_path, profiles, **options), None)
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the caller, which decides
        text = traceback.format_exc()
        try:
            pickle.loads(pickle.dumps(exc))  # it must survive the trip, or the caller could not read the answer
        except Exception:  # noqa: BLE001
            exc = None
        message = ("error", exc, text)
    try:
        sender.send(message)
        sender.close()
    except OSError:  # the caller stopped waiting (interrupted): nobody to tell
        pass


def _stop_process(process: Any, wait: float) -> None:
    """Let `process` exit for up to `wait` seconds, then terminate it (and kill it if it ignores that)."""
    process.join(wait)
    if process.is_alive():
        process.terminate()
        process.join(10)
    if process.is_alive():
        process.kill()
        process.join()


def _died_message(name: str, exitcode: int | None) -> str:
    import signal

    if exitcode is not None and exitcode < 0:
        try:
            how = f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            how = f"was killed by signal {-exitcode}"
    else:
        how = f"exited with code {exitcode}"
    hint = ("most likely out of memory: TensorRT needs about twice the model's weights while building; close "
            "other programs, add swap, or pass a smaller --workspace-mb" if exitcode == -9 else
            "see the messages above")
    return f"the TensorRT build process for {name} {how} before it finished ({hint})."
