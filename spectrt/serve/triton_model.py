"""Triton Inference Server model (Python backend, decoupled): spectrt speculative decoding.

`spectrt triton-repo` copies this file to `<repository>/<name>/1/model.py`. It runs inside Triton's
Python backend stub process, one process per model instance, each with its own `Generator` (the
lean runtime: numpy, tokenizers, onnxruntime, jsonschema; no torch). `triton_python_backend_utils`
exists only in that process, so it is imported in `initialize`, never at module level: this module
imports (and lints) anywhere.

Protocol (decoupled: any number of responses per request):

- inputs: `prompt` (BYTES, text) or `prompt_ids` (INT64, token ids) or `messages` (BYTES, a JSON list of
  chat messages); optional `max_tokens` (INT32), `temperature`, `top_p` (FP32), `top_k`, `seed` (INT64),
  `stop` (BYTES, one element per stop string), `draft`, `width`, `accept` (BYTES).
- one response per generated token: `text` (the text it adds, may be empty while a multi-byte character
  is incomplete), `token_ids` (that token), `finish_reason` (empty), `metrics` (empty);
- then a final response (flag COMPLETE_FINAL): `text` (any held-back text), `token_ids` (none),
  `finish_reason` (eos | length | stop | context) and `metrics` (`RequestMetrics.to_json()` as JSON).
- a bad request (spectrt's GenerationError and friends) is one error response carrying spectrt's
  message; the instance stays up and serves the next request.

Model-config parameters (`parameters { key: ... value: { string_value: ... } }`), written by
`spectrt triton-repo`: `spectrt_bundle` (absolute, or relative to the model's version folder),
`spectrt_threads` (ONNX Runtime intra-op threads per instance; 0 = cores / instances on KIND_CPU),
`spectrt_backend`, `spectrt_provider`, `spectrt_verify` (as in `spectrt.load`), `spectrt_max_batch` (requests
the instance decodes together: `execute` hands each to a worker thread and returns, and waits while that many run,
so the rest stay in Triton's queue), `spectrt_prefix_slots`, `spectrt_allow_numpy2`
(the stub's Python must have numpy<2 unless this is "true", see `_check_numpy`).
"""

from __future__ import annotations

import json
import os
from typing import Any

from spectrt.serve.metric_names import LATENCY_BUCKETS as _LATENCY_BUCKETS
from spectrt.serve.metric_names import TOKEN_COUNTERS as _TOKEN_COUNTERS
from spectrt.serve.metric_names import EXACT_HELP

# inputs with exactly one element, their Python type and the GenerateConfig field they set
SCALAR_INPUTS = {
    "max_tokens": (int, "max_new_tokens"),
    "temperature": (float, "temperature"),
    "top_p": (float, "top_p"),
    "top_k": (int, "top_k"),
    "seed": (int, "seed"),
    "draft": (str, "draft"),
    "width": (str, "width"),
    "accept": (str, "accept"),
    "prediction": (str, "prediction"),  # a predicted output (runtime/prediction.py)
}

# Metric families on Triton's metrics port, next to its nv_inference_* families. Names, meanings and
# buckets are those of `spectrt serve` (spectrt/serve/metric_names.py), so one dashboard serves both; the
# labels are Triton's `model` plus spectrt's `drafter`.
TOKEN_COUNTERS = {f"spectrt_{name}_total": facts for name, facts in _TOKEN_COUNTERS.items()}
HISTOGRAMS = {  # histogram name: (what it measures, the RequestMetrics field)
    "spectrt_time_to_first_token_seconds": ("request start (after the queue) until its first token",
                                            "time_to_first_token"),
    "spectrt_time_per_output_token_seconds": ("decode time per token after the first, one value per request",
                                              "time_per_output_token"),
}
LATENCY_BUCKETS = list(_LATENCY_BUCKETS)
# the Generator.stream options that constrain the output (drafter `auto` becomes grammar+...)
CONSTRAINT_OPTIONS = ("json_schema", "regex", "grammar", "choice")


