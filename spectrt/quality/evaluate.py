"""`spectrt eval`: perplexity, KL(reference || engine) and top-1 agreement of the bundle's target (through the
runtime, calls shaped as in real decoding) and of llama.cpp on the same GGUF, against the source weights in fp32.

Per text: tokenize with the bundle's tokenizer, keep the first `tokens` ids, cut windows (scoring.py), get the
reference's top-k summary (reference.py: cached, or transformers), then run each engine over the same windows and
compare row by row. Engines run one after another, never at once (they would share the cores)."""

from __future__ import annotations

import gc
import hashlib
import importlib.util
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from .errors import QualityError
from .reference import ReferenceModel, Source, reference_scores, resolve_source
from .scoring import (DEFAULT_TOP_K, EngineAccumulator, PositionScores, Window, WindowScheme, default_scheme,
                      make_windows, scored_true_ids)
from .texts import SHIPPED, load_text

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


def _score_bodies(engine: str, rows: Callable[[Window], Iterator[np.ndarray]], bodies: list["Body"],
                  references: dict[str, Any], scores: dict[str, dict[str, PositionScores]],
                  say: Callable[[str], None]) -> None:
    """One engine over every body's windows, compared with each body's reference as the rows come."""
    for body in bodies:
        reference = references[body.key]
        say(f"{body.label}: {engine} over {len(body.windows)} windows, {len(body.true_ids)} positions")
        scores[body.key][engine] = _score(rows, body.windows,
                                          EngineAccumulator(reference.scores if reference else None, body.true_ids))


def _bundle_bos(tokenizer: Any, generation: dict[str, Any]) -> int | None:
    """The BOS token when the bundle's tokenizer adds one to plain text (the model was trained with it)."""
    bos = generation.get("bos_token_id")
    if bos is None:
        return None
    probe = tokenizer.tokenizer.encode("a", add_special_tokens=True).ids
    return int(bos) if probe and probe[0] == int(bos) else None


@dataclass
class Body:
    """What is scored under one name: a held-out text, or a workload's prompts each followed by its output."""

    name: str
    kind: str  # text | workload
    origin: str
    sha256: str  # identity of the scored material (part of the reference's cache key)
    ids: np.ndarray  # [N] int64: every token id, concatenated (part of the cache key)
    windows: list[Window]
    true_ids: np.ndarray  # [P] the token each scored row predicts
    segments: dict[str, np.ndarray]  # segment name -> [P] bool mask (workloads: prompt, output); texts: none
    facts: dict[str, Any]  # what the results say about the material (tokens, windows, ...)

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.name}"

    @property
    def label(self) -> str:
        return self.name if self.kind == "text" else f"{self.name} workload"


def text_body(text: Any, tokenizer: Any, tokens: int, scheme: WindowScheme, say: Callable[[str], None]) -> Body:
    """A held-out text: tokenized without special tokens, its first `tokens` ids, cut into strided windows."""
    ids = np.asarray(tokenizer.tokenizer.encode(text.text, add_special_tokens=False).ids, np.int64)
    available = len(ids)
    ids = ids[:tokens]
    if available < tokens:
        say(f"{text.name}: the text has only {available} tokens (asked {tokens}); all are used")
    windows = make_windows(ids, scheme)
    true_ids = scored_true_ids(ids, windows)
    return Body(text.name, "text", text.origin, text.sha256, ids, windows, true_ids, {},
                {"origin": text.origin, "sha256": text.sha256, "tokens": int(len(ids)),
                 "text_tokens_available": available, "windows": len(windows), "positions": int(len(true_ids))})


