"""The bundle manifest: a versioned, validated description of everything in an engine bundle.

Written by `spectrt.compiler`, read here. The manifest is untrusted input until it passed three
steps, each of which fails with a BundleError (never a raw ValueError/KeyError/TypeError):

1. `read_manifest`: manifest.json is a readable, UTF-8, plain-JSON object inside the folder;
2. `parse_manifest`: the schema version, then the declared JSON Schema `manifest.schema.json`
   (draft 2020-12: types, required keys, ranges, enums, relative POSIX paths), then the rules a
   schema cannot express (graph I/O against the architecture, equal logits widths, every file the
   runtime loads listed in the hashed `files` table);
3. `verify_files`: every file in `files` lies inside the bundle folder (symlinks resolved) and
   has the recorded size and sha256, and every external-data location written inside an ONNX graph
   names one of those files (`check_external_data`).

`Manifest.file()` is the only way the runtime turns a manifest path into a filesystem path: it
refuses anything that resolves outside the bundle folder. See engines/README.md for the format.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import posixpath
import re
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable

from spectrt.runtime.errors import BundleError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
SCHEMA_FILE = Path(__file__).with_name("manifest.schema.json")
ROLES = ("target", "draft")
DTYPES = ("fp32", "fp16")
MAX_MANIFEST_BYTES = 16 << 20  # real manifests are tens of KB; refuse to read a huge file into memory


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
    onnx_data: str | None = None  # the ONNX graph's external-data file (relative), if any
    logits_rows: int | None = None  # the graph returns logits for the last min(S, logits_rows) positions (None: all)
    features: int | None = None  # hidden size of the `features` output (final hidden state of every position)
    batch_slots: int = 1  # sequences one call of the graph can hold (expected_graph_io)

    @property
    def tensorrt_path(self) -> str | None:
        return self.tensorrt["path"] if self.tensorrt else None

    def used_files(self) -> tuple[str, ...]:
        """Relative paths of every file the runtime may open for this model."""
        return tuple(p for p in (self.onnx_path, self.onnx_data, self.tensorrt_path) if p is not None)


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
    head: "HeadEntry | None" = None

    def file(self, relative: str) -> Path:
        """The resolved path of bundle file `relative`, guaranteed inside the bundle folder.

        Refuses absolute paths, `..`, and anything (e.g. a symlink) that resolves outside the folder."""
        return confined_path(self.path, relative)

    def used_files(self) -> tuple[str, ...]:
        """Every file the runtime may open: tokenizer, ONNX graphs and their data, TensorRT plans."""
        models = [self.target] + [m for m in (self.draft, self.head) if m is not None]
        return (self.tokenizer_file,) + tuple(p for m in models for p in m.used_files())


@dataclass(frozen=True)
class HeadEntry:
    """A trained draft head (models.head): reads the target's features, proposes over `output_vocab` token ids."""

    hidden_size: int
    num_kv_heads: int
    head_dim: int
    output_vocab: int
    precision: str
    max_context: int
    logits_vocab: int
    vocab_ids: str  # relative path of the int64 .npy mapping output rows to token ids
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    onnx_path: str | None
    onnx_data: str | None
    tensorrt: dict[str, Any] | None
    raw: dict[str, Any]
    role: str = "head"
    num_layers: int = 1

    @property
    def tensorrt_path(self) -> str | None:
        return self.tensorrt["path"] if self.tensorrt else None

    def used_files(self) -> tuple[str, ...]:
        return tuple(p for p in (self.vocab_ids, self.onnx_path, self.onnx_data, self.tensorrt_path) if p is not None)


# -- schema ---------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def manifest_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of manifest schema version 1."""
    try:
        return json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BundleError(f"spectrt's manifest schema {SCHEMA_FILE} cannot be read ({exc}): the spectrt "
                          f"installation is broken; reinstall spectrt.") from exc


@lru_cache(maxsize=1)
def _validator() -> Any:
    from jsonschema import Draft202012Validator, validators

    # JSON Schema calls 1.0 an integer; a manifest we write never holds one, so refuse it (and booleans)
    type_checker = Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _checker, value: isinstance(value, int) and not isinstance(value, bool))
    strict = validators.extend(Draft202012Validator, type_checker=type_checker)
    return strict(manifest_schema())