class TritonMetrics:
    """spectrt's request metrics through the Python backend's custom metrics API (one set per instance
    process; Triton sums instances with the same labels into one series)."""

    def __init__(self, pb_utils, model: str, exactness=None):
        family = pb_utils.MetricFamily
        self.model = model
        if exactness is not None:  # the generator's InvarianceReport: one gauge per instance
            # the family object must live as long as its metric: Triton drops a family when it is collected
            self.exact_family = family(name="spectrt_exact", description=EXACT_HELP, kind=family.GAUGE)
            self._exact = self.exact_family.Metric(labels={"model": model, "strategy": exactness.strategy})
            self._exact.set(1.0 if exactness.exact else 0.0)
        self.requests = family(name="spectrt_requests_total", kind=family.COUNTER,
                               description="Requests finished, by finish reason (eos, length, stop, context; "
                                           "cancelled; invalid: refused with spectrt's message; error: failed)")
        self.counters = {name: family(name=name, description=f"Sum over finished requests: {text}",
                                      kind=family.COUNTER) for name, (text, _) in TOKEN_COUNTERS.items()}
        self.histograms = {name: family(name=name, description=text, kind=family.HISTOGRAM)
                           for name, (text, _) in HISTOGRAMS.items()}
        self._metrics: dict[tuple, Any] = {}

    def _metric(self, family, labels: dict[str, str], histogram: bool = False):
        key = (id(family), tuple(sorted(labels.items())))
        if key not in self._metrics:
            self._metrics[key] = (family.Metric(labels=labels, buckets=LATENCY_BUCKETS) if histogram
                                  else family.Metric(labels=labels))
        return self._metrics[key]

    def observe(self, drafter: str, finish_reason: str, metrics=None) -> None:
        """One finished request (metrics: its RequestMetrics, None if it produced none)."""
        labels = {"model": self.model, "drafter": drafter}
        self._metric(self.requests, {**labels, "finish_reason": finish_reason}).increment(1.0)
        if metrics is None:
            return
        for name, (_, field) in TOKEN_COUNTERS.items():
            value = getattr(metrics, field)
            if value:
                self._metric(self.counters[name], labels).increment(float(value))
        for name, (_, field) in HISTOGRAMS.items():
            value = getattr(metrics, field)
            if value is not None:
                self._metric(self.histograms[name], labels, histogram=True).observe(float(value))


class RequestError(Exception):
    """A request the model cannot run (a missing or malformed input): becomes an error response."""


def _decode(value: Any, name: str) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(f"input '{name}' is not valid UTF-8.") from None
    return str(value)


def parse_request(inputs: dict[str, Any]) -> dict[str, Any]:
    """Map a request's input arrays (name -> numpy array, absent inputs left out) onto the keyword
    arguments of `Generator.stream`. Pure: tested without Triton."""
    kwargs: dict[str, Any] = {}
    if "prompt" in inputs:
        values = inputs["prompt"].reshape(-1)
        if values.size != 1:
            raise RequestError(f"input 'prompt' takes one text element (got {values.size}).")
        kwargs["prompt"] = _decode(values[0], "prompt")
    if "prompt_ids" in inputs:
        kwargs["prompt_ids"] = [int(i) for i in inputs["prompt_ids"].reshape(-1)]
    if "messages" in inputs:
        values = inputs["messages"].reshape(-1)
        if values.size != 1:
            raise RequestError(f"input 'messages' takes one JSON element (got {values.size}).")
        try:
            messages = json.loads(_decode(values[0], "messages"))
        except ValueError as exc:
            raise RequestError(f"input 'messages' is not valid JSON ({exc}); send a JSON list of "
                               f'{{"role": ..., "content": ...}} objects.') from None
        if not (isinstance(messages, list) and all(isinstance(m, dict) for m in messages)):
            raise RequestError('input \'messages\' must be a JSON list of {"role": ..., "content": ...} objects.')
        kwargs["messages"] = messages
    for name, (kind, field) in SCALAR_INPUTS.items():
        if name not in inputs:
            continue
        values = inputs[name].reshape(-1)
        if values.size != 1:
            raise RequestError(f"input '{name}' takes exactly one element (got {values.size}).")
        value = values[0]
        kwargs[field] = _decode(value, name) if kind is str else kind(value.item() if hasattr(value, "item") else value)
    if "stop" in inputs:
        kwargs["stop"] = tuple(_decode(s, "stop") for s in inputs["stop"].reshape(-1))
    if not any(k in kwargs for k in ("prompt", "prompt_ids", "messages")):
        raise RequestError("send one of the inputs 'prompt' (text), 'prompt_ids' (token ids) or 'messages' (JSON).")
    return kwargs


def _instance_threads(config: dict[str, Any], requested: int) -> int:
    """ONNX Runtime threads per instance: as configured, else the cores shared by the CPU instances."""
    if requested > 0:
        return requested
    count = sum(int(group.get("count", 1)) for group in config.get("instance_group", [])
                if group.get("kind", "KIND_CPU") == "KIND_CPU")
    if count == 0:
        return 0  # GPU instances: let onnxruntime pick
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // count)


def _check_numpy(pb_utils, params: dict[str, str]) -> None:
    """Refuse NumPy 2 unless allowed: Triton's Python backend stub up to at least 2.51 (24.10, the one in
    nvidia-pytriton 0.7.0) is built against NumPy 1 and reads request tensors wrongly under NumPy 2
    (each element comes out as its first byte repeated), which would silently corrupt prompts."""
    import numpy

    if int(numpy.__version__.split(".")[0]) >= 2 and params.get("spectrt_allow_numpy2", "").lower() != "true":
        raise pb_utils.TritonModelException(
            f"the Python that Triton's stub runs has numpy {numpy.__version__}; Triton's Python backend (2.51 and "
            f"earlier) reads request tensors wrongly under NumPy 2. Install numpy<2 in the stub's environment (see "
            f"docs/triton.md), or, for a Triton whose Python backend supports NumPy 2, rewrite the repository with "
            f"`spectrt triton-repo --allow-numpy2`.")