def workload_body(name: str, sequences: list[tuple[list[int], list[int]]], scheme: WindowScheme) -> Body:
    """A workload: each prompt's token ids as the model saw them (chat template applied) followed by the output
    decoded for it; scored from each sequence's second token, segments `prompt` and `output` by position."""
    plain = WindowScheme(window=scheme.window, stride=scheme.stride, bos=None, top_k=scheme.top_k)
    joined, windows, true_parts, output_parts = [], [], [], []
    for prompt, output in sequences:
        ids = np.asarray(list(prompt) + list(output), np.int64)  # [L] special tokens already in place: no BOS added
        if len(ids) < 2:
            continue
        cut = make_windows(ids, plain)
        joined.append(ids)
        windows += cut
        true_parts.append(scored_true_ids(ids, cut))
        output_parts.append(np.concatenate([np.arange(w.start, w.end) for w in cut]) >= len(prompt))
    if not windows:
        raise QualityError(f"workload '{name}': no sequence of two or more tokens to score.")
    true_ids, output_mask = np.concatenate(true_parts), np.concatenate(output_parts)
    material = json.dumps([[list(map(int, p)), list(map(int, o))] for p, o in sequences])
    digest = hashlib.sha256(material.encode()).hexdigest()
    return Body(name, "workload", f"workload:{name}", digest, np.concatenate(joined), windows, true_ids,
                {"prompt": ~output_mask, "output": output_mask},
                {"origin": f"workload:{name}", "sha256": digest, "sequences": len(joined),
                 "prompt_tokens": int(sum(len(p) for p, _ in sequences)),
                 "output_tokens": int(sum(len(o) for _, o in sequences)), "windows": len(windows),
                 "positions": int(len(true_ids))})


def evaluate(config: EvalConfig, say: Callable[[str], None] = lambda m: None,
             sequences: dict[str, list[tuple[list[int], list[int]]]] | None = None) -> dict[str, Any]:
    """Run the evaluation; returns the results (JSON-serialisable), also written to config.out if given.

    `sequences` (the bench's --quality): workload name -> [(prompt token ids, output token ids)], scored beside
    the texts, results under "workloads" with `prompt` and `output` segments."""
    from spectrt.runtime.generator import Generator
    from spectrt.runtime.machine import machine_facts

    if not config.texts and not sequences:
        raise QualityError("no text given; pass --text prose, --text code or --text PATH.")
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

    bodies = [text_body(text, generator.tokenizer, config.tokens, scheme, say) for text in texts]
    bodies += [workload_body(name, pairs, scheme) for name, pairs in (sequences or {}).items() if pairs]

    # every body's reference first, with the fp32 model loaded once, then freed before the engines run
    references = {}
    reference_model = ReferenceModel(source, config.threads) if source is not None else None
    for body in bodies:
        references[body.key] = (reference_scores(reference_model, body.sha256, body.ids, body.windows,
                                                  body.true_ids, scheme, mode=config.reference,
                                                  say=lambda m, n=body.label: say(f"{n}: {m}"))
                                 if reference_model is not None else None)
    if reference_model is not None:
        reference_model.release()

    scores: dict[str, dict[str, PositionScores]] = {body.key: {} for body in bodies}
    engine_facts: dict[str, Any] = {}
    target = generator.target
    _score_bodies("spectrt", lambda w: spectrt_rows(target, w), bodies, references, scores, say)
    engine_facts["spectrt"] = {
        "backend": type(getattr(target, "inner", target)).__name__,
        "precision": manifest.target.precision, "quantization": manifest.target.raw.get("quantization"),
        "invariance": generator.invariance.summary(), "threads": config.threads}
    generator.close()
    generator = target = None  # the sessions' memory goes before llama.cpp loads
    gc.collect()

    if want_llamacpp:
        from .llamacpp import facts, llamacpp_rows, load_llama

        say(f"llama.cpp: loading {source.path}")
        llm = load_llama(str(source.path), scheme.window, config.threads)
        engine_facts["llama.cpp"] = facts(llm, source.path.name, config.threads)
        _score_bodies("llama.cpp", lambda w: llamacpp_rows(llm, w), bodies, references, scores, say)
        close = getattr(llm, "close", None)
        if callable(close):
            close()
        del llm
        gc.collect()

    texts_out: dict[str, Any] = {}
    workloads_out: dict[str, Any] = {}
    for body in bodies:
        reference = references[body.key]
        entry = dict(body.facts)
        entry["engines"] = _engine_metrics(reference, scores[body.key], engine_facts)
        if body.segments:
            entry["segments"] = {segment: _engine_metrics(reference, scores[body.key], None, mask)
                                 for segment, mask in body.segments.items() if mask.any()}
        (workloads_out if body.kind == "workload" else texts_out)[body.name] = entry

    out = {
        "bundle": Path(config.bundle).name,  # names, never machine paths: results get shared and committed
        "bundle_name": manifest.name,
        "config": asdict(config) | {"texts": [t if t in SHIPPED else Path(t).name for t in config.texts],
                                     "bundle": Path(config.bundle).name,
                                     "source": Path(config.source).name if config.source else None,
                                     "out": Path(config.out).name if config.out else None},
        "target": {"precision": manifest.target.precision, "quantization": manifest.target.raw.get("quantization"),
                   "max_context": manifest.target.max_context},
        "source": source.to_json() if source is not None else None,
        "scheme": scheme.to_json() | {
            "description": "windows of `window` positions (BOS first when the tokenizer adds one), starts `stride` "
                           "text tokens apart; each text position scored once, after the first window with at "
                           "least window - stride tokens of context; log-softmax in float64 of fp32 logits",
            "workloads": "each prompt's token ids as the model saw them (chat template applied), followed by the "
                         "output plain greedy decoding produced for it, scored from the second token; segments "
                         "prompt and output by position",
            "kl": f"KL(reference || engine) over the reference's top {scheme.top_k} tokens plus one bucket for the "
                  f"rest of the vocabulary (a lower bound of the exact KL; docs/quality.md)"},
        "machine": machine_facts(),
        "skipped": skipped,
        "texts": texts_out,
    }
    if workloads_out:
        out["workloads"] = workloads_out
    if config.out:
        path = Path(config.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2, default=json_default))
    return out