@lru_cache(maxsize=1)
def _relpath_pattern() -> re.Pattern[str]:
    return re.compile(manifest_schema()["$defs"]["relpath"]["pattern"])


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer", float: "number",
               type(None): "null"}


def field_path(parts: Iterable[Any]) -> str:
    """['models', 'target', 'graph', 'inputs', 3, 'dtype'] -> models.target.graph.inputs[3].dtype"""
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        elif _IDENTIFIER.fullmatch(str(part)):
            text += f".{part}" if text else str(part)
        else:
            text += f"[{json.dumps(str(part))}]"
    return text or "(top level)"


def _short(value: Any, limit: int = 60) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _schema_problem(error: Any) -> tuple[str, str]:
    """(kind, text) for one jsonschema error; kind groups missing keys of the same object."""
    parts = list(error.absolute_path)
    where = field_path(parts)
    instance = error.instance
    if error.validator == "required":
        missing = [k for k in error.validator_value if isinstance(instance, dict) and k not in instance]
        # one error per missing key; its message starts with that key's repr
        key = next((k for k in missing if error.message.startswith(repr(k))), missing[0] if missing else "?")
        return f"required:{where}", field_path(parts + [key])
    if error.validator == "type":
        expected = error.validator_value
        expected = " or ".join(expected) if isinstance(expected, list) else expected
        kind = _JSON_TYPES.get(type(instance), "value")
        got = _short(instance) if kind in ("null", "boolean") else f"{kind} {_short(instance)}"
        return "", f"field '{where}' has the wrong type (got {got}, expected {expected})"
    description = error.schema.get("description") if isinstance(error.schema, dict) else None
    problem = f"{_short(instance)} is not {description}" if description else error.message
    if len(problem) > 300:
        problem = problem[:297] + "..."
    if "propertyNames" in error.absolute_schema_path:
        return "", f"field '{where}' has an invalid key: {problem}"
    return "", f"field '{where}' is invalid: {problem}"


def _schema_error_message(bundle_dir: Path, errors: list[Any], limit: int = 5) -> str:
    """One message for the schema errors, the most relevant first (at most `limit` problems)."""
    from jsonschema.exceptions import best_match, relevance

    missing: dict[str, list[str]] = {}
    problems: list[str] = []
    for error in sorted(errors, key=relevance, reverse=True):
        kind, text = _schema_problem(best_match([error]))  # best_match descends into anyOf branches
        if kind:
            if kind not in missing:
                missing[kind] = []
                problems.append(kind)
            if text not in missing[kind]:
                missing[kind].append(text)
        elif text not in problems:
            problems.append(text)
    texts = ["missing " + ", ".join(f"'{name}'" for name in missing[p]) if p in missing else p for p in problems]
    more = f" (and {len(texts) - limit} more)" if len(texts) > limit else ""
    return (f"the manifest of bundle '{bundle_dir}' does not match the schema: " + "; ".join(texts[:limit]) + more
            + ". The bundle is incomplete or corrupt: rebuild it.")


def _validate_schema(bundle_dir: Path, data: dict[str, Any]) -> None:
    from itertools import islice

    try:
        errors = list(islice(_validator().iter_errors(data), 100))
        message = _schema_error_message(bundle_dir, errors) if errors else None
    except RecursionError:
        raise BundleError(f"the manifest of bundle '{bundle_dir}' is nested too deeply to be a spectrt manifest; "
                          f"rebuild the bundle.") from None
    if message:
        raise BundleError(message)


# -- semantic checks (what the schema cannot say) ---------------------------------------------------


def slot_suffix(slots: int, slot: int) -> str:
    """The name suffix of a slot's cache tensors: none in a one-sequence graph, `_slot{b}` in a batched one."""
    return "" if slots == 1 else f"_slot{slot}"


