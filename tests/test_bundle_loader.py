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


# -- the verified-files record (verify="cached") -----------------------------------------------------


def _rewrite_keeping_size_and_mtime(path: Path, how: str) -> None:
    """Tamper with `path`: one byte changed, same length, its atime/mtime put back (`touch -d`, os.utime)."""
    stat = path.stat()
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    if how == "in place":
        with open(path, "r+b") as handle:
            handle.write(bytes(raw))
    else:  # replaced by a rename, as an editor or a copy tool does
        replacement = path.with_name(path.name + ".new")
        replacement.write_bytes(bytes(raw))
        os.replace(replacement, path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns


@pytest.mark.parametrize("how", ["in place", "replaced"])
def test_cached_verification_rehashes_a_file_rewritten_with_its_old_size_and_mtime(bundle_copy, how):
    """(path, size, mtime) is no proof that a file is unchanged: mtime can be set back. With the real clock."""
    manifest = read_manifest(bundle_copy)
    verify_files(manifest, cache=True)
    _rewrite_keeping_size_and_mtime(bundle_copy / "target.onnx.data", how)
    with pytest.raises(BundleError, match="'target.onnx.data' does not match its sha256"):
        verify_files(manifest, cache=True)
    with pytest.raises(BundleError, match="'target.onnx.data' does not match its sha256"):
        Generator(bundle_copy, verify="cached", threads=1)


def _counting_hashes(monkeypatch) -> list[Path]:
    import spectrt.runtime.manifest as manifest_module

    hashed: list[Path] = []
    real = manifest_module.sha256_file

    def counting(path, *args, **kwargs):
        hashed.append(Path(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(manifest_module, "sha256_file", counting)
    return hashed


def test_cached_verification_skips_only_untouched_files(bundle_copy, monkeypatch):
    """An untouched file is hashed once; a file replaced with its old size and mtime is hashed again and refused.
    The injected clock says the fresh copies settled long ago, so the first pass records them."""
    import spectrt.runtime.manifest as manifest_module

    monkeypatch.setattr(manifest_module, "clock_ns", lambda: 2**62)
    hashed = _counting_hashes(monkeypatch)
    manifest = read_manifest(bundle_copy)
    verify_files(manifest, cache=True)
    assert len(hashed) == len(manifest.files)
    hashed.clear()
    verify_files(manifest, cache=True)
    assert hashed == []
    _rewrite_keeping_size_and_mtime(bundle_copy / "target.onnx.data", "replaced")  # a new inode and ctime
    with pytest.raises(BundleError, match="'target.onnx.data' does not match its sha256"):
        verify_files(manifest, cache=True)
    assert hashed == [(bundle_copy / "target.onnx.data").resolve()]


def test_a_file_changed_within_the_clock_tick_of_its_hash_is_not_recorded(bundle_copy, monkeypatch):
    """Timestamps tick coarsely, so a write just after hashing could keep the ctime: a file whose ctime is within
    SETTLE_NS of the clock is hashed again next time rather than recorded."""
    import spectrt.runtime.manifest as manifest_module

    hashed = _counting_hashes(monkeypatch)
    ctime = (bundle_copy / "tokenizer.json").stat().st_ctime_ns
    monkeypatch.setattr(manifest_module, "clock_ns", lambda: ctime + manifest_module.SETTLE_NS // 2)
    manifest = read_manifest(bundle_copy)
    verify_files(manifest, cache=True, only={"tokenizer.json"})
    verify_files(manifest, cache=True, only={"tokenizer.json"})
    assert len(hashed) == 2


# -- external data named inside the ONNX graphs -------------------------------------------------------


def _point_first_initializer_at(bundle: Path, location: str) -> str:
    """Rewrite target.onnx (with onnx) so its first external initializer reads from `location`, and record the new
    graph's size and sha256 in the manifest: a bundle made hostile when it was built. Returns the tensor's name."""
    import onnx

    from spectrt.runtime.manifest import file_facts

    graph = bundle / "target.onnx"
    model = onnx.load(str(graph), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    next(e for e in tensor.external_data if e.key == "location").value = location
    onnx.save(model, str(graph))
    manifest = _manifest(bundle)
    manifest["files"]["target.onnx"] = file_facts(graph)
    _write(bundle, manifest)
    return tensor.name


@pytest.mark.parametrize("location,problem", [
    ("/etc/passwd", "is an absolute path"),
    ("{outside}", "is an absolute path"),
    ("../outside/target.onnx.data", r"is not a plain relative path \('\.\.'"),
    ("sub/../target.onnx.data", r"is not a plain relative path"),
    ("extra.data", "names 'extra.data', which the manifest's 'files' table does not list"),
    ("*/_ORT_MEM_ADDR_/*", "is ONNX Runtime's tag for reading process memory"),
])
@pytest.mark.parametrize("verify", ["full", "cached", "none"])
def test_graph_reading_external_data_from_elsewhere_is_refused(bundle_copy, tmp_path, location, problem, verify):
    """Byte-identical copies of the weights outside the folder, or unlisted inside it: the hash of the graph
    itself passes, so the locations written inside it must be checked, before any session is created."""
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(bundle_copy / "target.onnx.data", outside / "target.onnx.data")
    shutil.copy(bundle_copy / "target.onnx.data", bundle_copy / "extra.data")
    location = location.format(outside=outside / "target.onnx.data")
    _point_first_initializer_at(bundle_copy, location)
    with pytest.raises(BundleError, match=f"the target ONNX graph 'target.onnx' reads tensor data from .*which "
                                          f"{problem}.*tampered with"):
        Generator(bundle_copy, verify=verify, threads=1)


def test_graph_reading_another_listed_file_loads(bundle_copy):
    """A location may name any file the manifest lists (its hash is verified): here a listed copy of the data."""
    shutil.copy(bundle_copy / "target.onnx.data", bundle_copy / "weights.bin")
    from spectrt.runtime.manifest import file_facts

    manifest = _manifest(bundle_copy)
    manifest["files"]["weights.bin"] = file_facts(bundle_copy / "weights.bin")
    _write(bundle_copy, manifest)
    _point_first_initializer_at(bundle_copy, "weights.bin")
    Generator(bundle_copy, verify="full", threads=1)


def test_built_bundle_graphs_read_only_their_listed_data(tiny_bundle):
    from spectrt.runtime.manifest import check_external_data, external_data_locations

    assert set(external_data_locations(tiny_bundle / "target.onnx", "target graph")) == {"target.onnx.data"}
    assert set(external_data_locations(tiny_bundle / "draft.onnx", "draft graph")) == {"draft.onnx.data"}
    check_external_data(read_manifest(tiny_bundle))


def _external(name: str, location: str):
    import onnx

    tensor = onnx.TensorProto(name=name, dims=[4], data_type=onnx.TensorProto.FLOAT,
                              data_location=onnx.TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        tensor.external_data.add(key=key, value=value)
    return tensor


def test_locations_are_found_in_attributes_subgraphs_functions_and_sparse_tensors(tmp_path):
    """Every message of onnx.proto that can hold a TensorProto is walked, however the graph nests it."""
    import onnx
    from onnx import TensorProto, helper

    from spectrt.runtime.manifest import external_data_locations

    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    branch = helper.make_graph([helper.make_node("Identity", ["w_if"], ["y_if"])], "branch", [],
                               [helper.make_tensor_value_info("y_if", TensorProto.FLOAT, [4])],
                               [_external("w_if", "in_subgraph.bin")])
    nodes = [helper.make_node("Constant", [], ["c"], value=_external("c", "in_attribute.bin")),
             helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch)]
    sparse = onnx.SparseTensorProto(values=_external("s", "in_sparse.bin"), dims=[8])
    sparse.indices.CopyFrom(helper.make_tensor("s_idx", TensorProto.INT64, [4], [0, 1, 2, 3]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])], [y],
                              [_external("w", "in_initializer.bin")], sparse_initializer=[sparse])
    function = onnx.FunctionProto(name="f", domain="custom", node=[
        helper.make_node("Constant", [], ["k"], value=_external("k", "in_function.bin"))])
    model = helper.make_model(graph, functions=[function])
    path = tmp_path / "nested.onnx"
    path.write_bytes(model.SerializeToString())
    assert sorted(set(external_data_locations(path, "graph"))) == sorted(
        ["in_subgraph.bin", "in_attribute.bin", "in_sparse.bin", "in_initializer.bin", "in_function.bin"])


def test_unreadable_protobuf_is_a_bundle_error(tmp_path):
    from spectrt.runtime.manifest import external_data_locations

    for name, content in (("groups", b"\x0b\x0c"), ("too_long", b"\x3a\x7f\x00"), ("varint", b"\x08" + b"\xff" * 11),
                          ("field0", b"\x02\x00")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(BundleError, match=f"could not load the draft graph .*{name}: it is not a valid ONNX "
                                              f"protobuf .*rebuild it"):
            external_data_locations(tmp_path / name, "draft graph")
    (tmp_path / "empty.onnx").write_bytes(b"")
    assert external_data_locations(tmp_path / "empty.onnx", "graph") == []


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (numbers < 128 fit one byte each)."""
    length = len(payload)
    size = bytearray()
    while True:
        size.append((length & 0x7F) | (0x80 if length > 0x7F else 0))
        length >>= 7
        if not length:
            break
    return bytes([number << 3 | 2]) + bytes(size) + payload


def test_deeply_nested_subgraphs_are_refused_not_a_recursion_error(tmp_path):
    """Written by hand: protobuf libraries refuse to build messages this deep (ONNX Runtime could not parse them)."""
    from spectrt.runtime.manifest import MAX_GRAPH_NESTING, external_data_locations

    def nested(levels: int) -> bytes:
        graph = b""
        for _ in range(levels):  # GraphProto.node (1) -> NodeProto.attribute (5) -> AttributeProto.g (6)
            graph = _field(1, _field(5, _field(6, graph)))
        return _field(7, graph)  # ModelProto.graph

    (tmp_path / "deepest.onnx").write_bytes(nested(MAX_GRAPH_NESTING - 1))
    assert external_data_locations(tmp_path / "deepest.onnx", "graph") == []
    (tmp_path / "deeper.onnx").write_bytes(nested(MAX_GRAPH_NESTING))
    with pytest.raises(BundleError, match=f"graphs nested more than {MAX_GRAPH_NESTING} deep"):
        external_data_locations(tmp_path / "deeper.onnx", "graph")


def test_location_check_reads_every_tensor_of_a_large_graph(tmp_path):
    """20,000 external initializers and 20,000 nodes (10x a 1.5B model's): every location is found (the read took
    about 0.3 s on a busy 2-core CPU, onnx's C++ parser about 0.05 s; measured, not asserted)."""
    from onnx import TensorProto, helper

    from spectrt.runtime.manifest import external_data_locations

    count = 20000
    tensors = [_external(f"w{i}", "weights.bin") for i in range(count)]
    nodes = [helper.make_node("Add", [f"x{i}", f"w{i}"], [f"x{i + 1}"], name=f"add{i}") for i in range(count)]
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x0", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info(f"x{count}", TensorProto.FLOAT, [4])], tensors)
    path = tmp_path / "big.onnx"
    path.write_bytes(helper.make_model(graph).SerializeToString())
    locations = external_data_locations(path, "graph")
    assert len(locations) == count and set(locations) == {"weights.bin"}