def _engine_metrics(reference: Any, scores: dict[str, PositionScores], engine_facts: dict[str, Any] | None,
                    mask: np.ndarray | None = None) -> dict[str, Any]:
    """engine -> metrics over the positions in `mask` (all when None): the reference's row first, when there is
    one; `facts` attached when given."""
    def pick(values: np.ndarray) -> np.ndarray:
        return values if mask is None else values[mask]

    engines: dict[str, Any] = {}
    ref_true = pick(reference.scores.true_logp) if reference is not None else None
    if reference is not None:
        engines["reference"] = {**PositionScores(ref_true, None, None, reference.seconds).metrics(None),
                                "kl_mean": 0.0, "kl_p99": 0.0, "top1_agreement_pct": 100.0,
                                "tail_mass_mean": float(np.exp(pick(reference.scores.tail_logp)).mean())}
        if engine_facts is not None:
            engines["reference"] |= {"cached": reference.cached, "cache": reference.path.name,  # names, never paths
                                     "facts": reference.meta}
    for engine, score in scores.items():
        engines[engine] = (score if mask is None else score.subset(mask)).metrics(ref_true)
        if engine_facts is not None:
            engines[engine]["facts"] = engine_facts[engine]
    if mask is not None:  # a segment's positions are scored in the same passes as the rest: no time of their own
        for metrics in engines.values():
            metrics["seconds"] = None
    return engines


def json_default(value: Any) -> Any:
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

    def rows(label: str, engines: dict[str, Any]) -> None:
        for engine, m in engines.items():
            seconds = num(m["seconds"], ".1f") + (" (cached)" if m.get("cached") else "")
            lines.append(f"| {label} | {engine} | {m['positions']} | {num(m['perplexity'], '.3f')} | "
                         f"{num(m['perplexity_change_pct'], '+.2f', '%')} | {num(m['kl_mean'], '.4f')} | "
                         f"{num(m['kl_p99'], '.3f')} | {num(m['top1_agreement_pct'], '.1f', '%')} | {seconds} |")

    for name, text in results["texts"].items():
        rows(name, text["engines"])
    for name, workload in results.get("workloads", {}).items():
        for segment, engines in workload.get("segments", {}).items():
            rows(f"{name} workload, {segment}", engines)
    lines += [f"- {line}" for line in results["skipped"]]
    return "\n".join(lines)
