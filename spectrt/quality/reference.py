"""The reference: transformers in fp32 on the bundle's SOURCE weights (a GGUF file dequantized, or a Hugging Face
folder), over exactly the windows and positions the engines are scored on, summarized as top-k log-probs
(scoring.TopK) and cached on disk.

Cache: `cache_root()/quality/<key>.npz` (compressed), key = sha256 of the source's recorded sha256, the text's
sha256, the token ids' sha256 (the tokenizer's output), the window scheme (window, stride, BOS, top-k, scheme
version) and the number of tokens. A cached reference needs neither torch nor transformers."""

from __future__ import annotations

import gc
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from spectrt.runtime.machine import cache_root

from .errors import QualityError
from .scoring import TopK, Window, WindowScheme, log_softmax, top_k_summary

REF_ROW_CHUNK = 256  # logits rows converted to float64 at a time (151936-wide rows: 300 MB per chunk)


@dataclass(frozen=True)
class Source:
    """The model the bundle's target was built from, found on this machine and checked against the manifest."""

    path: Path
    name: str
    sha256: str  # the GGUF file's sha256; for a folder, sha256 of its recorded {file: sha256} table
    files: dict[str, str]

    @property
    def is_gguf(self) -> bool:
        return self.path.is_file() and self.path.suffix == ".gguf"

    def to_json(self) -> dict[str, Any]:
        return {"file": self.path.name, "name": self.name, "sha256": self.sha256, "files": self.files,
                "format": "gguf" if self.is_gguf else "hf-folder"}


def recorded_source(manifest_raw: dict[str, Any]) -> dict[str, Any]:
    source = manifest_raw.get("models", {}).get("target", {}).get("source")
    if not isinstance(source, dict) or not source.get("name") or not isinstance(source.get("files"), dict):
        raise QualityError("the bundle's manifest records no target source (models.target.source); rebuild the "
                           "bundle with this spectrt version to evaluate it against its source.")
    return source


def source_key(recorded: dict[str, Any]) -> str:
    files = recorded["files"]
    if len(files) == 1 and next(iter(files)) == recorded["name"]:
        return next(iter(files.values()))
    return hashlib.sha256(json.dumps(sorted(files.items())).encode()).hexdigest()


def _check_files(path: Path, recorded: dict[str, Any]) -> None:
    """The files the manifest recorded, with their sha256, at `path` (a file, or a folder holding them)."""
    from spectrt.runtime.manifest import sha256_file

    for name, digest in recorded["files"].items():
        file = path if path.is_file() else path / name
        if path.is_file() and name != path.name:
            raise QualityError(f"'{path}' is not the bundle's target source: the manifest records '{name}'.")
        if not file.is_file():
            raise QualityError(f"'{path}' lacks '{name}', which the bundle's target was built from.")
        got = sha256_file(file)
        if got != digest:
            raise QualityError(f"'{file}' is not the file the bundle's target was built from (sha256 {got[:12]}..., "
                               f"the manifest records {digest[:12]}...); pass the original with --source.")


def resolve_source(manifest_raw: dict[str, Any], given: str | None = None) -> Source:
    """The target's source: `given` (--source), else the path the manifest records (if any, and present), else a
    known model of that file name (`spectrt models list`; fetched into the cache if needed). Verified by sha256."""
    recorded = recorded_source(manifest_raw)
    name, key = recorded["name"], source_key(recorded)
    if given is not None:
        path = Path(given).expanduser()
        if not path.exists():
            raise QualityError(f"--source '{given}' does not exist; pass the GGUF file or Hugging Face folder the "
                               f"bundle's target was built from ('{name}').")
        _check_files(path, recorded)
        return Source(path.resolve(), name, key, dict(recorded["files"]))
    recorded_path = recorded.get("path")
    if isinstance(recorded_path, str) and Path(recorded_path).exists():
        path = Path(recorded_path)
        _check_files(path, recorded)
        return Source(path.resolve(), name, key, dict(recorded["files"]))
    from spectrt.compiler.fetch import KNOWN_MODELS, fetch_model

    for model_name, known in KNOWN_MODELS.items():
        if known.filename == name and recorded["files"].get(name) == known.sha256:
            return Source(fetch_model(model_name), name, key, dict(recorded["files"]))  # fetch checks the sha256
    raise QualityError(f"the bundle's target source '{name}' is not on this machine (not a known model, no "
                       f"recorded path): pass --source PATH, the GGUF file or Hugging Face folder it was built from.")


def cache_dir() -> Path:
    """Where references are cached (tests point it elsewhere)."""
    return cache_root() / "quality"


def cache_path(source: Source, text_sha256: str, ids: np.ndarray, scheme: WindowScheme) -> Path:
    ids_sha = hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()
    key = json.dumps({"source": source.sha256, "text": text_sha256, "ids": ids_sha, "tokens": int(len(ids)),
                      "scheme": scheme.to_json()}, sort_keys=True)
    return cache_dir() / f"ref-{hashlib.sha256(key.encode()).hexdigest()[:24]}.npz"


@dataclass
class Reference:
    scores: TopK
    seconds: float  # computing it here (0.0 when read from the cache; the cached `meta` has the original time)
    cached: bool
    path: Path
    meta: dict[str, Any]