def expected_graph_io(num_layers: int, kv_heads: int, head_dim: int, precision: str, vocab: int,
                      logits_rows: int | None = None, features: int | None = None, slots: int = 1
                      ) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The graph I/O contract (engines/README.md) for these architecture numbers; with `logits_rows` the
    logits cover the last min(seq_len, logits_rows) positions only; with `features` (a hidden size) the graph also
    returns the final hidden state of every position.

    A batched graph (`slots` > 1) takes the rows of up to `slots` sequences in one call: input_ids holds them one
    sequence after another, `seq_lens` [slots] says how many each has (the used slots first, then 0s for the unused
    ones: a slot after an unused one is not computed), each slot has its own
    past/new cache tensors (suffix `_slot{b}`), and the logits are each slot's last min(S_b, logits_rows) rows in
    slot order."""
    inputs = [TensorSpec("input_ids", "int64", (1, "seq_len"))]
    if slots > 1:
        inputs.append(TensorSpec("seq_lens", "int64", (slots,)))
    outputs = [TensorSpec("logits", "fp32", (1, "seq_len" if logits_rows is None else "logits_rows", vocab))]
    if features is not None:
        outputs.append(TensorSpec("features", "fp32", (1, "seq_len", features)))
    for i in range(num_layers):
        for slot in range(slots):
            suffix = slot_suffix(slots, slot)
            past_len, seq_len = ("past_len", "seq_len") if slots == 1 else (f"past_len{suffix}", f"seq_len{suffix}")
            inputs += [TensorSpec(f"past_{kind}_{i}{suffix}", precision, (1, past_len, kv_heads, head_dim))
                       for kind in ("key", "value")]
            outputs += [TensorSpec(f"new_{kind}_{i}{suffix}", precision, (1, seq_len, kv_heads, head_dim))
                        for kind in ("key", "value")]
    return tuple(inputs), tuple(outputs)


def expected_head_io(hidden_size: int, kv_heads: int, head_dim: int, precision: str, output_vocab: int
                     ) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """A draft head's I/O: the next tokens and the target's features of the positions before them in; logits over the
    reduced vocabulary and the predicted next feature of the last position out, and its one layer's new cache rows."""
    kv_past, kv_new = (1, "past_len", kv_heads, head_dim), (1, "seq_len", kv_heads, head_dim)
    inputs = (TensorSpec("input_ids", "int64", (1, "seq_len")), TensorSpec("features", "fp32", (1, "seq_len", hidden_size)),
              TensorSpec("past_key_0", precision, kv_past), TensorSpec("past_value_0", precision, kv_past))
    outputs = (TensorSpec("logits", "fp32", (1, "logits_rows", output_vocab)),
               TensorSpec("next_features", "fp32", (1, "logits_rows", hidden_size)),
               TensorSpec("new_key_0", precision, kv_new), TensorSpec("new_value_0", precision, kv_new))
    return inputs, outputs


def compare_io(kind: str, declared: Iterable[TensorSpec], expected: Iterable[TensorSpec]) -> str | None:
    """None if `declared` is exactly `expected` (by name, any order), else what differs."""
    declared, expected = list(declared), {spec.name: spec for spec in expected}
    names = [spec.name for spec in declared]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        return f"{kind} {duplicates} appear more than once"
    missing = [n for n in expected if n not in names]
    extra = [n for n in names if n not in expected]
    if missing or extra:
        return (f"{kind} differ from the contract: " + (f"missing {_few(missing)}" if missing else "")
                + ("; " if missing and extra else "") + (f"unexpected {_few(extra)}" if extra else ""))
    for spec in declared:
        want = expected[spec.name]
        if spec.dtype != want.dtype:
            return f"{kind[:-1]} '{spec.name}' has dtype {spec.dtype}, expected {want.dtype}"
        if tuple(spec.shape) != tuple(want.shape):
            return f"{kind[:-1]} '{spec.name}' has shape {list(spec.shape)}, expected {list(want.shape)}"
    return None


def _few(names: list[str], count: int = 4) -> str:
    return ", ".join(names[:count]) + (f" and {len(names) - count} more" if len(names) > count else "")


def _model_entry(role: str, data: dict[str, Any]) -> ModelEntry:
    arch, graph, backends = data["arch"], data["graph"], data["backends"]
    onnx = backends.get("onnx")
    return ModelEntry(
        role=role,
        num_layers=arch["num_layers"],
        num_kv_heads=arch["num_kv_heads"],
        head_dim=arch["head_dim"],
        logits_vocab=data["logits_vocab"],
        precision=data["precision"],
        max_context=data["max_context"],
        widths=tuple(data["widths"]),
        inputs=tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in graph["inputs"]),
        outputs=tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in graph["outputs"]),
        onnx_path=onnx["path"] if onnx is not None else None,
        tensorrt=backends.get("tensorrt"),
        raw=data,
        onnx_data=onnx.get("data") if onnx is not None else None,
        logits_rows=data.get("logits_rows"),
        features=data.get("features"),
        batch_slots=data.get("batch_slots", 1),
    )


