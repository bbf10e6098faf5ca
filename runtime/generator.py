"""The public runtime API: load a bundle, generate or stream text with speculative decoding."""

from __future__ import annotations

import json
import threading
from contextlib import contextmanager
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterator

from spectrt.runtime.errors import BackendUnavailableError, GenerationError

from .constraints import ConstraintCompiler, ConstraintMetrics, ConstraintSpec, RequestConstraint, constraint_spec
from .batching import BatchSetup, setup_batching
from .drafters import make_drafter
from .invariance import establish_invariance
from .loop import LoopState, speculative_decode
from .manifest import Manifest, ModelEntry, check_external_data, read_manifest, verify_files
from .metrics import AggregateMetrics, RequestMetrics
from .sampling import SamplingParams
from .picker import ACCEPT_RULES, TokenPicker
from .prediction import PredictionDrafter
from .sampling import random_seed
from .scheduler import CostModel, LongRunAcceptance, WidthScheduler
from .suffix_cache import DEFAULT_MAX_TOKENS, CacheView, SuffixCache
from .text import BundleTokenizer, IncrementalDecoder, StopMatcher

BACKENDS = ("auto", "onnxruntime", "tensorrt")
SAME_THREAD = ("this thread already runs a request on this Generator (an unfinished stream?); read that stream to "
               "the end or call its .close() first. (Consume each stream on one thread: a thread pool that runs "
               "another request's steps on the thread holding an open stream is refused the same way.)")
INVARIANCE_MODES = ("measure", "off")  # measure: check row counts here (or read the cache) and shape calls


@dataclass(frozen=True)
class GenerateConfig:
    """One request's settings; each field is a `spectrt generate` option of the same name."""

    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    draft: str = "auto"  # auto (model if the bundle has one, else ngram) | model | ngram | none
    width: str | int = "auto"  # auto | a built width K | 0 (plain decoding)
    accept: str = "coupled"  # sampling only: coupled (reproducible, = plain sampling) | rejection (residual)
    reuse_prefix: bool = True  # keep cached rows of a prompt prefix an earlier request already computed
    # structured output (at most one): the output must match it; see docs/constraints.md
    json_schema: dict | bool | str | None = None  # a JSON schema (dict or JSON text; kept as JSON text)
    regex: str | None = None  # a regular expression the whole output matches
    grammar: str | None = None  # a Lark grammar (llguidance syntax) with a `start` rule
    choice: tuple[str, ...] | None = None  # the output is exactly one of these strings
    # predicted output (OpenAI's `prediction`): text the output is expected to repeat, e.g. the file an edit
    # changes, or its token ids; drafted first, `draft` proposes where the output leaves it (runtime/prediction.py)
    prediction: str | tuple[int, ...] | None = None
    # the suffix cache across requests (runtime/suffix_cache.py): with it, the n-gram drafter also drafts from
    # earlier requests' prompts and outputs, and this request is remembered for later ones; the key names the
    # partition (tenant) it reads and writes ('' = the shared one). Output is the same either way.
    suffix_cache: bool = True
    suffix_cache_key: str = ""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be >= 1 (got {self.max_new_tokens}).")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if any(not s for s in self.stop):
            raise GenerationError("stop strings must not be empty.")
        if self.width != "auto":
            try:
                object.__setattr__(self, "width", int(self.width))
            except (TypeError, ValueError):
                raise GenerationError(f"width must be 'auto' or an integer (got {self.width!r}).") from None
        if self.accept not in ACCEPT_RULES:
            raise GenerationError(f"accept must be one of {', '.join(ACCEPT_RULES)} (got {self.accept!r}).")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**63):
            raise GenerationError(f"seed must be an integer in 0..2**63-1 (got {self.seed!r}).")
        SamplingParams(self.temperature, self.top_k, self.top_p)  # validates
        if not isinstance(self.suffix_cache, bool):
            raise GenerationError(f"suffix_cache must be true or false (got {self.suffix_cache!r}).")
        if not isinstance(self.suffix_cache_key, str) or len(self.suffix_cache_key) > 256:
            raise GenerationError("suffix_cache_key must be a string of at most 256 characters (a tenant's name).")
        if self.prediction is not None:
            try:  # text, or token ids (kept as a tuple: the config is frozen)
                if not isinstance(self.prediction, str):
                    object.__setattr__(self, "prediction", tuple(int(t) for t in self.prediction))
                if not self.prediction:
                    raise ValueError("empty")
            except (TypeError, ValueError):
                raise GenerationError("prediction must be a non-empty string (the text the output is expected to "
                                      "repeat), its token ids, or None.") from None
        spec = constraint_spec(self.json_schema, self.regex, self.grammar, self.choice)  # validates the form
        if spec is not None and spec.kind == "json_schema":
            object.__setattr__(self, "json_schema", spec.source)  # JSON text: the frozen config holds no dict
        if spec is not None and spec.kind == "choice":
            object.__setattr__(self, "choice", tuple(json.loads(spec.source)))
        object.__setattr__(self, "_constraint", spec)  # parsed once: a large schema's JSON round trip holds the GIL

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_k, self.top_p)

    @property
    def constraint(self) -> ConstraintSpec | None:
        """The structured-output constraint of this request, if any."""
        return self._constraint