class TritonPythonModel:
    """One instance = one Triton stub process = one spectrt Generator; requests run one at a time, or up to
    `spectrt_max_batch` together."""

    def initialize(self, args: dict[str, str]) -> None:
        import triton_python_backend_utils as pb_utils  # exists only inside Triton's Python stub

        self.pb = pb_utils
        self.log = pb_utils.Logger
        config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise pb_utils.TritonModelException(
                "spectrt streams its output: the model config needs `model_transaction_policy { decoupled: true }` "
                "(rewrite the repository with `spectrt triton-repo`).")
        params = {key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()}
        bundle = params.get("spectrt_bundle", "")
        if not bundle:
            raise pb_utils.TritonModelException("the model config has no `spectrt_bundle` parameter; rewrite the "
                                                "repository with `spectrt triton-repo BUNDLE OUT`.")
        if not os.path.isabs(bundle):  # a bundle copied into the repository: relative to the version folder
            bundle = os.path.join(args["model_repository"], args["model_version"], bundle)
        threads = _instance_threads(config, int(params.get("spectrt_threads") or 0))
        if args.get("model_instance_kind") == "GPU" and "CUDA_VISIBLE_DEVICES" not in os.environ:
            # this process drives one GPU; onnxruntime's CUDA provider uses its first visible device
            os.environ["CUDA_VISIBLE_DEVICES"] = str(args.get("model_instance_device_id", "0"))

        _check_numpy(pb_utils, params)
        try:
            from spectrt.errors import SpectrtError
            from spectrt.runtime.generator import Generator
        except ImportError as exc:
            import sys

            raise pb_utils.TritonModelException(
                f"spectrt's runtime cannot be imported in Triton's Python stub ({exc}). Install spectrt[onnxruntime] "
                f"and numpy<2 into the Python the stub runs (sys.prefix {sys.prefix}), or point the model's "
                f"EXECUTION_ENV_PATH at an environment that has them (`spectrt triton-repo --python-env`). The stub "
                f"puts its working folder first on sys.path: do not start tritonserver inside a spectrt checkout, "
                f"whose ./spectrt folder is not the installed package.") from None

        self.user_errors = (SpectrtError, RequestError)
        try:
            self.generator = Generator(bundle, threads=threads, backend=params.get("spectrt_backend") or "auto",
                                       provider=params.get("spectrt_provider") or "auto",
                                       verify=params.get("spectrt_verify") or "cached",
                                       max_batch=int(params.get("spectrt_max_batch") or 1),
                                       prefix_slots=int(params.get("spectrt_prefix_slots") or 0))
        except SpectrtError as exc:  # the model fails to load with spectrt's message (the server log shows it)
            raise pb_utils.TritonModelException(f"spectrt could not load the bundle {bundle}: {exc}") from None
        self.output_dtypes = {output["name"]: pb_utils.triton_string_to_numpy(output["data_type"])
                              for output in config["output"]}
        try:
            self.metrics = TritonMetrics(pb_utils, args["model_name"], self.generator.invariance)
        except Exception as exc:  # a Python backend without custom metrics: serve without them
            self.log.log_warn(f"spectrt: no custom metrics ({exc!r})")
            self.metrics = None
        self.log.log_info(f"spectrt: {args['model_name']} instance {args.get('model_instance_name')} loaded {bundle} "
                          f"(threads {threads}, widths {list(self.generator.built_widths)}, "
                          f"draft {'model' if self.generator.draft is not None else 'none'}); "
                          f"{self.generator.invariance.summary()}")

    def _observe(self, drafter: str, finish_reason: str, metrics=None) -> None:
        if self.metrics is not None:
            try:
                self.metrics.observe(drafter, finish_reason, metrics)
            except Exception as exc:  # metrics never fail a request
                self.log.log_warn(f"spectrt: metrics update failed ({exc!r})")

    # -- requests -----------------------------------------------------------------------------------
    def _response(self, text: str, token_ids: list[int], finish_reason: str = "", metrics: str = ""):
        import numpy as np

        pb = self.pb
        return pb.InferenceResponse(output_tensors=[
            pb.Tensor("text", np.array([text.encode("utf-8")], dtype=self.output_dtypes["text"])),
            pb.Tensor("token_ids", np.array(token_ids, dtype=self.output_dtypes["token_ids"])),
            pb.Tensor("finish_reason", np.array([finish_reason.encode()], dtype=self.output_dtypes["finish_reason"])),
            pb.Tensor("metrics", np.array([metrics.encode()], dtype=self.output_dtypes["metrics"])),
        ])

    def _send(self, sender, response, final: bool = False) -> bool:
        """Send a response; False when the client is gone (cancelled, disconnected)."""
        flags = self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
        try:
            if response is None:
                sender.send(flags=flags)
            else:
                sender.send(response, flags=flags)
            return True
        except Exception as exc:
            self.log.log_verbose(f"spectrt: response not delivered ({exc})")
            return False

    def _fail(self, sender, message: str, drafter: str, reason: str) -> None:
        self._observe(drafter, reason)
        try:
            sender.send(self.pb.InferenceResponse(error=self.pb.TritonError(message)),
                        flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception as exc:  # the client is gone (or the final flag was already sent): nothing to tell
            self.log.log_warn(f"spectrt: could not send the error response ({exc}): {message}")

    def execute(self, requests):
        # max_batch 1: requests of this instance run one after the other (the Generator holds one KV cache); Triton
        # gives the next request to an idle instance, or queues it. max_batch N: each runs on a worker thread (their
        # steps share model calls) and execute returns at once, but first waits while N run, so Triton holds the rest.
        if self.generator.max_batch == 1:
            for request in requests:
                self._serve(request)
            return None  # decoupled: every response went through the request's response sender
        if getattr(self, "_workers", None) is None:
            import threading
            from concurrent.futures import ThreadPoolExecutor

            self._workers = ThreadPoolExecutor(self.generator.max_batch, thread_name_prefix="spectrt-request")
            self._free = threading.Semaphore(self.generator.max_batch)
        for request in requests:
            self._free.acquire()
            self._workers.submit(self._serve_then_free, request)
        return None

    def _serve_then_free(self, request) -> None:
        try:
            self._serve(request)
        except Exception as exc:  # _serve answers the client itself; this only keeps the worker alive
            self.log.log_error(f"spectrt: request failed: {exc!r}")
        finally:
            self._free.release()

    def _drafter(self, kwargs: dict[str, Any]) -> str:
        """The drafter a request runs with (the `drafter` metric label), as the Generator resolves it."""
        from spectrt.runtime.drafters import DRAFTERS

        constrained = any(kwargs.get(key) is not None for key in CONSTRAINT_OPTIONS)
        drafter = self.generator.resolve_drafter(str(kwargs.get("draft", "auto")), constrained)
        return drafter if drafter in DRAFTERS else "unknown"  # a misspelt draft is refused; labels stay bounded

    def _serve(self, request) -> None:
        pb = self.pb
        sender = request.get_response_sender()
        drafter = "unknown"
        try:
            inputs = {}
            for name in ("prompt", "prompt_ids", "messages", "stop", *SCALAR_INPUTS):
                tensor = pb.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    inputs[name] = tensor.as_numpy()
            kwargs = parse_request(inputs)
            drafter = self._drafter(kwargs)
            chunks = self.generator.stream(**kwargs)  # bad options raise here, before any work
        except self.user_errors as exc:
            self._fail(sender, str(exc), drafter, "invalid")
            return
        except Exception as exc:  # a bug, never a dead instance: the client gets the message, the log the trace
            self.log.log_error(f"spectrt: request failed before generating: {exc!r}")
            self._fail(sender, f"internal error in the spectrt model: {exc}", drafter, "error")
            return
        cancelled = getattr(request, "is_cancelled", lambda: False)
        try:
            for chunk in chunks:
                if chunk.token_id is not None:
                    if cancelled() or not self._send(sender, self._response(chunk.text, [chunk.token_id])):
                        chunks.close()  # frees the Generator; the next request is unaffected
                        self._observe(drafter, "cancelled")
                        self._send(sender, None, final=True)
                        return
                    continue
                final = self._response(chunk.text, [], chunk.finish_reason, json.dumps(chunk.metrics.to_json()))
                self._observe(drafter, chunk.finish_reason if self._send(sender, final, final=True) else "cancelled",
                              chunk.metrics)
        except Exception as exc:
            chunks.close()
            if isinstance(exc, self.user_errors):
                self._fail(sender, str(exc), drafter, "invalid")
            else:
                self.log.log_error(f"spectrt: request failed while generating: {exc!r}")
                self._fail(sender, f"internal error in the spectrt model: {exc}", drafter, "error")

    def finalize(self) -> None:
        """Triton unloads the instance: free what the Generator's backends hold (sessions, device memory)."""
        workers = getattr(self, "_workers", None)
        if workers is not None:
            workers.shutdown(wait=True)  # running requests finish (or stop at a cancelled client)
        generator, self.generator = getattr(self, "generator", None), None
        if generator is not None:
            generator.close()