def _head_entry(data: dict[str, Any], target: ModelEntry) -> HeadEntry:
    arch, onnx = data["arch"], data["backends"].get("onnx")
    entry = HeadEntry(
        hidden_size=arch["hidden_size"], num_kv_heads=arch["num_kv_heads"], head_dim=arch["head_dim"],
        output_vocab=arch["output_vocab"], precision=data["precision"], max_context=data["max_context"],
        logits_vocab=data["logits_vocab"], vocab_ids=data["vocab_ids"],
        inputs=tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in data["graph"]["inputs"]),
        outputs=tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in data["graph"]["outputs"]),
        onnx_path=onnx["path"] if onnx is not None else None, onnx_data=onnx.get("data") if onnx is not None else None,
        tensorrt=data["backends"].get("tensorrt"), raw=data)
    inputs, outputs = expected_head_io(entry.hidden_size, entry.num_kv_heads, entry.head_dim, entry.precision,
                                       entry.output_vocab)
    for kind, declared, expected in (("inputs", entry.inputs, inputs), ("outputs", entry.outputs, outputs)):
        problem = compare_io(kind, declared, expected)
        if problem:
            raise BundleError(f"the head graph I/O in the manifest ('models.head.graph.{kind}') does not fit its "
                              f"architecture: {problem}. The manifest is inconsistent: retrain the head "
                              f"(`spectrt train-head`).")
    if target.features != entry.hidden_size:
        raise BundleError(f"the draft head reads features of size {entry.hidden_size} but the target graph "
                          f"{'returns none' if target.features is None else f'returns {target.features}'}; the "
                          f"manifest is inconsistent: retrain the head (`spectrt train-head`).")
    if entry.logits_vocab != target.logits_vocab or entry.max_context != target.max_context:
        raise BundleError("the draft head's logits_vocab / max_context differ from the target's; the manifest is "
                          "inconsistent: retrain the head (`spectrt train-head`).")
    return entry


def _check_model(entry: ModelEntry) -> None:
    role, where = entry.role, f"models.{entry.role}"
    declared_role = entry.raw["role"]
    if declared_role != role:
        raise BundleError(f"manifest field '{where}.role' says '{declared_role}' under models.{role}; the manifest "
                          f"is inconsistent: rebuild the bundle.")
    inputs, outputs = expected_graph_io(entry.num_layers, entry.num_kv_heads, entry.head_dim, entry.precision,
                                        entry.logits_vocab, entry.logits_rows, entry.features, entry.batch_slots)
    for kind, declared, expected in (("inputs", entry.inputs, inputs), ("outputs", entry.outputs, outputs)):
        problem = compare_io(kind, declared, expected)
        if problem:
            raise BundleError(
                f"the {role} graph I/O in the manifest ('{where}.graph.{kind}') does not fit its architecture "
                f"(num_layers {entry.num_layers}, num_kv_heads {entry.num_kv_heads}, head_dim {entry.head_dim}, "
                f"precision {entry.precision}, logits_vocab {entry.logits_vocab}): {problem}. The manifest is "
                f"inconsistent: rebuild the bundle.")
    if entry.widths and max(entry.widths) + 1 >= entry.max_context:
        raise BundleError(f"{role} max_context {entry.max_context} is too small for its width {max(entry.widths)} "
                          f"(verifying K tokens needs K+1 new rows plus a cached one); rebuild the bundle.")
    if entry.widths and entry.logits_rows is not None and entry.logits_rows < max(entry.widths) + 1:
        raise BundleError(f"{role} graph returns logits for {entry.logits_rows} positions per call but verifying width "
                          f"{max(entry.widths)} needs {max(entry.widths) + 1} ('{where}.logits_rows'); the manifest is "
                          f"inconsistent: rebuild the bundle.")
    trained = entry.raw["arch"].get("max_position_embeddings")
    if isinstance(trained, int) and entry.max_context > trained:
        raise BundleError(f"{role} max_context {entry.max_context} exceeds the model's max_position_embeddings "
                          f"{trained}; the manifest is inconsistent: rebuild the bundle.")


