"""The bundle loader's trust boundary: one rule per test (schema, confinement, hashed table, graph I/O)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from spectrt.errors import BundleError
from spectrt.runtime.generator import Generator
from spectrt.runtime.manifest import (SCHEMA_FILE, confined_path, field_path, manifest_schema, parse_manifest,
                                      read_manifest, verify_files)


@pytest.fixture()
def bundle_copy(tiny_bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    return copy


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def _write(bundle: Path, manifest: dict) -> None:
    (bundle / "manifest.json").write_text(json.dumps(manifest))


# -- the schema -------------------------------------------------------------------------------------


def test_schema_is_valid_draft_2020_12_and_accepts_a_built_manifest(tiny_bundle):
    from jsonschema import Draft202012Validator

    schema = manifest_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(schema)
    manifest = _manifest(tiny_bundle)
    assert list(Draft202012Validator(schema).iter_errors(manifest)) == []
    loaded = read_manifest(tiny_bundle)
    verify_files(loaded)
    assert loaded.target.onnx_data == "target.onnx.data" and loaded.draft.onnx_data == "draft.onnx.data"
    assert set(loaded.used_files()) == {"tokenizer.json", "target.onnx", "target.onnx.data", "draft.onnx",
                                        "draft.onnx.data"}
    assert SCHEMA_FILE.name == "manifest.schema.json"


def test_schema_version_is_checked_first(tmp_path):
    with pytest.raises(BundleError, match="schema version 99.*reads version 1.*Rebuild"):
        parse_manifest(tmp_path, {"schema_version": 99})
    with pytest.raises(BundleError, match="schema version true"):
        parse_manifest(tmp_path, {"schema_version": True})


def test_forward_compatible_extra_info_is_accepted(bundle_copy):
    manifest = _manifest(bundle_copy)
    manifest["provenance"]["new_tool"] = {"anything": [1, 2, {"x": None}]}
    manifest["build"]["some_future_option"] = 3
    manifest["models"]["target"]["validation"]["extra_metric"] = 0.5
    manifest["models"]["target"]["arch"]["new_arch_number"] = 7
    manifest["some_future_section"] = {"a": 1}
    _write(bundle_copy, manifest)
    read_manifest(bundle_copy)


@pytest.mark.parametrize("mutate,field,problem", [
    (lambda m: m["models"]["draft"]["arch"].__setitem__("head_dim", "16"), "models.draft.arch.head_dim",
     "wrong type"),
    (lambda m: m["models"]["target"]["arch"].__setitem__("num_layers", 0), "models.target.arch.num_layers",
     "less than the minimum of 1"),
    (lambda m: m["models"]["target"].__setitem__("widths", [2, 2]), "models.target.widths", "non-unique"),
    (lambda m: m["models"]["target"].__setitem__("widths", [0, 2]), "models.target.widths[0]", "minimum"),
    (lambda m: m["models"]["target"].__setitem__("max_context", 1), "models.target.max_context", "minimum of 2"),
    (lambda m: m["models"]["target"].__setitem__("max_context", 128.0), "models.target.max_context", "wrong type"),
    (lambda m: m["models"]["target"].__setitem__("precision", "fp64"), "models.target.precision", "fp32"),
    (lambda m: m["models"]["target"]["graph"]["inputs"][2].__setitem__("dtype", "bf16"),
     "models.target.graph.inputs[2].dtype", "bf16"),
    (lambda m: m["files"]["tokenizer.json"].__setitem__("sha256", "ABC"), 'files["tokenizer.json"].sha256',
     "64 lowercase hex"),
    (lambda m: m["files"]["tokenizer.json"].__setitem__("size", -1), 'files["tokenizer.json"].size', "minimum"),
    (lambda m: m["generation"].__setitem__("eos_token_ids", "2"), "generation.eos_token_ids", "wrong type"),
    (lambda m: m["models"]["target"].__setitem__("backends", {}), "models.target.backends", "at least one of"),
    (lambda m: m["models"]["target"].pop("graph"), "models.target.graph", "missing"),
])
def test_wrong_nested_field_names_the_field(bundle_copy, mutate, field, problem):
    manifest = _manifest(bundle_copy)
    mutate(manifest)
    _write(bundle_copy, manifest)
    with pytest.raises(BundleError) as info:
        Generator(bundle_copy, verify="none")
    message = str(info.value)
    assert f"'{field}'" in message and problem in message and "rebuild" in message.lower(), message


def test_field_path_format():
    assert field_path(["models", "target", "arch", "num_layers"]) == "models.target.arch.num_layers"
    assert field_path(["models", "target", "graph", "inputs", 3, "dtype"]) == "models.target.graph.inputs[3].dtype"
    assert field_path(["files", "target.onnx", "size"]) == 'files["target.onnx"].size'
    assert field_path([]) == "(top level)"


# -- paths: confinement -----------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["../tokenizer.json", "../../etc/passwd", "a/../../x", "sub/..", "./tokenizer.json",
                                 "a//b", "a/", "..\\x", "C:/x", "C:x", "tokenizer.json\n", "a\x00b", ""])
def test_manifest_file_refuses_paths_outside(bundle_copy, bad):
    manifest = read_manifest(bundle_copy)
    with pytest.raises(BundleError, match="relative path inside the bundle"):
        manifest.file(bad)


def test_unencodable_path_is_a_bundle_error(bundle_copy):
    manifest = _manifest(bundle_copy)
    manifest["tokenizer"]["file"] = "tok\ud800.json"  # a lone surrogate: no filesystem name
    manifest["files"]["tok\ud800.json"] = manifest["files"].pop("tokenizer.json")
    _write(bundle_copy, manifest)
    with pytest.raises(BundleError, match="cannot be resolved"):
        Generator(bundle_copy, verify="full")
    with pytest.raises(BundleError, match="cannot be resolved"):
        Generator(bundle_copy, verify="none")


def test_absolute_path_refused(bundle_copy, tmp_path):
    outside = tmp_path / "evil.onnx"
    shutil.copy(bundle_copy / "target.onnx", outside)
    manifest = _manifest(bundle_copy)
    manifest["models"]["target"]["backends"]["onnx"]["path"] = str(outside)
    manifest["files"][str(outside)] = manifest["files"].pop("target.onnx")
    _write(bundle_copy, manifest)
    with pytest.raises(BundleError, match=r"models\.target\.backends\.onnx\.path' is invalid.*relative POSIX path"):
        Generator(bundle_copy, verify="none")
    with pytest.raises(BundleError):
        read_manifest(bundle_copy)
    with pytest.raises(BundleError, match="relative path inside the bundle"):
        confined_path(bundle_copy, str(outside))


def test_dotdot_path_refused(bundle_copy):
    manifest = _manifest(bundle_copy)
    manifest["tokenizer"]["file"] = "../bundle/tokenizer.json"  # would even point at the same file
    _write(bundle_copy, manifest)
    with pytest.raises(BundleError, match=r"'tokenizer\.file' is invalid.*relative POSIX path"):
        Generator(bundle_copy, verify="none")
    manifest["tokenizer"]["file"] = "tokenizer.json"
    manifest["files"]["../secret"] = {"size": 1, "sha256": "0" * 64}
    _write(bundle_copy, manifest)
    with pytest.raises(BundleError, match=r"field 'files' has an invalid key.*\"\.\./secret\""):
        read_manifest(bundle_copy)


@pytest.mark.parametrize("name", ["target.onnx.data", "tokenizer.json", "draft.onnx"])
@pytest.mark.parametrize("verify", ["full", "cached", "none"])
def test_symlink_escaping_the_folder(bundle_copy, tmp_path, name, verify):
    """An identical copy outside the folder passes the size and hash checks: confinement must refuse it."""
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(bundle_copy / name, outside / name)
    (bundle_copy / name).unlink()
    (bundle_copy / name).symlink_to(outside / name)
    with pytest.raises(BundleError, match=f"'{name}' resolves to .*outside the bundle folder"):
        Generator(bundle_copy, verify=verify, threads=1)


def test_symlinked_manifest_outside_refused(bundle_copy, tmp_path):
    outside = tmp_path / "manifest.json"
    shutil.copy(bundle_copy / "manifest.json", outside)
    (bundle_copy / "manifest.json").unlink()
    (bundle_copy / "manifest.json").symlink_to(outside)
    with pytest.raises(BundleError, match="'manifest.json' resolves to .*outside the bundle folder"):
        read_manifest(bundle_copy)


def test_symlink_inside_the_folder_is_fine(bundle_copy):
    (bundle_copy / "weights").mkdir()
    (bundle_copy / "target.onnx.data").rename(bundle_copy / "weights" / "target.onnx.data")
    (bundle_copy / "target.onnx.data").symlink_to(Path("weights") / "target.onnx.data")
    generator = Generator(bundle_copy, verify="full", threads=1)
    assert generator.manifest.file("target.onnx.data") == (bundle_copy / "weights" / "target.onnx.data").resolve()
    assert len(generator.generate(prompt_ids=[1, 2, 3], max_new_tokens=3, draft="none").token_ids) >= 1


def test_bundle_folder_itself_may_be_a_symlink(bundle_copy, tmp_path):
    link = tmp_path / "link-to-bundle"
    link.symlink_to(bundle_copy)
    Generator(link, verify="full", threads=1)


def test_symlink_loop_is_a_bundle_error(bundle_copy):
    (bundle_copy / "tokenizer.json").unlink()
    (bundle_copy / "tokenizer.json").symlink_to("loop-b")
    (bundle_copy / "loop-b").symlink_to("tokenizer.json")
    with pytest.raises(BundleError, match="tokenizer.json"):
        Generator(bundle_copy, verify="full")


# -- the hashed table ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tokenizer.json", "target.onnx", "target.onnx.data", "draft.onnx.data"])
def test_file_used_but_missing_from_the_table(bundle_copy, name):
    manifest = _manifest(bundle_copy)
    del manifest["files"][name]
    _write(bundle_copy, manifest)
    with pytest.raises(BundleError, match=f"{name} are used by the runtime but missing from the manifest's 'files' "
                                          f"table: every file the runtime loads must be in the hashed table"):
        read_manifest(bundle_copy)


def test_tensorrt_plan_must_be_in_the_table(bundle_copy):
    manifest = _manifest(bundle_copy)
    manifest["models"]["target"]["backends"]["tensorrt"] = {"path": "target.engine", "module": "tensorrt",
                                                            "version": "10.3", "profiles": []}
    _write(bundle_copy, manifest)
    with pytest.raises(BundleError, match="target.engine are used by the runtime but missing"):
        read_manifest(bundle_copy)


def test_verify_files_checks_every_listed_file(bundle_copy):
    data = bundle_copy / "target.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0x01
    data.write_bytes(bytes(raw))
    manifest = read_manifest(bundle_copy)
    verify_files(manifest, check_hashes=False)  # same size
    with pytest.raises(BundleError, match="'target.onnx.data' does not match its sha256"):
        verify_files(manifest)


# -- semantic rules ---------------------------------------------------------------------------------


def test_num_layers_inconsistent_with_declared_graph(bundle_copy):
    manifest = _manifest(bundle_copy)
    manifest["models"]["target"]["arch"]["num_layers"] = 4
    _write(bundle_copy, manifest)
    with pytest.raises(BundleError, match=r"target graph I/O in the manifest .*num_layers 4.*missing past_key_3"):
        read_manifest(bundle_copy)


def _drop_last_layer(entry: dict) -> None:
    layers = entry["arch"]["num_layers"] - 1
    entry["arch"]["num_layers"] = layers
    graph = entry["graph"]
    graph["inputs"] = [t for t in graph["inputs"] if not t["name"].endswith(f"_{layers}")]
    graph["outputs"] = [t for t in graph["outputs"] if not t["name"].endswith(f"_{layers}")]


def _set_kv_heads(entry: dict, heads: int) -> None:
    entry["arch"]["num_kv_heads"] = heads
    for tensor in entry["graph"]["inputs"] + entry["graph"]["outputs"]:
        if tensor["name"] not in ("input_ids", "logits"):
            tensor["shape"][2] = heads


def _set_vocab(manifest: dict, vocab: int) -> None:
    manifest["tokenizer"]["size"] = vocab
    for entry in manifest["models"].values():
        entry["logits_vocab"] = vocab
        entry["graph"]["outputs"][0]["shape"][2] = vocab


def _set_target_vocab(manifest: dict, vocab: int) -> None:
    manifest["tokenizer"]["size"] = vocab
    manifest["models"]["target"]["logits_vocab"] = vocab
    manifest["models"]["target"]["graph"]["outputs"][0]["shape"][2] = vocab


def _set_precision(entry: dict, precision: str) -> None:
    entry["precision"] = precision
    for tensor in entry["graph"]["inputs"] + entry["graph"]["outputs"]:
        if tensor["name"] not in ("input_ids", "logits"):
            tensor["dtype"] = precision


@pytest.mark.parametrize("lie,expected", [
    (lambda m: _drop_last_layer(m["models"]["target"]), r"target ONNX graph target\.onnx does not match the manifest: "
                                                         r"its inputs differ.*unexpected past_key_2"),
    (lambda m: _set_kv_heads(m["models"]["draft"], 2), r"draft ONNX graph draft\.onnx does not match.*past_key_0.*shape"),
    (lambda m: _set_vocab(m, 299), r"target ONNX graph .*output 'logits' has shape \[1, '\?', 300\], expected "
                                   r"\[1, '\?', 299\]"),
    (lambda m: _set_precision(m["models"]["target"], "fp16"), r"target ONNX graph.*dtype tensor\(float\), "
                                                              r"expected tensor\(float16\)"),
])
def test_consistent_manifest_that_lies_about_the_graph_fails_at_load(bundle_copy, lie, expected):
    manifest = _manifest(bundle_copy)
    lie(manifest)
    _write(bundle_copy, manifest)
    read_manifest(bundle_copy)  # the manifest alone is self-consistent
    with pytest.raises(BundleError, match=expected):
        Generator(bundle_copy, verify="full", threads=1)


@pytest.mark.parametrize("mutate,expected", [
    (lambda m: m["models"]["draft"].__setitem__("logits_vocab", 301), "does not fit its architecture"),
    (lambda m: _set_target_vocab(m, 299), "different widths"),
    (lambda m: m["tokenizer"].__setitem__("size", 301), "tokenizer produces 301 ids"),
    (lambda m: m["models"]["target"].__setitem__("role", "draft"), "says 'draft' under models.target"),
    (lambda m: m["models"]["target"].__setitem__("widths", [1, 127]), "too small for its width 127"),
    (lambda m: m["models"]["target"].__setitem__("widths", [1, 9]), "logits for 6 positions per call but verifying "
                                                                     "width 9 needs 10"),
    (lambda m: m["models"]["draft"].__setitem__("max_context", 64), "different max_context"),
    (lambda m: [e.__setitem__("max_context", 1024) for e in m["models"].values()], "max_position_embeddings"),
])
def test_cross_field_rules(bundle_copy, mutate, expected):
    manifest = _manifest(bundle_copy)
    mutate(manifest)
    _write(bundle_copy, manifest)
    with pytest.raises(BundleError, match=expected):
        read_manifest(bundle_copy)


def test_bundle_without_draft_is_accepted(bundle_copy):
    manifest = _manifest(bundle_copy)
    del manifest["models"]["draft"]
    _write(bundle_copy, manifest)
    assert Generator(bundle_copy, verify="full", threads=1).draft is None
    manifest["models"]["draft"] = None
    _write(bundle_copy, manifest)
    assert read_manifest(bundle_copy).draft is None


# -- reading and loading failures ---------------------------------------------------------------------


@pytest.mark.parametrize("content,expected", [
    (b"\xff\xfe{}", "not UTF-8"),
    (b"[" * 200_000 + b"]" * 200_000, "nested too deeply"),
    (b'{"schema_version": NaN}', "not valid JSON"),
    (b'{"schema_version": 1' + b"0" * 5000 + b"}", "not valid JSON"),
    (b"\xef\xbb\xbf{}", "not valid JSON"),
    (b"[1, 2]", "does not hold a JSON object"),
    (b"", "not valid JSON"),
])
def test_unreadable_manifest_text(bundle_copy, content, expected):
    (bundle_copy / "manifest.json").write_bytes(content)
    with pytest.raises(BundleError, match=expected):
        read_manifest(bundle_copy)


def test_deeply_nested_values(bundle_copy):
    text = json.dumps(_manifest(bundle_copy))
    deep = "[" * 900 + "]" * 900  # parses (below the json module's limit)
    (bundle_copy / "manifest.json").write_text(text.replace('"provenance": {', '"provenance": {"deep": ' + deep + ", ", 1))
    read_manifest(bundle_copy)  # informational sections are not inspected
    (bundle_copy / "manifest.json").write_text(text.replace('"eos_token_ids": [', '"eos_token_ids": [' + deep + ", ", 1))
    with pytest.raises(BundleError, match="generation.eos_token_ids|nested too deeply"):
        read_manifest(bundle_copy)


def test_unreadable_manifest_file(bundle_copy, monkeypatch):
    """A read error (permissions, I/O) becomes a BundleError; injected so it also fails as root."""
    from pathlib import Path

    real_read_bytes = Path.read_bytes

    def read_bytes(self):
        if self.name == "manifest.json":
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    with pytest.raises(BundleError, match="cannot be read.*Permission denied"):
        read_manifest(bundle_copy)


def test_huge_manifest_refused(bundle_copy, monkeypatch):
    import spectrt.runtime.manifest as manifest_module

    monkeypatch.setattr(manifest_module, "MAX_MANIFEST_BYTES", 100)
    with pytest.raises(BundleError, match="far more than any spectrt manifest"):
        read_manifest(bundle_copy)


def test_truncated_onnx_graph_is_a_bundle_error(bundle_copy):
    graph = bundle_copy / "target.onnx"
    graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])
    with pytest.raises(BundleError, match=r"could not load the target ONNX graph .*target\.onnx: .*the bundle is "
                                          r"corrupt: rebuild it"):
        Generator(bundle_copy, verify="none", threads=1)


def test_missing_external_data_is_a_bundle_error(bundle_copy):
    (bundle_copy / "draft.onnx.data").unlink()
    with pytest.raises(BundleError, match=r"could not load the draft ONNX graph .*draft\.onnx: .*rebuild it"):
        Generator(bundle_copy, verify="none", threads=1)


def test_garbage_onnx_graph_is_a_bundle_error(bundle_copy):
    (bundle_copy / "target.onnx").write_bytes(b"\x08\x07garbage" * 100)
    with pytest.raises(BundleError, match="could not load the target ONNX graph"):
        Generator(bundle_copy, verify="none", threads=1)


def test_tokenizer_that_is_not_json(bundle_copy):
    (bundle_copy / "tokenizer.json").write_bytes(b"\x00\x01 not json")
    with pytest.raises(BundleError, match="tokenizer"):
        Generator(bundle_copy, verify="none", threads=1)


def test_file_that_is_a_directory(bundle_copy):
    (bundle_copy / "draft.onnx").unlink()
    (bundle_copy / "draft.onnx").mkdir()
    with pytest.raises(BundleError, match="'draft.onnx' is missing"):
        Generator(bundle_copy, verify="full")
    with pytest.raises(BundleError, match="could not load the draft ONNX graph"):
        Generator(bundle_copy, verify="none", threads=1)