@dataclass(frozen=True)
class StreamChunk:
    """One generated token and the text it adds (may be '' while a multi-byte character is incomplete).

    The last chunk of a stream has token_id None, carries any held-back text and the finish reason."""

    token_id: int | None
    text: str
    finish_reason: str | None = None
    metrics: RequestMetrics | None = None
    constraint: ConstraintMetrics | None = None  # last chunk of a constrained request: forced tokens, mask time


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # eos | length | stop | context
    prompt_token_ids: list[int]
    metrics: RequestMetrics = field(repr=False, default_factory=RequestMetrics)
    constraint: ConstraintMetrics | None = field(repr=False, default=None)  # constrained requests only


PROVIDERS = ("auto", "cpu", "cuda", "cpu-planned")


def _make_decoders(manifest: Manifest, entries: dict[str, ModelEntry], backend: str, threads: int,
                   provider: str) -> dict[str, Any]:
    """Decoders for `entries` (role -> ModelEntry).

    backend 'tensorrt': the bundle's engines on the GPU. backend 'onnxruntime' (and 'auto'): the ONNX graphs,
    with provider 'cpu' (host memory), 'cuda' (ONNX Runtime's CUDA provider on a device-resident plan: the KV
    cache never leaves the GPU), 'cpu-planned' (host memory through the same plan as the GPU executors; for
    tests and debugging) or 'auto' (cuda when it can run here, else cpu)."""
    if provider not in PROVIDERS:
        raise GenerationError(f"provider '{provider}' unknown; choose one of {', '.join(PROVIDERS)}.")
    if backend == "tensorrt":
        from .backends.tensorrt_backend import load_tensorrt

        return load_tensorrt(manifest, entries)
    missing = [role for role, entry in entries.items() if entry.onnx_path is None]
    if missing:
        raise BackendUnavailableError(f"the bundle's {' and '.join(missing)} model has no ONNX graph, and only the "
                                      f"ONNX Runtime backend can run here; rebuild with --backend onnx or all.")
    onnx_files = {}
    for role, entry in entries.items():
        onnx_files[role] = manifest.file(entry.onnx_path)  # resolved, and refused unless inside the bundle folder
        if entry.onnx_data is not None:
            manifest.file(entry.onnx_data)  # onnxruntime opens the external data itself: it must stay inside too
    from .backends.onnxruntime_backend import OrtDecoder, OrtOptions

    if provider == "auto":
        provider = "cuda" if _cuda_path_available() else "cpu"
    options = OrtOptions(threads=threads, provider="cpu" if provider == "cpu-planned" else provider)
    if provider == "cuda":
        from .backends.planned import load_cuda_planned

        return load_cuda_planned(entries, onnx_files, options)
    if provider == "cpu-planned":
        from .backends.planned import load_host_planned

        return load_host_planned(entries, onnx_files, options)
    # the draft model's worker threads must not spin after its steps: they would compete with the target's next
    # verification (int4 Qwen 1.5B target + 0.5B draft on 2 cores: a 2-token verification 102 -> 75 ms)
    return {role: OrtDecoder(onnx_files[role], num_layers=entry.num_layers, kv_heads=entry.num_kv_heads,
                             head_dim=entry.head_dim, precision=entry.precision, max_context=entry.max_context,
                             vocab=entry.logits_vocab, options=replace(options, spinning=role == "target"),
                             role=entry.role,
                             io=(entry.inputs, entry.outputs), logits_rows=entry.logits_rows)
            for role, entry in entries.items()}


