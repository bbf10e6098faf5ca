"""ONNX Runtime backend: one InferenceSession per model, inputs and outputs bound in place."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spectrt.runtime.errors import BackendUnavailableError, BundleError, GenerationError

from ..kv_cache import KVCache, RowCounter
from .base import CacheBookkeeping
from ..manifest import TensorSpec, compare_io, expected_graph_io


# Graph rewrites whose kernels give a token different logits depending on how many tokens share the
# call. Verifying K+1 tokens must give each token exactly what a one-token step gives it, or greedy
# speculative output drifts from plain decoding. MatMulScaleFusion turns the attention's
# Mul(q, 1/sqrt(d)) + MatMul into FusedMatMul, measured here to move logits by ~0.07 between a
# 1-token and a 3-token call of a quantized graph.
BATCH_DEPENDENT_OPTIMIZERS = ["MatMulScaleFusion"]


@dataclass(frozen=True)
class OrtOptions:
    """Session settings; threads=0 lets onnxruntime pick."""

    threads: int = 0
    provider: str = "auto"  # auto | cpu | cuda
    optimization: str = "all"  # all | extended | basic | disabled
    spinning: bool = True  # worker threads spin after a run; off for a small model that alternates with a big one
    # (the draft head): its spinning threads otherwise slow the target's next call (measured 72 -> 97 ms per
    # 2-token verification of the int4 Qwen 1.5B target on 2 cores)


def _import_ort():
    try:
        import onnxruntime
    except ImportError:
        raise BackendUnavailableError(
            "the ONNX Runtime backend needs onnxruntime: `pip install spectrt[onnxruntime]` "
            "(or spectrt[onnxruntime-gpu] on a CUDA machine)."
        ) from None
    return onnxruntime


def _providers(ort, choice: str) -> list[str]:
    available = ort.get_available_providers()
    if choice == "cpu":
        return ["CPUExecutionProvider"]
    if choice == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise BackendUnavailableError(f"CUDA execution provider not available (have {available}); "
                                          f"install onnxruntime-gpu on a machine with an NVIDIA GPU or use provider 'cpu'.")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


ORT_TYPES = {"int64": "tensor(int64)", "fp32": "tensor(float)", "fp16": "tensor(float16)"}


def _create_session(ort, onnx_path: Path, session_options, providers: list[str], role: str):
    """An InferenceSession, or a BundleError saying which graph would not load (corrupt, truncated, no data)."""
    try:
        return ort.InferenceSession(str(onnx_path), session_options, providers=providers,
                                    disabled_optimizers=BATCH_DEPENDENT_OPTIMIZERS)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf/NoSuchFile/... types
        reason = " ".join(str(exc).split())
        reason = reason if len(reason) <= 400 else reason[:397] + "..."
        raise BundleError(f"could not load the {role} ONNX graph {onnx_path}: {reason}; the bundle is corrupt: "
                          f"rebuild it.") from exc


def _session_specs(args) -> tuple[TensorSpec, ...]:
    # ORT reports symbolic dims as str (or None when unnamed); keep ints as ints
    return tuple(TensorSpec(a.name, a.type, tuple(d if isinstance(d, int) else "?" for d in (a.shape or ())))
                 for a in args)


def check_graph_io(session, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...], *, role: str,
                   onnx_path: Path) -> None:
    """The loaded graph's inputs/outputs (names, element types, static dims) are those the manifest declares.

    Catches a manifest that lies about num_layers / kv heads / head_dim / vocab / precision at load time,
    not in the middle of a generation. Symbolic dims of the manifest (seq_len, past_len) must be dynamic."""
    def as_session(spec: TensorSpec) -> TensorSpec:
        return TensorSpec(spec.name, ORT_TYPES.get(spec.dtype, spec.dtype),
                          tuple(d if isinstance(d, int) else "?" for d in spec.shape))

    for kind, declared, actual in (("inputs", inputs, session.get_inputs()), ("outputs", outputs, session.get_outputs())):
        problem = compare_io(kind, _session_specs(actual), [as_session(spec) for spec in declared])
        if problem:
            raise BundleError(f"the {role} ONNX graph {onnx_path.name} does not match the manifest: its {problem} "
                              f"(dims '?' are dynamic). The manifest and the graph disagree: rebuild the bundle.")


def session_options(ort, options: OrtOptions):
    session_options = ort.SessionOptions()
    if options.threads:
        session_options.intra_op_num_threads = options.threads
    session_options.inter_op_num_threads = 1
    levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
    session_options.graph_optimization_level = levels[options.optimization]
    if not options.spinning:
        session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return session_options


def open_session(onnx_path: Path, *, role: str, io: tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]],
                 logits_rows: int | None, options: OrtOptions, providers: list[str]):
    """An InferenceSession for a spectrt decoder graph, checked against the manifest's I/O contract."""
    ort = _import_ort()
    session = _create_session(ort, onnx_path, session_options(ort, options), providers, role)
    check_graph_io(session, *io, role=role, onnx_path=onnx_path)
    rows_dim = next(o.shape[1] for o in session.get_outputs() if o.name == "logits")
    if (rows_dim == "logits_rows") != (logits_rows is not None):
        raise BundleError(f"the {role} ONNX graph {onnx_path.name} returns logits for "
                          f"{'its last logits_rows positions' if rows_dim == 'logits_rows' else 'every position'}, "
                          f"but the manifest says logits_rows={logits_rows}; rebuild the bundle.")
    return session


