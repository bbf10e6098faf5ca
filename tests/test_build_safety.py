"""A build never deletes what it did not create, and replacing a bundle never loses the old one."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
from click.testing import CliRunner

import spectrt.compiler.build as build_module
from spectrt.cli import main
from spectrt.compiler import bundle_io
from spectrt.compiler.build import build_bundle
from spectrt.compiler.bundle_io import check_out_dir, replace_dir_atomically
from spectrt.compiler.config import BuildConfig
from spectrt.compiler.progress import Progress
from spectrt.errors import ConfigError

PROMPT_IDS = [1, 2, 3]


def _build(pair, out: Path, **kwargs):
    target, draft = pair
    config = BuildConfig(target=str(target), draft=str(draft), widths=(1, 2), max_context=64, out=str(out),
                         validate=False)
    return build_bundle(config, progress=Progress(quiet=True), **kwargs)


def _tokens(bundle: Path) -> list[int]:
    from spectrt.runtime.generator import Generator

    return Generator(bundle, verify="full", threads=1).generate(prompt_ids=PROMPT_IDS, max_new_tokens=4).token_ids


def _cli_build(pair, out, *extra: str):
    target, draft = pair
    return CliRunner().invoke(main, ["build", "--target", str(target), "--draft", str(draft), "--out", str(out),
                                     "--widths", "1,2", "--max-context", "64", "--no-validate", *extra])


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".building-" in p.name or ".old-" in p.name)


@pytest.fixture(scope="module")
def built(tiny_llama_pair, tmp_path_factory):
    """One tiny bundle and the tokens it generates; tests work on copies."""
    out = tmp_path_factory.mktemp("safety") / "bundle"
    _build(tiny_llama_pair, out)
    return out, _tokens(out)


@pytest.fixture
def old_bundle(built, tmp_path):
    """A copy of the tiny bundle at tmp_path/b, its manifest bytes and its tokens."""
    out = tmp_path / "b"
    shutil.copytree(built[0], out)
    return out, (out / "manifest.json").read_bytes(), built[1]


def _assert_old_intact(old_bundle):
    out, manifest, tokens = old_bundle
    assert (out / "manifest.json").read_bytes() == manifest
    assert _tokens(out) == tokens
    assert _leftovers(out.parent) == []


# --- the CLI refuses folders it did not build --------------------------------------------------------------

@pytest.mark.parametrize("extra", [(), ("--overwrite",)])
def test_folder_with_unrelated_file_is_refused(tiny_llama_pair, tmp_path, extra):
    (tmp_path / "recipe.toml").write_bytes(b"precious")
    result = _cli_build(tiny_llama_pair, tmp_path, *extra)
    assert result.exit_code == 2, result.output
    assert "'recipe.toml'" in result.output and "choose another --out" in result.output
    assert (tmp_path / "recipe.toml").read_bytes() == b"precious"


def test_current_folder_is_refused(tiny_llama_pair, tmp_path, monkeypatch):
    (tmp_path / "keep.txt").write_bytes(b"mine")
    monkeypatch.chdir(tmp_path)
    for extra in ((), ("--overwrite",)):
        result = _cli_build(tiny_llama_pair, ".", *extra)
        assert result.exit_code == 2 and "current folder" in result.output, result.output
    assert (tmp_path / "keep.txt").read_bytes() == b"mine"
    assert os.listdir(tmp_path) == ["keep.txt"]


def test_existing_bundle_needs_overwrite(tiny_llama_pair, old_bundle):
    out, manifest, tokens = old_bundle
    result = _cli_build(tiny_llama_pair, out)
    assert result.exit_code == 2 and "already holds the bundle 'bundle'" in result.output
    assert "--overwrite" in result.output
    assert (out / "manifest.json").read_bytes() == manifest
    result = _cli_build(tiny_llama_pair, out, "--overwrite")
    assert result.exit_code == 0, result.output
    new_manifest = (out / "manifest.json").read_bytes()
    assert new_manifest != manifest  # a new build: its name and time differ
    files = json.loads(new_manifest)["files"]
    assert sorted(os.listdir(out)) == sorted([*files, "manifest.json"])
    assert _leftovers(out.parent) == []
    assert _tokens(out) == tokens


def test_bundle_with_user_file_is_refused_even_with_overwrite(tiny_llama_pair, old_bundle):
    out, manifest, _ = old_bundle
    (out / "notes.txt").write_text("my notes")
    result = _cli_build(tiny_llama_pair, out, "--overwrite")
    assert result.exit_code == 2 and "'notes.txt'" in result.output, result.output
    assert (out / "notes.txt").read_text() == "my notes"
    assert (out / "manifest.json").read_bytes() == manifest


def test_build_engine_has_overwrite():
    from spectrt.cli import build_engine_command

    result = CliRunner().invoke(build_engine_command, ["--help"])
    assert "--overwrite" in result.output


# --- check_out_dir ------------------------------------------------------------------------------------------

def _fake_bundle(folder: Path, files=("a.onnx",), name="x") -> Path:
    folder.mkdir()
    for file in files:
        (folder / file).write_text("w")
    (folder / "manifest.json").write_text(json.dumps({"name": name, "files": {f: {} for f in files}}))
    return folder


def test_check_out_dir_allows_missing_empty_and_bundles(tmp_path):
    check_out_dir(tmp_path / "missing", overwrite=False)
    (tmp_path / "empty").mkdir()
    check_out_dir(tmp_path / "empty", overwrite=False)
    bundle = _fake_bundle(tmp_path / "b")
    with pytest.raises(ConfigError, match="already holds the bundle 'x'; pass --overwrite"):
        check_out_dir(bundle, overwrite=False)
    check_out_dir(bundle, overwrite=True)


@pytest.mark.parametrize("make,message", [
    (lambda p: p.write_text("x"), "is a file"),
    (lambda p: p.symlink_to(p.parent), "symbolic link"),
    (lambda p: p.symlink_to(p.parent / "nowhere"), "symbolic link"),
    (lambda p: (p.mkdir(), (p / "manifest.json").write_text("{not json")), "not a spectrt bundle.*'manifest.json'"),
    (lambda p: (p.mkdir(), (p / "manifest.json").write_text("[]")), "not a spectrt bundle"),
    (lambda p: (p.mkdir(), *((p / f"f{i}").touch() for i in range(5))), "'f0', 'f1', 'f2' and 2 more"),
    (lambda p: (_fake_bundle(p), (p / "sub").mkdir()), "plus entries that are not its files: 'sub'"),
    (lambda p: (_fake_bundle(p, files=("a.onnx",)), (p / "a.onnx").unlink(), (p / "a.onnx").mkdir()), "'a.onnx'"),
])
def test_check_out_dir_refuses_others_even_with_overwrite(tmp_path, make, message):
    out = tmp_path / "out"
    make(out)
    with pytest.raises(ConfigError, match=message):
        check_out_dir(out, overwrite=True)


def test_check_out_dir_refuses_protected_folders(tmp_path, monkeypatch):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    for out, what in ((".", "current folder"), (str(work), "current folder"), ("..", "ancestor"),
                      (str(tmp_path), "ancestor"), ("/", "filesystem root"), (str(tmp_path / "home"), "home"),
                      ("x/..", "current folder"), ("sub/x/..", "does not name")):
        with pytest.raises(ConfigError, match=what):
            check_out_dir(Path(out), overwrite=True)


# --- interrupted or failed rebuilds keep the old bundle ------------------------------------------------------

@pytest.mark.parametrize("step", ["save_tokenizer", "file_table"])
def test_interrupted_rebuild_keeps_old_bundle(tiny_llama_pair, old_bundle, monkeypatch, step):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(build_module, step, interrupt)
    with pytest.raises(KeyboardInterrupt):
        _build(tiny_llama_pair, old_bundle[0], overwrite=True)
    _assert_old_intact(old_bundle)


def test_failed_exchange_keeps_old_bundle(tiny_llama_pair, old_bundle, monkeypatch):
    def broken(a, b):
        raise KeyboardInterrupt

    monkeypatch.setattr(bundle_io, "_exchange", broken)
    with pytest.raises(KeyboardInterrupt):
        _build(tiny_llama_pair, old_bundle[0], overwrite=True)
    _assert_old_intact(old_bundle)


@pytest.mark.parametrize("error", [KeyboardInterrupt, OSError])
def test_failed_fallback_swap_keeps_old_bundle(tiny_llama_pair, old_bundle, monkeypatch, error):
    monkeypatch.setattr(bundle_io, "_renameat2", lambda: None)
    _fail_rename_of_new(monkeypatch, error)
    with pytest.raises(error):
        _build(tiny_llama_pair, old_bundle[0], overwrite=True)
    _assert_old_intact(old_bundle)


def test_folder_changed_during_build_is_refused_at_the_swap(tiny_llama_pair, tmp_path, monkeypatch):
    out = tmp_path / "b"
    real = build_module.save_tokenizer

    def user_writes_meanwhile(*args):
        out.mkdir()
        (out / "mine.txt").write_text("mine")
        return real(*args)

    monkeypatch.setattr(build_module, "save_tokenizer", user_writes_meanwhile)
    with pytest.raises(ConfigError, match="'mine.txt'"):
        _build(tiny_llama_pair, out, overwrite=True)
    assert os.listdir(out) == ["mine.txt"]
    assert _leftovers(tmp_path) == []


# --- replace_dir_atomically -----------------------------------------------------------------------------------

def _folder(path: Path, *files: str) -> Path:
    path.mkdir()
    for file in files:
        (path / file).write_text(file)
    return path


def _fail_rename_of_new(monkeypatch, error):
    """Make os.rename fail when it moves a `.<name>.building-*` or `new` folder into place."""
    real = os.rename

    def rename(src, dst):
        name = os.path.basename(os.fspath(src))
        if name == "new" or ".building-" in name:
            raise error("simulated failure")
        return real(src, dst)

    monkeypatch.setattr(os, "rename", rename)


def test_replace_by_exchange(tmp_path, monkeypatch):
    old, new = _folder(tmp_path / "dest", "old.txt"), _folder(tmp_path / "new", "new.txt")
    calls = []
    real = bundle_io._exchange
    monkeypatch.setattr(bundle_io, "_exchange", lambda a, b: calls.append(real(a, b)) or calls[-1])
    replace_dir_atomically(new, old)
    assert calls == [True]
    assert os.listdir(tmp_path) == ["dest"] and os.listdir(old) == ["new.txt"]


def test_replace_into_missing_destination(tmp_path):
    new = _folder(tmp_path / "new", "new.txt")
    replace_dir_atomically(new, tmp_path / "dest")
    assert os.listdir(tmp_path) == ["dest"] and os.listdir(tmp_path / "dest") == ["new.txt"]


@pytest.mark.parametrize("unavailable", ["no renameat2", "EINVAL"])
def test_replace_by_renames(tmp_path, monkeypatch, unavailable):
    def einval(*args):
        ctypes.set_errno(errno.EINVAL)
        return -1

    monkeypatch.setattr(bundle_io, "_renameat2", lambda: None if unavailable == "no renameat2" else einval)
    old, new = _folder(tmp_path / "dest", "old.txt"), _folder(tmp_path / "new", "new.txt")
    replace_dir_atomically(new, old)
    assert os.listdir(tmp_path) == ["dest"] and os.listdir(old) == ["new.txt"]


@pytest.mark.parametrize("error", [KeyboardInterrupt, OSError])
def test_fallback_interrupted_between_renames_restores_old(tmp_path, monkeypatch, error):
    monkeypatch.setattr(bundle_io, "_renameat2", lambda: None)
    old, new = _folder(tmp_path / "dest", "old.txt"), _folder(tmp_path / "new", "new.txt")
    _fail_rename_of_new(monkeypatch, error)
    with pytest.raises(error):
        replace_dir_atomically(new, old)
    assert sorted(os.listdir(tmp_path)) == ["dest", "new"]
    assert os.listdir(old) == ["old.txt"] and os.listdir(new) == ["new.txt"]


def test_ctrl_c_during_the_swap_is_held_until_it_is_complete(tmp_path, monkeypatch):
    monkeypatch.setattr(bundle_io, "_renameat2", lambda: None)
    old, new = _folder(tmp_path / "dest", "old.txt"), _folder(tmp_path / "new", "new.txt")
    real = os.rename

    def rename_with_ctrl_c(src, dst):
        os.kill(os.getpid(), signal.SIGINT)
        return real(src, dst)

    monkeypatch.setattr(os, "rename", rename_with_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        replace_dir_atomically(new, old)
    assert os.listdir(tmp_path) == ["dest"] and os.listdir(old) == ["new.txt"]
