"""Fuzzing the bundle loader: whatever a manifest or a bundle file holds, loading either succeeds or raises
BundleError, never a raw ValueError/KeyError/TypeError/OSError (or a crash)."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spectrt.errors import BundleError
from spectrt.runtime.generator import Generator
from spectrt.runtime.manifest import read_manifest, verify_files

# CI sizes (about 10 s together); raise them for a longer local run, e.g. SPECTRT_FUZZ_SCALE=20
SCALE = float(os.environ.get("SPECTRT_FUZZ_SCALE", "1"))
MANIFEST_EXAMPLES = int(400 * SCALE)
DISK_EXAMPLES = int(150 * SCALE)
FUZZ = dict(deadline=None, database=None, derandomize=False, print_blob=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])

TRAVERSALS = ["../{}", "../../{}", "/{}", "/etc/passwd", "sub/../../{}", "{}/..", "./{}", "..\\{}", "C:/{}", "C:{}",
              "{}//", "", "..", "{}\n", "%2e%2e/{}", "sub/{}"]
SCALARS = st.one_of(
    st.none(), st.booleans(),
    st.sampled_from([0, -1, 1, 2, 3, 300, 2**31, 2**63, -(2**63), 10**30, 10**400]),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", "../x", "/etc/passwd", "..", "C:\\x", "target.onnx", "tokenizer.json", "fp16", "seq_len",
                     "\x00", "a" * 64, "\ud800"]),
    st.text(max_size=12),
)
JSON_VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                           max_leaves=8)


@pytest.fixture()
def bundle_copy(tiny_bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    return copy


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path into the manifest (list items beyond the 3rd are skipped: long lists are repetitive)."""
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            out += _paths(item, prefix + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value[:3]):
            out += _paths(item, prefix + (index,))
    return out


def _get(value: Any, path: tuple) -> Any:
    for part in path:
        value = value[part]
    return value


def _path_fields(manifest: dict) -> list[tuple]:
    fields = [("tokenizer", "file")]
    for role, entry in manifest["models"].items():
        for backend, facts in entry["backends"].items():
            fields += [("models", role, "backends", backend, key) for key in ("path", "data") if key in facts]
    return fields


def _json_type(value: Any) -> str:
    return {bool: "boolean", int: "number", float: "number", type(None): "null"}.get(type(value), type(value).__name__)


def _load_and_verify(bundle: Path) -> None:
    manifest = read_manifest(bundle)
    verify_files(manifest)


def test_manifest_mutations(bundle_copy):
    original_text = (bundle_copy / "manifest.json").read_text()
    original = json.loads(original_text)
    paths = _paths(original)
    path_fields = _path_fields(original)
    seen: Counter[str] = Counter()

    @settings(max_examples=MANIFEST_EXAMPLES, **FUZZ)
    @given(data=st.data())
    def run(data):
        kind = data.draw(st.sampled_from(["drop", "replace", "replace", "rename_key", "truncate", "traverse"]), "kind")
        manifest = json.loads(original_text)
        must_fail = False
        if kind == "drop":
            path = data.draw(st.sampled_from(paths), "path")
            parent = _get(manifest, path[:-1])
            del parent[path[-1]]
        elif kind == "replace":
            path = data.draw(st.sampled_from(paths), "path")
            old = _get(manifest, path)
            value = data.draw(JSON_VALUES.filter(lambda v: _json_type(v) != _json_type(old)), "value")
            _get(manifest, path[:-1])[path[-1]] = value
        elif kind == "rename_key":
            dict_paths = [p for p in paths if isinstance(_get(original, p[:-1]), dict)]
            path = data.draw(st.sampled_from(dict_paths), "path")
            new_key = data.draw(st.one_of(st.text(max_size=10), st.sampled_from(TRAVERSALS).map(
                lambda t: t.format(path[-1]))), "key")
            parent = _get(manifest, path[:-1])
            parent[new_key] = parent.pop(path[-1])
        elif kind == "traverse":  # into every path field (and the files table keys) at once
            template = data.draw(st.sampled_from([t for t in TRAVERSALS if t != "sub/{}"]), "template")
            for path in path_fields:
                parent = _get(manifest, path[:-1])
                parent[path[-1]] = template.format(parent[path[-1]])
            manifest["files"] = {template.format(name): facts for name, facts in manifest["files"].items()}
            must_fail = True
        text = json.dumps(manifest)
        if kind == "truncate":
            offset = data.draw(st.integers(0, len(original_text) - 1), "offset")
            text = original_text[:offset]
            must_fail = True
        (bundle_copy / "manifest.json").write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            _load_and_verify(bundle_copy)
        except BundleError:
            seen[f"{kind}: BundleError"] += 1
            return
        assert not must_fail, f"{kind} was accepted: {text[:300]}"
        seen[f"{kind}: accepted"] += 1

    run()
    print(f"\nmanifest mutations: {sum(seen.values())} examples, {dict(sorted(seen.items()))}")
    assert sum(seen.values()) >= min(300, MANIFEST_EXAMPLES)
    assert all(seen[f"{kind}: BundleError"] for kind in ("drop", "replace", "rename_key", "truncate", "traverse"))