def parse_manifest(bundle_dir: Path, data: dict[str, Any]) -> Manifest:
    """Validate a manifest dict (schema, then cross-field rules); raise BundleError naming the problem and the fix."""
    bundle_dir = Path(bundle_dir)
    if not isinstance(data, dict):
        raise BundleError(f"the manifest of bundle '{bundle_dir}' is not a JSON object; rebuild the bundle.")
    version = data.get("schema_version")
    if isinstance(version, bool) or version != SCHEMA_VERSION:
        raise BundleError(
            f"bundle '{bundle_dir}' has manifest schema version {_short(version)}, but this spectrt reads version "
            f"{SCHEMA_VERSION}. Rebuild the bundle with this spectrt (`spectrt build ...`) or use the spectrt "
            f"version that built it."
        )
    _validate_schema(bundle_dir, data)

    models = data["models"]
    target = _model_entry("target", models["target"])
    draft = _model_entry("draft", models["draft"]) if models.get("draft") is not None else None
    for entry in (target, draft):
        if entry is not None:
            _check_model(entry)
    if draft is not None:
        if draft.logits_vocab != target.logits_vocab:
            raise BundleError(f"draft and target emit logits of different widths ({draft.logits_vocab} vs "
                              f"{target.logits_vocab}); the bundle is inconsistent: rebuild it.")
        if draft.max_context != target.max_context:
            raise BundleError(f"draft and target have different max_context ({draft.max_context} vs "
                              f"{target.max_context}); the bundle is inconsistent: rebuild it.")
    tokenizer_size = data["tokenizer"]["size"]
    if tokenizer_size != target.logits_vocab:
        raise BundleError(f"the tokenizer produces {tokenizer_size} ids but the target emits {target.logits_vocab} "
                          f"logits; the bundle is inconsistent: rebuild it.")
    head = _head_entry(models["head"], target) if models.get("head") is not None else None
    manifest = Manifest(path=bundle_dir, name=data["name"], target=target, draft=draft,
                        tokenizer_file=data["tokenizer"]["file"], generation=data["generation"],
                        files=data["files"], raw=data, head=head)
    unlisted = [p for p in manifest.used_files() if p not in manifest.files]
    if unlisted:
        raise BundleError(f"bundle file(s) {_few(unlisted)} are used by the runtime but missing from the manifest's "
                          f"'files' table: every file the runtime loads must be in the hashed table. The manifest is "
                          f"incomplete or was tampered with: rebuild the bundle.")
    return manifest


# -- files ----------------------------------------------------------------------------------------


def confined_path(bundle_dir: Path | str, relative: str) -> Path:
    """`bundle_dir/relative` resolved (symlinks followed), refused unless it stays inside the bundle folder."""
    if not isinstance(relative, str) or not _relpath_pattern().search(relative):
        raise BundleError(f"bundle path {_short(relative)} is not a relative path inside the bundle (no leading '/', "
                          f"no '..', no '\\' or drive letter); the manifest is corrupt or was tampered with: "
                          f"rebuild the bundle.")
    try:
        root = Path(bundle_dir).resolve()
        resolved = (root / relative).resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # symlink loops: RuntimeError before 3.13, OSError after
        raise BundleError(f"bundle file '{relative}' cannot be resolved ({exc}); rebuild or copy the bundle again.") from exc
    if not resolved.is_relative_to(root):
        raise BundleError(f"bundle file '{relative}' resolves to {resolved}, outside the bundle folder {root} (a symlink "
                          f"out of the bundle?); every bundle file must lie inside its folder: rebuild or copy the "
                          f"bundle again.")
    return resolved


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


def file_facts(path: Path) -> dict[str, Any]:
    """A bundle file's record in the manifest's `files` table."""
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