def open_checked_session(onnx_path: Path, entry, options: OrtOptions, providers: list[str]):
    """open_session for a manifest ModelEntry."""
    return open_session(Path(onnx_path), role=entry.role, io=(entry.inputs, entry.outputs),
                        logits_rows=entry.logits_rows, options=options, providers=providers)


def bind_kv_rows(binding, num_layers: int, dtype, rows, suffix: str = "") -> None:
    """Bind every layer's past_{key,value}_{layer}{suffix} inputs and new_{key,value}_{layer}{suffix} outputs to the
    arrays `rows(layer)` returns (past_key, past_value, new_key, new_value), in place: no copy."""
    for layer in range(num_layers):
        past_key, past_value, new_key, new_value = rows(layer)
        for name, array in ((f"past_key_{layer}{suffix}", past_key), (f"past_value_{layer}{suffix}", past_value)):
            binding.bind_input(name, "cpu", 0, dtype, array.shape, array.ctypes.data)
        for name, array in ((f"new_key_{layer}{suffix}", new_key), (f"new_value_{layer}{suffix}", new_value)):
            binding.bind_output(name, "cpu", 0, dtype, array.shape, array.ctypes.data)


class OrtDecoder(CacheBookkeeping):
    """Runs a spectrt decoder graph step by step with an in-place KV cache (CPU buffers).

    `io` = the (inputs, outputs) the graph must have (the manifest's graph spec); default: the graph
    I/O contract for num_layers/kv_heads/head_dim/precision/vocab. Checked right after loading."""

    def __init__(self, onnx_path: Path, *, num_layers: int, kv_heads: int, head_dim: int, precision: str,
                 max_context: int, vocab: int, options: OrtOptions = OrtOptions(), role: str = "model",
                 io: tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]] | None = None,
                 logits_rows: int | None = None, features: int | None = None):
        onnx_path = Path(onnx_path)
        ort = _import_ort()
        self.providers = _providers(ort, options.provider)
        io = io if io is not None else expected_graph_io(num_layers, kv_heads, head_dim, precision, vocab, logits_rows,
                                                         features)
        self.session = open_session(onnx_path, role=role, io=io, logits_rows=logits_rows, options=options,
                                    providers=self.providers)
        self.num_layers = num_layers
        self.max_context = max_context
        self.vocab = vocab
        super().__init__(KVCache(num_layers, max_context, kv_heads, head_dim, precision))
        self.logits_rows = logits_rows  # the graph returns logits for the last min(S, logits_rows) positions
        self._np_dtype = self.cache.dtype
        # graphs built for a draft head also return the final hidden state of every position
        self.features_size = next((o.shape[2] for o in self.session.get_outputs() if o.name == "features"), None)
        self.last_features: np.ndarray | None = None  # [S, H] of the last step, a new array per step (as the logits)

    def _forward(self, token_ids: np.ndarray) -> np.ndarray:
        """token_ids [S] -> logits [R, V] of the last R = min(S, logits_rows) positions, in a new array per step (the
        caller's to keep; ONNX Runtime writes into it directly, so there is no copy)."""
        if self.session is None:
            raise GenerationError("this decoder was closed (its ONNX Runtime session released); load the bundle "
                                  "again to generate.")
        token_ids = np.ascontiguousarray(token_ids, dtype=np.int64).reshape(1, -1)  # [1, S]
        count = token_ids.shape[1]
        if count == 0:
            raise GenerationError("a decoder step needs at least one token.")
        if self.cache.length + count > self.max_context:
            raise GenerationError(f"context limit reached: {self.cache.length} cached + {count} new tokens exceed "
                                  f"max context {self.max_context} of this bundle (rebuild with a larger --max-context).")
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", token_ids)
        logits = np.empty((1, min(count, self.logits_rows or count), self.vocab), np.float32)  # [1, R, V]
        binding.bind_output("logits", "cpu", 0, np.float32, logits.shape, logits.ctypes.data)
        if self.features_size is not None:
            features = np.empty((1, count, self.features_size), np.float32)  # [1, S, H]
            binding.bind_output("features", "cpu", 0, np.float32, features.shape, features.ctypes.data)
            self.last_features = features[0]
        bind_kv_rows(binding, self.num_layers, self._np_dtype,
                     lambda layer: (*self.cache.past(layer), *self.cache.new_rows(layer, count)))
        self.session.run_with_iobinding(binding)
        return logits[0]

    def close(self) -> None:
        """Release the session and the KV cache's memory (ONNX Runtime frees a session with its last reference).
        Idempotent; a later step raises GenerationError."""
        self.session = None
        self.cache = RowCounter(self.max_context)  # bookkeeping still answers (length 0), the arrays are gone
        self.cached_tokens, self._pending = [], []
        self.last_features = None