def _tensorrt_path_available(entries: dict[str, ModelEntry]) -> bool:
    """Every model has an engine, a TensorRT module is installed and a GPU is visible."""
    if not all(entry.tensorrt for entry in entries.values()):
        return False
    try:
        from .backends.cuda_runtime import cuda_runtime
        from .backends.tensorrt_backend import import_tensorrt_runtime

        import_tensorrt_runtime(next(iter(entries.values())).tensorrt.get("module"))
        cuda_runtime()
        return True
    except Exception:
        return False


def _cuda_path_available() -> bool:
    """ONNX Runtime's CUDA provider can keep the cache on a GPU here: it is installed and a GPU is visible."""
    try:
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            return False
        from .backends.cuda_runtime import cuda_runtime

        cuda_runtime()
        return True
    except Exception:  # no onnxruntime, no libcudart, no GPU: the CPU path
        return False


class Generator:
    """A loaded bundle: target (and draft) sessions, tokenizer, and the speculative loop.

    Safe to share between threads: one request runs at a time (the KV caches are the Generator's),
    others wait their turn. A stream holds the Generator from its first chunk until its last token
    chunk has been read (the final chunk with the finish reason comes after the release), it is
    closed (`.close()`) or garbage-collected; starting another request in the thread that holds an
    open stream raises GenerationError instead of waiting for itself forever. Consume each stream on
    one thread.
    Costs measured by the `auto` width scheduler persist across requests; acceptance is estimated per
    request, seeded by what earlier `auto` requests of the same drafter and sampling settings saw.
    Finished requests are remembered in a bounded suffix cache (`suffix_cache_tokens` tokens; 0: none) that the
    n-gram drafter of later requests looks up (`suffix_cache` / `suffix_cache_key` per request).
    """

    def __init__(self, bundle: str | Path, *, backend: str = "auto", threads: int = 0, provider: str = "auto",
                 verify: str = "cached", load_draft: bool = True, invariance: str = "measure",
                 suffix_cache_tokens: int = DEFAULT_MAX_TOKENS, max_batch: int = 1, prefix_slots: int = 0):
        if backend not in BACKENDS:
            raise GenerationError(f"backend '{backend}' unknown; choose one of {', '.join(BACKENDS)}.")
        if verify not in ("full", "cached", "none"):
            raise GenerationError("verify must be 'full', 'cached' or 'none'.")
        if invariance not in INVARIANCE_MODES:
            raise GenerationError(f"invariance must be one of {', '.join(INVARIANCE_MODES)} (got {invariance!r}).")
        if isinstance(suffix_cache_tokens, bool) or not isinstance(suffix_cache_tokens, int) or suffix_cache_tokens < 0:
            raise GenerationError(f"suffix_cache_tokens must be an integer >= 0 (0: no cache; got "
                                  f"{suffix_cache_tokens!r}).")
        for name, value, least in (("max_batch", max_batch, 1), ("prefix_slots", prefix_slots, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise GenerationError(f"{name} must be an integer >= {least} (got {value!r}).")
        self.suffix_cache = SuffixCache(suffix_cache_tokens) if suffix_cache_tokens else None
        self.manifest = read_manifest(bundle)
        if verify != "none":
            verify_files(self.manifest, cache=(verify == "cached"))  # ends with check_external_data
        else:
            check_external_data(self.manifest)  # where the graphs read weights: confined in every mode
        self.tokenizer = BundleTokenizer(self.manifest.file(self.manifest.tokenizer_file), self.manifest.generation)
        entries = {"target": self.manifest.target}
        if load_draft and self.manifest.draft is not None:
            entries["draft"] = self.manifest.draft
        if backend == "auto":
            backend = "tensorrt" if _tensorrt_path_available(entries) else "onnxruntime"
        self.max_batch = max_batch
        self.batch: BatchSetup | None = None  # requests on cache slots (several at once, or several prefixes kept)
        self.pad_guesses = True  # rows a shaped call pads with carry free n-gram guesses (see loop.PadGuesser)
        if max_batch > 1 or prefix_slots > 1 or self.manifest.target.batch_slots > 1:  # a batched graph runs here
            self.batch = setup_batching(self.manifest, entries, backend=backend, provider=provider, threads=threads,
                                        max_batch=max_batch, cache_slots=max(prefix_slots, max_batch),
                                        invariance=invariance)
            self.invariance, self.target, self.draft = self.batch.report, self.batch.targets[0], self.batch.drafts[0]
        else:
            decoders = _make_decoders(self.manifest, entries, backend, threads, provider)
            self.draft = decoders.get("draft")
            # which row counts give a row the same logits on this machine, and the target's calls shaped to them
            self.invariance, self.target = establish_invariance(self.manifest, decoders["target"], mode=invariance,
                                                                backend=backend, threads=threads)
        self._target_in_use = self.target  # what the report describes (see `unshaped`)
        self.head = None  # the trained draft head (ONNX Runtime CPU), when the bundle has one
        if (self.batch is None and load_draft and self.manifest.head is not None
                and getattr(self.target, "features_size", None)):
            from .backends.onnxruntime_backend import OrtOptions
            from .head_drafter import load_head

            self.head = load_head(self.manifest, OrtOptions(threads=threads, provider="cpu", spinning=False),
                                  ["CPUExecutionProvider"])
        self.eos_ids = set(int(i) for i in self.manifest.generation["eos_token_ids"])
        self.constraints = ConstraintCompiler(self.manifest.file(self.manifest.tokenizer_file),
                                              self.manifest.target.logits_vocab, self.eos_ids)
        self.built_widths = self.manifest.target.widths
        self.max_context = self.target.max_context  # the bundle's, less rows kept free for padded calls
        self._costs: dict[str, CostModel] = {}
        self._acceptance: dict[tuple, LongRunAcceptance] = {}
        self._last_width: dict[str, int | None] = {}  # drafter -> width of the latest round
        self.aggregate = AggregateMetrics()
        self.clock = time.perf_counter  # every duration in the metrics is read from this clock
        self._lock = threading.Lock()
        self._holder: int | None = None  # thread ident of the running request
        self._holders: set[int] = set()  # batched: thread idents of the running requests
        # guards _costs, _acceptance and _last_width: the running request writes them on its thread while
        # scheduler_state is read from others (a server's metrics scrape)
        self._state_lock = threading.Lock()
        self._closed = False

    # -- inputs -----------------------------------------------------------------------------------
    def encode(self, prompt: str | None, messages: list[dict[str, str]] | None,
               prompt_ids: list[int] | None = None) -> list[int]:
        if sum(x is not None for x in (prompt, messages, prompt_ids)) != 1:
            raise GenerationError("pass exactly one of prompt, messages or prompt_ids.")
        if prompt_ids is not None:
            ids = [int(i) for i in prompt_ids]
            vocab = self.manifest.target.logits_vocab
            if any(not 0 <= i < vocab for i in ids):
                raise GenerationError(f"prompt_ids must lie in 0..{vocab - 1}.")
        elif prompt is not None:
            if not isinstance(prompt, str) or not prompt:
                raise GenerationError("the prompt is empty; pass some text (or messages=[...]).")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = self.tokenizer.encode_chat(messages)
        if not ids:
            raise GenerationError("the prompt encodes to no tokens; pass some text.")
        if len(ids) >= self.max_context:
            raise GenerationError(f"the prompt has {len(ids)} tokens but this bundle's max context is {self.max_context} "
                                  f"(prompt + output); shorten the prompt or rebuild with a larger --max-context.")
        return ids

    def resolve_drafter(self, draft: str, constrained: bool = False) -> str:
        """The drafter a request with `draft` uses ('auto' -> 'model' if the bundle has one, else 'ngram'; under a
        constraint 'grammar+model' / 'grammar+ngram': forced tokens come from the grammar, the rest as before)."""
        if draft != "auto":
            return draft
        return ("grammar+" if constrained else "") + ("model" if self.draft is not None else "ngram")

    def scheduler_state(self) -> dict[str, dict[str, Any]]:
        """Per drafter: the width of the latest round and the long-run acceptance estimate of greedy `auto`
        requests (what the scheduler starts the next request from)."""
        with self._state_lock:
            widths = dict(self._last_width)
            greedy = {drafter: self._acceptance.get((drafter, "greedy")) for drafter in widths}
            return {drafter: {"width": width, "acceptance": greedy[drafter].value if greedy[drafter] else None}
                    for drafter, width in widths.items()}

    def batch_stats(self) -> dict[str, Any]:
        """What the batch loop did so far: model calls, requests' steps they held, the largest batch, filler rows,
        running requests and max_batch (zeros for a generator that runs one request at a time)."""
        if self.batch is None:
            return {"max_batch": 1, "calls": {}, "sequences": {}, "mean_sequences_per_call": {},
                    "max_sequences_per_call": 0, "filler_rows": 0, "deferred_calls": 0, "running_requests": 0}
        return {"max_batch": self.max_batch, **self.batch.batcher.stats.to_json()}

    @property
    def exact(self) -> bool:
        """Whether speculative output is token for token plain decoding's on this machine (as measured at load)."""
        return self.invariance.exact

    @contextmanager
    def unshaped(self) -> Iterator[None]:
        """Inside the block the target's calls run with the row counts asked for, not shaped for invariance: for
        measuring what the shaping costs. Requests in it report `exact: false` unless every count agrees here."""
        if self.batch is not None and self.max_batch > 1:
            raise GenerationError("unshaped() measures one sequence's calls; a batch's calls are shaped together: load "
                                  "the bundle with max_batch=1 for that.")
        shaped = self._target_in_use
        kept = list(self.batch.targets) if self.batch is not None else []  # cache slots: each one's decoder
        self.target = getattr(shaped, "inner", shaped)
        if self.batch is not None:
            self.batch.targets[:] = [getattr(target, "inner", target) for target in kept]
        try:
            yield
        finally:
            self.target = shaped
            if self.batch is not None:
                self.batch.targets[:] = kept

    def _request_exact(self) -> bool:
        if self.target is self._target_in_use:  # not inside `unshaped()`
            return self.invariance.exact
        return len(self.invariance.classes) == 1  # unshaped: exact only where every row count agrees

    def _long_run_acceptance(self, config: GenerateConfig) -> LongRunAcceptance:
        """Acceptance of earlier `auto` requests with this drafter and (rounded) sampling settings; bounded."""
        params = config.sampling
        drafter = _drafter_key(config)
        key = ((drafter, "greedy") if params.greedy else
               (drafter, config.accept, round(params.temperature, 2), params.top_k, round(params.top_p, 2)))
        if config.constraint is not None:  # constrained output is accepted at other rates
            key = (*key, "constrained")
        with self._state_lock:
            if key not in self._acceptance and len(self._acceptance) >= 64:
                self._acceptance.pop(next(iter(self._acceptance)))  # forget the oldest settings
            return self._acceptance.setdefault(key, LongRunAcceptance())

    def _cost_model(self, config: GenerateConfig) -> CostModel:
        """The measured costs requests like this one are priced with: per drafter, and apart for constrained
        requests (masked verification and grammar-forked drafting cost more than the unconstrained kind)."""
        key = (_drafter_key(config), config.constraint is not None)
        with self._state_lock:
            return self._costs.setdefault(key, CostModel())

    def _config(self, config: GenerateConfig | None, options: dict[str, Any]) -> GenerateConfig:
        unknown = sorted(set(options) - {f.name for f in fields(GenerateConfig)})
        if unknown:
            raise GenerationError(f"unknown generation option(s) {', '.join(unknown)}; the options are the fields of "
                                  f"GenerateConfig: {', '.join(f.name for f in fields(GenerateConfig))}.")
        config = replace(config or GenerateConfig(), **options)
        config = replace(config, draft=self.resolve_drafter(config.draft, config.constraint is not None))
        return config

    # -- lifetime ---------------------------------------------------------------------------------
    def close(self) -> None:
        """Free what the backends hold (device memory, streams, execution contexts, sessions). Waits for a
        request running on another thread to finish; afterwards every request is refused. Idempotent."""
        if self._closed:
            return
        if self.batch is not None:
            self.batch.pool.drain()  # waits for running requests; afterwards the pool hands out no cache
        self._acquire()
        try:
            self._closed = True
            if self.batch is not None:
                for graph in self.batch.graphs.values():
                    graph.close()
            decoders = (getattr(self.target, "inner", self.target), self.draft, self.head)
            seen: set[int] = set()
            for decoder in decoders:
                close = getattr(decoder, "close", None)
                if decoder is not None and id(decoder) not in seen and callable(close):
                    seen.add(id(decoder))
                    close()
            self.draft = self.head = None
        finally:
            self._release()

    def __enter__(self) -> "Generator":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # -- generation -------------------------------------------------------------------------------
    def _acquire(self) -> float:
        """Wait for the Generator; returns the seconds waited."""
        if self._holder == threading.get_ident():
            raise GenerationError(SAME_THREAD)
        start = self.clock()
        self._lock.acquire()
        if self._closed:
            self._lock.release()
            raise GenerationError("this Generator was closed; load the bundle again (spectrt.load) to generate.")
        self._holder = threading.get_ident()
        try:
            return self.clock() - start
        except BaseException:
            self._release()
            raise

    def _release(self) -> None:
        self._holder = None
        self._lock.release()

    def stream(self, prompt: str | None = None, *, messages: list[dict[str, str]] | None = None,
               prompt_ids: list[int] | None = None, config: GenerateConfig | None = None,
               **options: Any) -> Iterator[StreamChunk]:
        """Yield one StreamChunk per generated token, in order, then a final chunk with the finish reason.

        The prompt is text, chat `messages` (rendered with the bundle's chat template) or token ids.
        Bad options raise GenerationError here, before anything runs."""
        if self._closed:
            raise GenerationError("this Generator was closed; load the bundle again (spectrt.load) to generate.")
        config = self._config(config, options)
        prompt_ids = self.encode(prompt, messages, prompt_ids)
        spec = config.constraint
        if config.draft.endswith("head") and self.head is None and self.manifest.head is not None:
            raise GenerationError("the draft head reads the target's features, which this backend does not return "
                                  "(only the ONNX Runtime CPU path does so far); use --provider cpu, or another "
                                  "drafter.")
        if self.batch is not None and config.draft.endswith("head"):
            raise GenerationError("the draft head does not run on cache slots yet (max_batch / prefix_slots); load "
                                  "the bundle without them to use it, or use another drafter.")
        cache = (CacheView(self.suffix_cache, config.suffix_cache_key)
                 if self.suffix_cache is not None and config.suffix_cache else None)
        predicted = None
        if config.prediction is not None:
            predicted = (self.tokenizer.tokenizer.encode(config.prediction, add_special_tokens=False).ids
                         if isinstance(config.prediction, str) else list(config.prediction))
            vocab = self.manifest.target.logits_vocab
            if any(not 0 <= t < vocab for t in predicted):
                raise GenerationError(f"prediction token ids must lie in 0..{vocab - 1}.")

        def drafter_for(target, draft):
            drafter = make_drafter(config.draft, draft, constrained=spec is not None, head=self.head,
                                   target=target, cache=cache, max_width=max(self.built_widths))
            return drafter if predicted is None else PredictionDrafter(predicted, drafter)

        drafter_for(self.target, self.draft)  # validates the drafter now
        width = 0 if config.draft == "none" and config.prediction is None else config.width
        WidthScheduler(self.built_widths, width)  # validates the width now
        # validated now; a constrained request always has an end token (the bundle's, if eos_ids was emptied)
        constraint = (self.constraints.compile(spec, self.eos_ids or self.constraints.eos_ids) if spec is not None
                      else None)
        return self._run(config, prompt_ids, drafter_for, width, constraint)

    def _run(self, config: GenerateConfig, prompt_ids: list[int], drafter_for, width,
             constraint: RequestConstraint | None = None) -> Iterator[StreamChunk]:
        final = None
        if self.batch is None:
            queued = self._acquire()
            target, draft, release, batcher = self.target, self.draft, self._release, None
        else:
            queued, slot = self._acquire_slot(prompt_ids)
            target, draft, batcher = self.batch.targets[slot], self.batch.drafts[slot], self._batcher

            def release() -> None:
                self._release_slot(slot)
        try:
            drafter = drafter_for(target, draft)
            for chunk in self._stream_locked(config, prompt_ids, drafter, width, queued, constraint, target):
                if chunk.token_id is None:
                    final = chunk
                elif batcher is None:
                    yield chunk
                else:  # while the consumer holds the token, the batch does not wait for this request
                    batcher.pause()
                    try:
                        yield chunk
                    finally:
                        batcher.resume()
        finally:
            release()
        yield final  # after the release: a consumer that stops at the finish reason does not hold the Generator

    @property
    def _batcher(self):
        """The batcher requests' steps go through: several requests at once (max_batch > 1), else None."""
        return self.batch.batcher if self.batch is not None and self.max_batch > 1 else None

    def _acquire_slot(self, prompt_ids: list[int]) -> tuple[float, int]:
        """Batched: wait for a cache slot (the free one sharing the longest prefix with the prompt); returns (seconds
        waited, its index). The request then runs in the batch loop until `_release_slot`."""
        ident = threading.get_ident()
        with self._state_lock:
            if ident in self._holders:
                raise GenerationError(SAME_THREAD)
            self._holders.add(ident)
        start = self.clock()
        try:
            targets = self.batch.targets
            slot = self.batch.pool.acquire(prompt_ids, lambda i: getattr(targets[i], "inner", targets[i]).cached_tokens)
        except BaseException:
            with self._state_lock:
                self._holders.discard(ident)
            raise
        self.batch.batcher.enter()
        return self.clock() - start, slot

    def _release_slot(self, slot: int) -> None:
        self.batch.batcher.leave()
        self.batch.pool.release(slot)
        with self._state_lock:
            self._holders.discard(threading.get_ident())

    def _stream_locked(self, config: GenerateConfig, prompt_ids: list[int], drafter, width,
                       queued: float, constraint: RequestConstraint | None = None,
                       target=None) -> Iterator[StreamChunk]:
        target = self.target if target is None else target
        params = config.sampling
        seed = None if params.greedy else (config.seed if config.seed is not None else random_seed())
        long_run = self._long_run_acceptance(config)
        batcher = self._batcher
        scheduler = WidthScheduler(self.built_widths, width, costs=self._cost_model(config),
                                   acceptance=long_run.start_request(),
                                   sharers=(lambda: batcher.stats.running) if batcher is not None else None,
                                   batch_cost=batcher.call_cost if batcher is not None else None,
                                   shared_acceptance=(lambda: long_run.value) if batcher is not None else None)
        picker = TokenPicker(params, seed=seed, vocab=self.manifest.target.logits_vocab, rule=config.accept,
                             constraint=constraint)
        metrics = RequestMetrics(prompt_tokens=len(prompt_ids), seed=seed, queue_seconds=queued,
                                 exact=self._request_exact())
        state = LoopState()
        decoder = IncrementalDecoder(self.tokenizer, prompt_ids)
        stopper = StopMatcher(config.stop)
        output_ids: list[int] = []  # what the suffix cache remembers of this request
        tokens = speculative_decode(target, drafter, scheduler, prompt_ids, max_new_tokens=config.max_new_tokens,
                                    picker=picker, eos_ids=constraint.eos_ids if constraint else self.eos_ids,
                                    metrics=metrics, state=state,
                                    clock=self.clock, reuse_prefix=config.reuse_prefix,
                                    pad_guesses=self.pad_guesses)
        try:
            for token in tokens:
                output_ids.append(token)
                text, stopped = stopper.feed(decoder.push(token))
                if stopped:
                    state.finish_reason = "stop"  # this chunk carries the text before the stop string
                yield StreamChunk(token, text)
                if stopped:
                    break
        finally:
            tokens.close()
            if self.suffix_cache is not None and config.suffix_cache:  # a cancelled request's output counts too
                self.suffix_cache.add(prompt_ids, output_ids, config.suffix_cache_key)
        tail = ""
        if state.finish_reason != "stop":
            tail, stopped = stopper.feed(decoder.flush())
            if stopped:  # a stop string completed by the held-back text at the very end
                state.finish_reason = "stop"
            else:
                tail += stopper.flush()
        with self._state_lock:
            if width == "auto":
                long_run.update(scheduler.acceptance)
            self._last_width[config.draft] = scheduler.last_width
        if isinstance(drafter, PredictionDrafter):
            metrics.prediction_tokens = len(drafter.prediction)
            metrics.accepted_prediction_tokens = drafter.accepted_tokens
            metrics.rejected_prediction_tokens = drafter.rejected_tokens
        self.aggregate.add(metrics, state.finish_reason)
        yield StreamChunk(None, tail, state.finish_reason, metrics, constraint.metrics if constraint else None)

    def generate(self, prompt: str | None = None, *, messages: list[dict[str, str]] | None = None,
                 prompt_ids: list[int] | None = None, config: GenerateConfig | None = None,
                 **options: Any) -> GenerationResult:
        """Generate to completion; greedy by default. Same options as `stream`."""
        texts, token_ids, last = [], [], None
        prompt_ids = self.encode(prompt, messages, prompt_ids)
        chunks = self.stream(prompt_ids=prompt_ids, config=config, **options)
        try:
            for chunk in chunks:
                texts.append(chunk.text)
                if chunk.token_id is not None:
                    token_ids.append(chunk.token_id)
                last = chunk
        finally:
            chunks.close()
        return GenerationResult("".join(texts), token_ids, last.finish_reason, prompt_ids, last.metrics,
                                last.constraint)


def _drafter_key(config: GenerateConfig) -> str:
    """What a request's measured costs and acceptance are kept under: its drafter, apart with a prediction (its
    rounds are accepted at other rates than the drafter's own)."""
    return config.draft if config.prediction is None else f"prediction+{config.draft}"


def load(bundle: str | Path, **options: Any) -> Generator:
    """Load an engine bundle: `spectrt.load("engines/qwen-coder").generate("def fib(n):")`."""
    return Generator(bundle, **options)