# -- the verified-files record (verify="cached") ----------------------------------------------------
#
# What it protects against: accidental corruption, partial or interrupted copies, and a bundle file changed,
# replaced or rewritten after it was verified, by anyone, including with its old size and mtime put back
# (`touch -d`, `os.utime`). A record is trusted only while the file's (device, inode, size, mtime_ns,
# ctime_ns) are those seen when it was hashed against the manifest's sha256: a rewrite changes ctime, a
# replacement changes the inode, and no unprivileged call sets ctime back. A file whose ctime was within
# SETTLE_NS of the clock when it was hashed is not recorded (timestamps tick coarsely: a write in the same
# tick would keep its ctime; git calls this "racily clean").
#
# What it does not protect against: anyone who can write this record (it lives in the user's own cache
# folder) or run code as the user, root (who can set the clock), and filesystems whose inode numbers or
# ctimes are not stable. For bundles from a shared or untrusted place, or a cache folder others can write,
# load with verify="full" (`spectrt.load(..., verify="full")`, `spectrt inspect --verify`, Triton's
# `--verify full`): it hashes every file on every load.

SETTLE_NS = 2_000_000_000  # 2 s: coarser than any filesystem's ctime tick (FAT: 2 s, ext3: 1 s, ext4: a jiffy)
clock_ns = time.time_ns  # tests inject a clock


def _verified_cache_path() -> Path:
    from .machine import cache_root

    return cache_root() / "verified-files.json"


def _load_verified() -> dict[str, str]:
    try:
        records = json.loads(_verified_cache_path().read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    return {k: v for k, v in records.items() if isinstance(v, str)} if isinstance(records, dict) else {}


def _save_verified(records: dict[str, str]) -> None:
    path = _verified_cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(records))
        tmp.replace(path)
    except OSError:
        pass  # a read-only cache only costs re-hashing next time


def verified_record(stat: os.stat_result, sha256: str) -> str:
    """What the verified-files record holds for a file with this stat that hashed to `sha256` (see above)."""
    return f"{stat.st_dev}|{stat.st_ino}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}|{sha256}"


def verify_files(manifest: Manifest, *, check_hashes: bool = True, cache: bool = False,
                 only: set[str] | None = None) -> None:
    """Every listed file lies inside the bundle folder and exists with the recorded size and sha256; then the
    ONNX graphs' external-data locations name listed files (check_external_data).

    cache=True skips re-hashing a file whose (device, inode, size, mtime, ctime) were recorded when it hashed to
    the manifest's sha256 (under the user cache dir; see the threat model above), so loading a multi-GB bundle
    twice is cheap.
    """
    records = _load_verified() if cache else {}
    changed = False
    for relative, facts in manifest.files.items():
        if only is not None and relative not in only:
            continue
        path = manifest.file(relative)
        try:
            if not path.is_file():
                raise BundleError(f"bundle file '{relative}' is missing from {manifest.path}; rebuild the bundle.")
            stat = path.stat()
            if stat.st_size != facts["size"]:
                raise BundleError(f"bundle file '{relative}' has {stat.st_size} bytes, the manifest says "
                                  f"{facts['size']}: the file is truncated or was replaced. Rebuild the bundle.")
            if not check_hashes:
                continue
            record = verified_record(stat, facts["sha256"])
            if cache and records.get(str(path)) == record:
                continue
            if sha256_file(path) != facts["sha256"]:
                raise BundleError(f"bundle file '{relative}' does not match its sha256 in the manifest: it is corrupt "
                                  f"or was modified. Rebuild the bundle (or copy it again).")
        except OSError as exc:
            raise BundleError(f"bundle file '{relative}' cannot be read ({exc}); rebuild or copy the bundle again.") from exc
        if cache and clock_ns() - stat.st_ctime_ns > SETTLE_NS:
            records[str(path)] = record  # one record per path: the file's latest verified state
            changed = True
    if changed:
        _save_verified(records)
    check_external_data(manifest, only=only)


# -- external data named inside the ONNX graphs -----------------------------------------------------
#
# An ONNX tensor may keep its bytes in another file: TensorProto.external_data {key "location"}, which ONNX
# Runtime (and TensorRT's parser) open relative to the graph's folder. The graph's own bytes are hashed, so this
# is about a bundle made hostile when it was built or distributed: a location of "/etc/passwd", "../../x" or an
# unlisted file would read data the manifest does not vouch for. (ONNX Runtime 1.32 itself refuses absolute
# locations and any that resolve outside the graph's folder, symlinks included, but not an unlisted file inside
# it; older versions, as on JetPack, and TensorRT's parser check less.) The runtime cannot import onnx, so a
# small reader of the protobuf wire format walks every message that can hold a TensorProto (onnx.proto field
# numbers), skipping all other fields (weights inside the graph) by their length.

