"""The public runtime API: load a bundle, generate or stream text with speculative decoding."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from spectrt.errors import BackendUnavailableError, GenerationError

from .drafters import make_drafter
from .loop import LoopState, speculative_decode
from .manifest import Manifest, ModelEntry, read_manifest, verify_files
from .metrics import AggregateMetrics, RequestMetrics
from .sampling import SamplingParams
from .scheduler import CostModel, WidthScheduler
from .text import BundleTokenizer, IncrementalDecoder, StopMatcher

BACKENDS = ("auto", "onnxruntime", "tensorrt")


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
        SamplingParams(self.temperature, self.top_k, self.top_p)  # validates

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_k, self.top_p)


@dataclass(frozen=True)
class StreamChunk:
    """One generated token and the text it adds (may be '' while a multi-byte character is incomplete).

    The last chunk of a stream has token_id None, carries any held-back text and the finish reason."""

    token_id: int | None
    text: str
    finish_reason: str | None = None
    metrics: RequestMetrics | None = None


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # eos | length | stop | context
    prompt_token_ids: list[int]
    metrics: RequestMetrics = field(repr=False, default_factory=RequestMetrics)


def _make_decoder(manifest: Manifest, entry: ModelEntry, backend: str, threads: int, provider: str):
    if backend == "tensorrt":
        raise BackendUnavailableError(
            "the TensorRT runtime backend is not part of this spectrt release (engines are built and recorded in the "
            "bundle, but running them is not implemented yet); use backend='onnxruntime'.")
    if entry.onnx_path is None:
        raise BackendUnavailableError(f"the bundle's {entry.role} model has no ONNX graph, and only the ONNX Runtime "
                                      f"backend can run here; rebuild with --backend onnx or all.")
    from .backends.onnxruntime_backend import OrtDecoder, OrtOptions

    return OrtDecoder(manifest.file(entry.onnx_path), num_layers=entry.num_layers, kv_heads=entry.num_kv_heads,
                      head_dim=entry.head_dim, precision=entry.precision, max_context=entry.max_context,
                      vocab=entry.logits_vocab, options=OrtOptions(threads=threads, provider=provider))


class Generator:
    """A loaded bundle: target (and draft) sessions, tokenizer, and the speculative loop.

    Costs measured by the `auto` width scheduler persist across requests; acceptance adapts per request.
    """

    def __init__(self, bundle: str | Path, *, backend: str = "auto", threads: int = 0, provider: str = "auto",
                 verify: str = "cached", load_draft: bool = True):
        if backend not in BACKENDS:
            raise GenerationError(f"backend '{backend}' unknown; choose one of {', '.join(BACKENDS)}.")
        if verify not in ("full", "cached", "none"):
            raise GenerationError("verify must be 'full', 'cached' or 'none'.")
        self.manifest = read_manifest(bundle)
        if verify != "none":
            verify_files(self.manifest, cache=(verify == "cached"))
        self.tokenizer = BundleTokenizer(self.manifest.file(self.manifest.tokenizer_file), self.manifest.generation)
        self.target = _make_decoder(self.manifest, self.manifest.target, backend, threads, provider)
        self.draft = None
        if load_draft and self.manifest.draft is not None:
            self.draft = _make_decoder(self.manifest, self.manifest.draft, backend, threads, provider)
        self.eos_ids = set(int(i) for i in self.manifest.generation["eos_token_ids"])
        self.built_widths = self.manifest.target.widths
        self.max_context = self.manifest.target.max_context
        self._costs: dict[str, CostModel] = {}
        self.aggregate = AggregateMetrics()

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

    def _config(self, config: GenerateConfig | None, options: dict[str, Any]) -> GenerateConfig:
        config = replace(config or GenerateConfig(), **options)
        if config.draft == "auto":
            config = replace(config, draft="model" if self.draft is not None else "ngram")
        return config

    # -- generation -------------------------------------------------------------------------------
    def stream(self, prompt: str | None = None, *, messages: list[dict[str, str]] | None = None,
               prompt_ids: list[int] | None = None, config: GenerateConfig | None = None,
               **options: Any) -> Iterator[StreamChunk]:
        """Yield one StreamChunk per generated token, in order, then a final chunk with the finish reason.

        The prompt is text, chat `messages` (rendered with the bundle's chat template) or token ids."""
        config = self._config(config, options)
        prompt_ids = self.encode(prompt, messages, prompt_ids)
        drafter = make_drafter(config.draft, self.draft)
        scheduler = WidthScheduler(self.built_widths, 0 if config.draft == "none" else config.width,
                                   costs=self._costs.setdefault(config.draft, CostModel()))
        metrics = RequestMetrics(prompt_tokens=len(prompt_ids))
        state = LoopState()
        rng = np.random.default_rng(config.seed)
        decoder = IncrementalDecoder(self.tokenizer)
        stopper = StopMatcher(config.stop)
        start = time.perf_counter()
        tokens = speculative_decode(self.target, drafter, scheduler, prompt_ids, max_new_tokens=config.max_new_tokens,
                                    params=config.sampling, rng=rng, eos_ids=self.eos_ids, metrics=metrics, state=state)
        try:
            for token in tokens:
                text, stopped = stopper.feed(decoder.push(token))
                yield StreamChunk(token, text)
                if stopped:
                    state.finish_reason = "stop"
                    break
        finally:
            tokens.close()
        tail = "" if state.finish_reason == "stop" else stopper.feed(decoder.flush())[0] + stopper.flush()
        metrics.total_seconds = time.perf_counter() - start
        self.aggregate.add(metrics)
        yield StreamChunk(None, tail, state.finish_reason, metrics)

    def generate(self, prompt: str | None = None, *, messages: list[dict[str, str]] | None = None,
                 prompt_ids: list[int] | None = None, config: GenerateConfig | None = None,
                 **options: Any) -> GenerationResult:
        """Generate to completion; greedy by default. Same options as `stream`."""
        texts, token_ids, last = [], [], None
        prompt_ids = self.encode(prompt, messages, prompt_ids)
        for chunk in self.stream(prompt_ids=prompt_ids, config=config, **options):
            texts.append(chunk.text)
            if chunk.token_id is not None:
                token_ids.append(chunk.token_id)
            last = chunk
        return GenerationResult("".join(texts), token_ids, last.finish_reason, prompt_ids, last.metrics)


def load(bundle: str | Path, **options: Any) -> Generator:
    """Load an engine bundle: `spectrt.load("engines/qwen-coder").generate("def fib(n):")`."""
    return Generator(bundle, **options)
