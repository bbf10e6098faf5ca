"""The bundle manifest: a versioned, validated description of everything in an engine bundle.

Written by `spectrt.compiler`, read here. Plain JSON + a hand-written validator, so the runtime
needs no schema library. See engines/README.md for the format.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from spectrt.errors import BundleError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
ROLES = ("target", "draft")
DTYPES = ("fp32", "fp16")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # int64 | fp32 | fp16
    shape: tuple[int | str, ...]  # str = symbolic dimension (seq_len, past_len)


@dataclass(frozen=True)
class ModelEntry:
    """One model of the pair as the runtime needs it."""

    role: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    logits_vocab: int
    precision: str
    max_context: int
    widths: tuple[int, ...]  # target: built verification widths K; draft: ()
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    onnx_path: str | None
    tensorrt: dict[str, Any] | None
    raw: dict[str, Any]


@dataclass(frozen=True)
class Manifest:
    path: Path  # bundle folder
    name: str
    target: ModelEntry
    draft: ModelEntry | None
    tokenizer_file: str
    generation: dict[str, Any]
    files: dict[str, dict[str, Any]]
    raw: dict[str, Any]

    def file(self, relative: str) -> Path:
        return self.path / relative


def _require(data: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in data:
        raise BundleError(f"manifest is missing '{where}{key}'; the bundle is incomplete or corrupt: rebuild it.")
    value = data[key]
    if not isinstance(value, kind):
        raise BundleError(f"manifest field '{where}{key}' has the wrong type ({type(value).__name__}); rebuild the bundle.")
    return value


def _tensor_specs(items: list[Any], where: str) -> tuple[TensorSpec, ...]:
    specs = []
    for item in items:
        name = _require(item, "name", str, where)
        specs.append(TensorSpec(name, _require(item, "dtype", str, where), tuple(_require(item, "shape", list, where))))
    return tuple(specs)


def _model_entry(role: str, data: dict[str, Any]) -> ModelEntry:
    where = f"models.{role}."
    arch = _require(data, "arch", dict, where)
    graph = _require(data, "graph", dict, where)
    precision = _require(data, "precision", str, where)
    if precision not in DTYPES:
        raise BundleError(f"{role} precision '{precision}' is unknown to this runtime; rebuild or upgrade spectrt.")
    backends = _require(data, "backends", dict, where)
    onnx = backends.get("onnx")
    entry = ModelEntry(
        role=role,
        num_layers=int(_require(arch, "num_layers", int, where + "arch.")),
        num_kv_heads=int(_require(arch, "num_kv_heads", int, where + "arch.")),
        head_dim=int(_require(arch, "head_dim", int, where + "arch.")),
        logits_vocab=int(_require(data, "logits_vocab", int, where)),
        precision=precision,
        max_context=int(_require(data, "max_context", int, where)),
        widths=tuple(int(w) for w in _require(data, "widths", list, where)),
        inputs=_tensor_specs(_require(graph, "inputs", list, where + "graph."), where + "graph.inputs."),
        outputs=_tensor_specs(_require(graph, "outputs", list, where + "graph."), where + "graph.outputs."),
        onnx_path=onnx["path"] if isinstance(onnx, dict) else None,
        tensorrt=backends.get("tensorrt"),
        raw=data,
    )
    if entry.onnx_path is None and entry.tensorrt is None:
        raise BundleError(f"the {role} model has no backend files (neither ONNX nor TensorRT); rebuild the bundle.")
    return entry


def parse_manifest(bundle_dir: Path, data: dict[str, Any]) -> Manifest:
    """Validate a manifest dict; raise BundleError naming the problem and the fix."""
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BundleError(
            f"bundle '{bundle_dir}' has manifest schema version {version!r}, but this spectrt reads version "
            f"{SCHEMA_VERSION}. Rebuild the bundle with this spectrt (`spectrt build ...`) or use the spectrt "
            f"version that built it."
        )
    models = _require(data, "models", dict, "")
    target = _model_entry("target", _require(models, "target", dict, "models."))
    draft = _model_entry("draft", models["draft"]) if isinstance(models.get("draft"), dict) else None
    if draft is not None and draft.logits_vocab != target.logits_vocab:
        raise BundleError(f"draft and target emit logits of different widths ({draft.logits_vocab} vs "
                          f"{target.logits_vocab}); the bundle is inconsistent: rebuild it.")
    tokenizer = _require(data, "tokenizer", dict, "")
    generation = _require(data, "generation", dict, "")
    _require(generation, "eos_token_ids", list, "generation.")
    files = _require(data, "files", dict, "")
    return Manifest(path=bundle_dir, name=str(data.get("name", bundle_dir.name)), target=target, draft=draft,
                    tokenizer_file=_require(tokenizer, "file", str, "tokenizer."), generation=generation,
                    files=files, raw=data)


def sha256_file(path: Path, block: int = 1 << 20, on_progress: Callable[[int, int], None] | None = None) -> str:
    """sha256 hex digest of `path`, read in blocks; on_progress(done_bytes, total_bytes) after each block."""
    digest, done, total = hashlib.sha256(), 0, Path(path).stat().st_size
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
            done += len(chunk)
            if on_progress:
                on_progress(done, total)
    return digest.hexdigest()


def _verified_cache_path() -> Path:
    import os

    root = os.environ.get("SPECTRT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "spectrt")
    return Path(root) / "verified-files.json"


def _load_verified() -> dict[str, str]:
    try:
        return json.loads(_verified_cache_path().read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _save_verified(records: dict[str, str]) -> None:
    path = _verified_cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(records))
        tmp.replace(path)
    except OSError:
        pass  # a read-only cache only costs re-hashing next time


def verify_files(manifest: Manifest, *, check_hashes: bool = True, cache: bool = False,
                 only: set[str] | None = None) -> None:
    """Every listed file exists with the recorded size and sha256.

    cache=True skips re-hashing a file whose (path, size, mtime) was verified against the same
    sha256 before (recorded under the user cache dir), so loading a multi-GB bundle twice is cheap.
    """
    records = _load_verified() if cache else {}
    changed = False
    for relative, facts in manifest.files.items():
        if only is not None and relative not in only:
            continue
        path = manifest.file(relative)
        if not path.is_file():
            raise BundleError(f"bundle file '{relative}' is missing from {manifest.path}; rebuild the bundle.")
        size = path.stat().st_size
        if size != facts.get("size"):
            raise BundleError(f"bundle file '{relative}' has {size} bytes, the manifest says {facts.get('size')}: "
                              f"the file is truncated or was replaced. Rebuild the bundle.")
        if not check_hashes:
            continue
        stat = path.stat()
        key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        if cache and records.get(key) == facts.get("sha256"):
            continue
        if sha256_file(path) != facts.get("sha256"):
            raise BundleError(f"bundle file '{relative}' does not match its sha256 in the manifest: it is corrupt "
                              f"or was modified. Rebuild the bundle (or copy it again).")
        if cache:
            records[key] = facts["sha256"]
            changed = True
    if changed:
        _save_verified(records)


def read_manifest(bundle_dir: Path | str) -> Manifest:
    """Read and validate `bundle_dir/manifest.json` (no file hashing; see verify_files)."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise BundleError(f"bundle '{bundle_dir}' does not exist. Build one with `spectrt build` (see README).")
    path = bundle_dir / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(f"'{bundle_dir}' has no {MANIFEST_NAME}; it is not a spectrt bundle (or its build did not finish).")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path} is not valid JSON ({exc}); rebuild the bundle.") from exc
    if not isinstance(data, dict):
        raise BundleError(f"{path} does not hold a JSON object; rebuild the bundle.")
    return parse_manifest(bundle_dir, data)