def load_cached(path: Path, positions: int) -> Reference | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            scores = TopK(data["ids"], data["logp"], data["tail_logp"], data["true_logp"])
            meta = json.loads(str(data["meta"]))
    except Exception:  # a truncated or foreign file: compute again
        return None
    if len(scores.true_logp) != positions:
        return None
    return Reference(scores, 0.0, True, path, meta)


def save(path: Path, scores: TopK, meta: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial.npz")
    np.savez_compressed(partial, ids=scores.ids, logp=scores.logp, tail_logp=scores.tail_logp,
                        true_logp=scores.true_logp, meta=np.array(json.dumps(meta)))
    partial.replace(path)


def transformers_available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))


def load_reference_model(source: Source, threads: int = 0) -> Any:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # the weight-loading bar (GGUF dequantization has its own tqdm bar)
    if threads:
        torch.set_num_threads(threads)
    try:
        if source.path.is_file():
            model = AutoModelForCausalLM.from_pretrained(source.path.parent, gguf_file=source.path.name,
                                                         dtype=torch.float32)
        else:
            model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32)
    except Exception as exc:  # third-party loaders raise anything on corrupt input
        raise QualityError(f"transformers could not load the source '{source.path}': {exc}") from exc
    return model.eval()


def transformers_rows(model: Any, window: Window) -> Iterator[np.ndarray]:
    """fp32 logits of the window's scored rows, in chunks: one forward pass over the fed tokens, logits kept only
    for the scored rows (logits_to_keep), converted to numpy a chunk at a time."""
    import torch

    keep = window.scored
    with torch.inference_mode():
        input_ids = torch.from_numpy(window.fed.copy()).unsqueeze(0)
        try:
            logits = model(input_ids=input_ids, use_cache=False, logits_to_keep=keep).logits[0]
        except TypeError:  # a model class without logits_to_keep
            logits = model(input_ids=input_ids, use_cache=False).logits[0]
        logits = logits[-keep:].float()
        for start in range(0, keep, REF_ROW_CHUNK):
            yield logits[start:start + REF_ROW_CHUNK].numpy()


class ReferenceModel:
    """The source in fp32, loaded on first use and kept for every text of one evaluation (a 1.5B GGUF takes about a
    minute to dequantize and load); `release()` frees it."""

    def __init__(self, source: Source, threads: int = 0):
        self.source, self.threads = source, threads
        self.model: Any = None
        self.load_seconds = 0.0

    def get(self, say: Callable[[str], None]) -> Any:
        if self.model is None:
            start = time.perf_counter()
            say(f"reference: loading {self.source.name} in fp32 with transformers")
            self.model = load_reference_model(self.source, self.threads)
            self.load_seconds = time.perf_counter() - start
        return self.model

    def release(self) -> None:
        self.model = None
        gc.collect()


def compute_reference(reference: ReferenceModel, windows: list[Window], true_ids: np.ndarray, scheme: WindowScheme,
                      *, say: Callable[[str], None] = lambda m: None) -> tuple[TopK, float, dict]:
    import torch
    import transformers

    model = reference.get(say)
    source = reference.source
    loaded = time.perf_counter()
    parts, done = [], 0
    for window in windows:
        for logits in transformers_rows(model, window):
            rows = len(logits)
            parts.append(top_k_summary(log_softmax(logits), true_ids[done:done + rows], scheme.top_k))
            done += rows
    assert done == len(true_ids), f"reference scored {done} of {len(true_ids)} positions"
    meta = {"tool": "transformers", "transformers": transformers.__version__, "torch": torch.__version__,
            "precision": "fp32" + (" (GGUF dequantized)" if source.is_gguf else ""), "source": source.to_json(),
            "load_seconds": round(reference.load_seconds, 3), "seconds": round(time.perf_counter() - loaded, 3),
            "threads": torch.get_num_threads()}
    return TopK.concat(parts), time.perf_counter() - loaded, meta


def reference_scores(reference: ReferenceModel, text_sha256: str, ids: np.ndarray, windows: list[Window],
                     true_ids: np.ndarray, scheme: WindowScheme, *, mode: str = "auto",
                     say: Callable[[str], None] = lambda m: None) -> Reference | None:
    """The cached reference, else computed (mode auto/transformers) and cached; None when mode is 'none', or 'auto'
    without torch/transformers and nothing cached (said with `say`)."""
    if mode == "none":
        return None
    path = cache_path(reference.source, text_sha256, ids, scheme)
    cached = load_cached(path, len(true_ids))
    if cached is not None:
        say(f"reference: cached ({path})")
        return cached
    if not transformers_available():
        if mode == "transformers":
            raise QualityError("--reference transformers needs torch and transformers: pip install 'spectrt[build]'.")
        say("reference: skipped (torch/transformers not installed and nothing cached; pip install 'spectrt[build]')")
        return None
    scores, seconds, meta = compute_reference(reference, windows, true_ids, scheme, say=say)
    save(path, scores, meta)
    say(f"reference: {len(true_ids)} positions in {seconds:.1f} s, cached ({path})")
    return Reference(scores, seconds, False, path, meta)
