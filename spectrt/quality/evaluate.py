"""`spectrt eval`: perplexity, KL(reference || engine) and top-1 agreement of the bundle's target (through the
runtime, calls shaped as in real decoding) and of llama.cpp on the same GGUF, against the source weights in fp32.

Per text: tokenize with the bundle's tokenizer, keep the first `tokens` ids, cut windows (scoring.py), get the
reference's top-k summary (reference.py: cached, or transformers), then run each engine over the same windows and
compare row by row. Engines run one after another, never at once (they would share the cores)."""

from __future__ import annotations

import gc
import importlib.util
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from .errors import QualityError
from .reference import ReferenceModel, Source, reference_scores, resolve_source
from .scoring import (DEFAULT_TOP_K, EngineAccumulator, PositionScores, Window, default_scheme, make_windows,
                      scored_true_ids)
from .texts import load_text

REFERENCE_MODES = ("auto", "transformers", "none")
DEFAULT_TOKENS = 4096


@dataclass(frozen=True)
class EvalConfig:
    """`spectrt eval` options, one field each."""

    bundle: str
    texts: tuple[str, ...] = ("prose", "code")
    tokens: int = DEFAULT_TOKENS  # first N tokens of each text (fewer if the text is shorter; said in the output)
    reference: str = "auto"  # auto | transformers | none
    llamacpp: bool = True  # when llama_cpp is installed and the source is a GGUF
    source: str | None = None  # the target's source model, when the bundle's record does not find it
    window: int = 0  # model positions per window (0: from the engine's max context)
    top_k: int = DEFAULT_TOP_K
    threads: int = 0  # ONNX Runtime, torch and llama.cpp threads (0: their defaults; llama.cpp every core)
    out: str | None = None  # results JSON

    def __post_init__(self) -> None:
        if self.reference not in REFERENCE_MODES:
            raise QualityError(f"reference '{self.reference}' unknown; choose one of {', '.join(REFERENCE_MODES)}.")
        if self.tokens < 2:
            raise QualityError(f"--tokens must be >= 2 (got {self.tokens}).")
        if not self.texts:
            raise QualityError("no text given; pass --text prose, --text code or --text PATH.")
        if self.threads < 0:
            raise QualityError("--threads must be >= 0.")


def spectrt_rows(target: Any, window: Window) -> Iterator[np.ndarray]:
    """The runtime's target, teacher-forced: the unscored context in one prefill step (the shaped decoder chunks it
    as a real prefill), then the scored rows in calls of the graph's logits rows (verification-sized calls)."""
    target.reset()
    fed = window.fed
    if window.first_row:
        target.step(fed[:window.first_row])
        target.commit(window.first_row)
    rows = getattr(target, "logits_rows", None) or 64
    position = window.first_row
    while position < len(fed):
        count = min(rows, len(fed) - position)
        logits = target.step(fed[position:position + count])  # [count, V] fp32
        target.commit(count)
        assert len(logits) == count, f"asked {count} rows, got {len(logits)}"
        yield logits
        position += count


def _score(rows: Callable[[Window], Iterator[np.ndarray]], windows: list[Window], accumulator: EngineAccumulator
           ) -> PositionScores:
    start = time.perf_counter()
    for window in windows:
        for logits in rows(window):
            accumulator.add(logits)
    return accumulator.result(time.perf_counter() - start)


def _bundle_bos(tokenizer: Any, generation: dict[str, Any]) -> int | None:
    """The BOS token when the bundle's tokenizer adds one to plain text (the model was trained with it)."""
    bos = generation.get("bos_token_id")
    if bos is None:
        return None
    probe = tokenizer.tokenizer.encode("a", add_special_tokens=True).ids
    return int(bos) if probe and probe[0] == int(bos) else None