# message kind -> {field number: kind of the embedded message}
_TENSOR_HOLDERS: dict[str, dict[int, str]] = {
    "model": {7: "graph", 20: "training_info", 25: "function"},  # ModelProto
    "training_info": {1: "graph", 2: "graph"},  # TrainingInfoProto: initialization, algorithm
    "function": {7: "node", 11: "attribute"},  # FunctionProto
    "graph": {1: "node", 5: "tensor", 15: "sparse_tensor"},  # GraphProto: node, initializer, sparse_initializer
    "node": {5: "attribute"},  # NodeProto
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse_tensor", 23: "sparse_tensor"},
    "sparse_tensor": {1: "tensor", 2: "tensor"},  # SparseTensorProto: values, indices
}  # and TensorProto.external_data = 13: StringStringEntryProto (key = 1, value = 2), read by _entry_values
MAX_GRAPH_NESTING = 32  # graphs in If/Loop/Scan bodies: protobuf's parsers stop at 100 messages deep (3 a level)
ORT_MEMORY_TAG = "_ORT_MEM_ADDR_"  # ONNX Runtime reads a location "*/_ORT_MEM_ADDR_/*" as a memory address


class _Malformed(ValueError):
    pass


def _varint(buf: Any, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise _Malformed(f"a number runs past byte {end}")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise _Malformed(f"a number longer than 10 bytes at byte {pos}")


def _embedded(buf: Any, start: int, end: int) -> list[tuple[int, int, int]]:
    """(field number, start, end) of each length-delimited field of the message in buf[start:end] (one-byte
    numbers, the common case, read inline: a graph has tens of thousands of fields)."""
    fields = []
    pos = start
    while pos < end:
        key = buf[pos]
        if key < 0x80:
            pos += 1
        else:
            key, pos = _varint(buf, pos, end)
        wire = key & 7
        if key >> 3 == 0:
            raise _Malformed(f"field number 0 at byte {pos}")
        if wire == 2:
            if pos < end and buf[pos] < 0x80:
                length, pos = buf[pos], pos + 1
            else:
                length, pos = _varint(buf, pos, end)
            fields.append((key >> 3, pos, pos + length))
            pos += length
        elif wire == 0:
            if pos < end and buf[pos] < 0x80:
                pos += 1
            else:
                _, pos = _varint(buf, pos, end)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:  # 3/4: protobuf groups, which onnx.proto never uses
            raise _Malformed(f"wire type {wire} at byte {pos}")
    if pos > end:
        raise _Malformed(f"a field runs past byte {end}")
    return fields


def _entry_values(buf: Any, start: int, end: int) -> list[bytes]:
    """The values of a StringStringEntryProto in buf[start:end] if a key of it is "location", else []."""
    is_location, values = False, []
    for field, begin, stop in _embedded(buf, start, end):
        if field == 1:
            is_location = is_location or buf[begin:stop] == b"location"
        elif field == 2:
            values.append(bytes(buf[begin:stop]))
    return values if is_location else []


def _locations(buf: Any, size: int) -> list[bytes]:
    """Every value of an external_data entry keyed "location" in the serialized ModelProto buf[:size] (each
    occurrence of a field is walked: protobuf merges repeated occurrences of a message field)."""
    found: list[bytes] = []
    stack = [("model", 0, size, 0)]  # (kind, start, end, graph nesting)
    while stack:
        kind, start, end, depth = stack.pop()
        if kind == "tensor":
            for field, begin, stop in _embedded(buf, start, end):
                if field == 13:
                    found += _entry_values(buf, begin, stop)
            continue
        depth += kind == "graph"
        if depth > MAX_GRAPH_NESTING:
            raise _Malformed(f"graphs nested more than {MAX_GRAPH_NESTING} deep")
        holders = _TENSOR_HOLDERS[kind]
        stack += [(holders[f], begin, stop, depth) for f, begin, stop in _embedded(buf, start, end) if f in holders]
    return found


def external_data_locations(graph: Path, what: str) -> list[str]:
    """The external-data locations written inside ONNX file `graph` (memory-mapped: weights stored inside the graph
    are skipped, not read). BundleError naming `what` if it cannot be read or is not a valid ONNX protobuf."""
    try:
        with open(graph, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size == 0:
                return []
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped, memoryview(mapped) as buf:
                values = _locations(buf, size)  # a memoryview indexes twice as fast as the mmap
    except OSError as exc:
        raise BundleError(f"could not load the {what} {graph}: it cannot be read ({exc}); the bundle is corrupt: "
                          f"rebuild it.") from exc
    except _Malformed as exc:
        raise BundleError(f"could not load the {what} {graph}: it is not a valid ONNX protobuf ({exc}); the bundle "
                          f"is corrupt: rebuild it.") from None
    try:
        return [value.decode("utf-8") for value in values]
    except UnicodeDecodeError:
        raise BundleError(f"could not load the {what} {graph}: an external-data location is not UTF-8 text; the "
                          f"bundle is corrupt: rebuild it.") from None


def _location_problem(manifest: Manifest, graph_path: str, location: str) -> str | None:
    """Why `location` (written in the graph at bundle path `graph_path`) may not be read, or None."""
    if ORT_MEMORY_TAG in location:
        return "is ONNX Runtime's tag for reading process memory"
    if location.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", location):
        return "is an absolute path"
    if not _relpath_pattern().search(location):
        return "is not a plain relative path ('..', '.', '\\', ':' or control characters)"
    relative = posixpath.join(posixpath.dirname(graph_path), location)
    if relative not in manifest.files:
        return (f"names '{relative}', which the manifest's 'files' table does not list (so nothing checks its "
                f"size and sha256)")
    return None


def check_external_data(manifest: Manifest, only: set[str] | None = None) -> None:
    """Refuse an ONNX graph of the bundle (those in `only`, if given) whose tensors read external data from anywhere
    but a file the manifest lists (hashed by verify_files) inside the bundle folder. Runs before any session."""
    models = [m for m in (manifest.target, manifest.draft, manifest.head) if m is not None]
    for model in models:
        graph_path = model.onnx_path
        if graph_path is None or (only is not None and graph_path not in only):
            continue
        what = f"{model.role} ONNX graph"
        for location in dict.fromkeys(external_data_locations(manifest.file(graph_path), what)):
            problem = _location_problem(manifest, graph_path, location)
            if problem:
                raise BundleError(f"the {what} '{graph_path}' reads tensor data from {_short(location, 120)}, "
                                  f"which {problem}. A bundle's graphs may only read weights from files inside the "
                                  f"bundle that its manifest lists and hashes: the bundle is corrupt or was tampered "
                                  f"with. Rebuild it, or get it again from a source you trust.")
            manifest.file(posixpath.join(posixpath.dirname(graph_path), location))  # inside the folder, symlinks too


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def read_manifest(bundle_dir: Path | str) -> Manifest:
    """Read and validate `bundle_dir/manifest.json` (no file hashing; see verify_files)."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise BundleError(f"bundle '{bundle_dir}' does not exist. Build one with `spectrt build` (see README).")
    path = bundle_dir / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(f"'{bundle_dir}' has no {MANIFEST_NAME}; it is not a spectrt bundle (or its build did not finish).")
    path = confined_path(bundle_dir, MANIFEST_NAME)
    try:
        size = path.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise BundleError(f"{path} has {size} bytes, far more than any spectrt manifest; rebuild the bundle.")
        raw = path.read_bytes()
    except OSError as exc:
        raise BundleError(f"{path} cannot be read ({exc}); check its permissions or rebuild the bundle.") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BundleError(f"{path} is not UTF-8 text ({exc}); the manifest is corrupt: rebuild the bundle.") from exc
    try:
        data = json.loads(text, parse_constant=_no_constants)
    except RecursionError:
        raise BundleError(f"{path} is nested too deeply to be a spectrt manifest; rebuild the bundle.") from None
    except ValueError as exc:  # JSONDecodeError, NaN/Infinity, integers beyond Python's digit limit
        raise BundleError(f"{path} is not valid JSON ({exc}); rebuild the bundle.") from exc
    if not isinstance(data, dict):
        raise BundleError(f"{path} does not hold a JSON object; rebuild the bundle.")
    return parse_manifest(bundle_dir, data)