BUNDLE_FILES = ["manifest.json", "tokenizer.json", "target.onnx", "target.onnx.data", "draft.onnx"]


def test_bundle_file_mutations(bundle_copy, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    originals = {}
    for name in BUNDLE_FILES:
        path = bundle_copy / name
        stat = path.stat()
        originals[name] = (path.read_bytes(), stat.st_atime_ns, stat.st_mtime_ns)
        shutil.copy(path, outside / name)  # identical copies: a symlink to them passes size and hash checks
    Generator(bundle_copy, verify="cached", threads=1)  # record the intact files, so `cached` really skips hashing
    seen: Counter[str] = Counter()

    def restore(name: str) -> None:
        path = bundle_copy / name
        if path.is_symlink() or path.exists():
            path.unlink()
        content, atime, mtime = originals[name]
        path.write_bytes(content)
        os.utime(path, ns=(atime, mtime))  # as recorded: the verified-files cache still knows it

    @settings(max_examples=DISK_EXAMPLES, **FUZZ)
    @given(data=st.data())
    def run(data):
        name = data.draw(st.sampled_from(BUNDLE_FILES), "file")
        kind = data.draw(st.sampled_from(["truncate", "flip", "delete", "symlink_copy", "symlink_system"]), "kind")
        path = bundle_copy / name
        content = originals[name][0]
        if kind == "truncate":
            path.write_bytes(content[: data.draw(st.integers(0, len(content) - 1), "offset")])
        elif kind == "flip":
            raw = bytearray(content)
            offsets = data.draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=4, unique=True), "offsets")
            for offset in offsets:  # distinct offsets, non-zero xor: the file really changes
                raw[offset] ^= data.draw(st.integers(1, 255), "xor")
            path.write_bytes(bytes(raw))
        elif kind == "delete":
            path.unlink()
        else:
            path.unlink()
            path.symlink_to(outside / name if kind == "symlink_copy" else Path("/etc/passwd"))
        try:
            for verify in ("full", "cached"):
                try:
                    Generator(bundle_copy, verify=verify, threads=1)
                except BundleError:
                    seen[f"{kind} {name} {verify}: BundleError"] += 1
                    continue
                # only the manifest (not hashed itself) may change and still describe a valid bundle; every
                # other file is covered by its size and sha256, and symlinks out of the folder are refused
                assert name == "manifest.json" and kind in ("flip", "truncate"), \
                    f"{kind} of {name} accepted with verify={verify}"
                seen[f"{kind} {name} {verify}: accepted"] += 1
        finally:
            restore(name)

    run()
    total = sum(seen.values()) // 2
    print(f"\nbundle file mutations: {total} examples x 2 verify modes, {dict(sorted(seen.items()))}")
    assert total >= min(100, DISK_EXAMPLES)
    Generator(bundle_copy, verify="full", threads=1)  # every file was restored