def evaluate(config: EvalConfig, say: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Run the evaluation; returns the results (JSON-serialisable), also written to config.out if given."""
    from spectrt.runtime.generator import Generator
    from spectrt.runtime.machine import machine_facts

    texts = [load_text(t) for t in config.texts]  # unknown names fail before anything loads
    generator = Generator(config.bundle, threads=config.threads, load_draft=False)
    manifest = generator.manifest
    source: Source | None = None
    skipped: list[str] = []
    try:
        source = resolve_source(manifest.raw, config.source)
    except QualityError as exc:
        if config.reference != "none":
            raise
        if config.llamacpp:
            skipped.append(f"llama.cpp: skipped ({exc})")
    bos = _bundle_bos(generator.tokenizer, manifest.generation)
    scheme = default_scheme(generator.target.max_context, bos, window=config.window, top_k=config.top_k)
    want_llamacpp = config.llamacpp and source is not None
    if want_llamacpp and not importlib.util.find_spec("llama_cpp"):
        skipped.append("llama.cpp: skipped (llama_cpp not installed: pip install 'spectrt[llamacpp]')")
        want_llamacpp = False
    elif want_llamacpp and not source.is_gguf:
        skipped.append(f"llama.cpp: skipped (the bundle's source '{source.name}' is not a GGUF file)")
        want_llamacpp = False
    for line in skipped:
        say(line)

    prepared = []
    for text in texts:
        ids = np.asarray(generator.tokenizer.tokenizer.encode(text.text, add_special_tokens=False).ids, np.int64)
        available = len(ids)
        ids = ids[:config.tokens]
        if available < config.tokens:
            say(f"{text.name}: the text has only {available} tokens (asked {config.tokens}); all are used")
        windows = make_windows(ids, scheme)
        prepared.append((text, ids, windows, scored_true_ids(ids, windows), available))

    # every text's reference first, with the fp32 model loaded once, then freed before the engines run
    references = {}
    reference_model = ReferenceModel(source, config.threads) if source is not None else None
    for text, ids, windows, true_ids, _ in prepared:
        references[text.name] = (reference_scores(reference_model, text.sha256, ids, windows, true_ids, scheme,
                                                  mode=config.reference, say=lambda m, n=text.name: say(f"{n}: {m}"))
                                 if reference_model is not None else None)
    if reference_model is not None:
        reference_model.release()

    results: dict[str, Any] = {}
    for text, ids, windows, true_ids, available in prepared:
        reference = references[text.name]
        ref_true = reference.scores.true_logp if reference is not None else None
        engines: dict[str, Any] = {}
        if reference is not None:
            engines["reference"] = {**PositionScores(ref_true, None, None, reference.seconds).metrics(None),
                                    "kl_mean": 0.0, "kl_p99": 0.0, "top1_agreement_pct": 100.0,
                                    "tail_mass_mean": float(np.exp(reference.scores.tail_logp).mean()),
                                    "cached": reference.cached, "cache": reference.path.name,  # names, never machine paths
                                    "facts": reference.meta}
        say(f"{text.name}: spectrt target over {len(windows)} windows, {len(true_ids)} positions")
        scores = _score(lambda w: spectrt_rows(generator.target, w), windows,
                        EngineAccumulator(reference.scores if reference else None, true_ids))
        engines["spectrt"] = {**scores.metrics(ref_true), "facts": {
            "backend": type(getattr(generator.target, "inner", generator.target)).__name__,
            "precision": manifest.target.precision, "quantization": manifest.target.raw.get("quantization"),
            "invariance": generator.invariance.summary(), "threads": config.threads}}
        results[text.name] = {"origin": text.origin, "sha256": text.sha256, "tokens": int(len(ids)),
                              "text_tokens_available": available, "windows": len(windows),
                              "positions": int(len(true_ids)), "engines": engines}
    generator.close()
    del generator
    gc.collect()

    if want_llamacpp:
        from .llamacpp import facts, llamacpp_rows, load_llama

        say(f"llama.cpp: loading {source.path}")
        llm = load_llama(str(source.path), scheme.window, config.threads)
        llm_facts = facts(llm, source.path.name, config.threads)
        for text, ids, windows, true_ids, _ in prepared:
            reference = references[text.name]
            say(f"{text.name}: llama.cpp over {len(windows)} windows")
            scores = _score(lambda w: llamacpp_rows(llm, w), windows,
                            EngineAccumulator(reference.scores if reference else None, true_ids))
            ref_true = reference.scores.true_logp if reference is not None else None
            results[text.name]["engines"]["llama.cpp"] = {**scores.metrics(ref_true), "facts": llm_facts}
        close = getattr(llm, "close", None)
        if callable(close):
            close()
        del llm
        gc.collect()

    out = {
        "bundle": str(config.bundle),
        "bundle_name": manifest.name,
        "config": asdict(config) | {"texts": list(config.texts),
                                     "out": Path(config.out).name if config.out else None},
        "target": {"precision": manifest.target.precision, "quantization": manifest.target.raw.get("quantization"),
                   "max_context": manifest.target.max_context},
        "source": source.to_json() if source is not None else None,
        "scheme": scheme.to_json() | {
            "description": "windows of `window` positions (BOS first when the tokenizer adds one), starts `stride` "
                           "text tokens apart; each text position scored once, after the first window with at "
                           "least window - stride tokens of context; log-softmax in float64 of fp32 logits",
            "kl": f"KL(reference || engine) over the reference's top {scheme.top_k} tokens plus one bucket for the "
                  f"rest of the vocabulary (a lower bound of the exact KL; docs/quality.md)"},
        "machine": machine_facts(),
        "skipped": skipped,
        "texts": results,
    }
    if config.out:
        path = Path(config.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2, default=_json_default))
    return out


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def format_table(results: dict[str, Any]) -> str:
    """The results as a markdown table (what `spectrt eval` prints)."""
    def num(value: Any, spec: str, suffix: str = "") -> str:
        return "-" if value is None else f"{value:{spec}}{suffix}"

    lines = [f"quality of {results['bundle_name']} (target {results['target']['precision']}"
             + (f", {results['target']['quantization']['scheme']} weights" if results["target"]["quantization"] else "")
             + f") vs its source in fp32; window {results['scheme']['window']}, stride {results['scheme']['stride']}, "
               f"KL over top {results['scheme']['top_k']} + tail; {results['machine']['cpu']}",
             "",
             "| text | engine | positions | perplexity | vs reference | mean KL(ref ‖ engine) | p99 KL | "
             "top-1 = reference | seconds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, text in results["texts"].items():
        for engine, m in text["engines"].items():
            seconds = num(m["seconds"], ".1f") + (" (cached)" if m.get("cached") else "")
            lines.append(f"| {name} | {engine} | {m['positions']} | {num(m['perplexity'], '.3f')} | "
                         f"{num(m['perplexity_change_pct'], '+.2f', '%')} | {num(m['kl_mean'], '.4f')} | "
                         f"{num(m['kl_p99'], '.3f')} | {num(m['top1_agreement_pct'], '.1f', '%')} | {seconds} |")
    lines += [f"- {line}" for line in results["skipped"]]
    return "\n".join(lines)
