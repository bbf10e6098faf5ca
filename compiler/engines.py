"""`spectrt compile BUNDLE`: add TensorRT engines to an existing ONNX bundle, with TensorRT alone.

Export needs torch and transformers and runs on a workstation; a Jetson has TensorRT (from JetPack) but
should not need either. This module imports neither torch, transformers nor onnx (a test runs the command
with them unimportable): it reads the bundle's manifest, builds one engine per model from the bundle's own
ONNX graphs with the profiles `spectrt build --backend tensorrt` gives (tensorrt_build.entry_profiles, from
the manifest's widths, max_context and geometry), each in a fresh process (tensorrt_build.
compile_model_engine), and records them in the manifest.

The bundle is never lost. Engines are built into temporary files inside the bundle folder; the new
manifest (files table with each engine's size and sha256, models.<role>.backends.tensorrt) is validated
with parse_manifest and written to a temporary file; only then, with Ctrl-C held back, old engines move
aside, the new ones are renamed into place and the manifest is replaced by os.replace. A failure at any
point before that removes the temporary files and leaves the old manifest and files as they were; a
failure during the renames puts the old engines back.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import secrets
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from spectrt import __version__
from spectrt.errors import BackendUnavailableError, BundleError, ConfigError, EngineBuildError
from spectrt.runtime.manifest import MANIFEST_NAME, ROLES, file_facts, parse_manifest, read_manifest, verify_files

from .bundle_io import interrupts_deferred, fsync_dir, fsync_file, write_synced
from .progress import Progress
from .tensorrt_build import INSTALL_HINT, compile_model_engine, entry_profiles, partial_path

DEFAULT_PREFILL_OPT = 128
TEMP_MARK = ".compiling-"  # temporary engine / manifest files: .<name>.compiling-<hex>
BACKUP_MARK = ".old-"  # an old engine moved aside during the swap: .<name>.old-<hex>


@dataclass(frozen=True)
class CompileConfig:
    """Everything `spectrt compile` takes; each field is one CLI option of the same name."""

    prefill_opt: int | None = None  # TensorRT prefill profile's optimal length [default: the bundle's build value, else 128]
    workspace_mb: int | None = None  # TensorRT builder workspace limit
    timing_cache: str | None = None  # TensorRT timing cache file (read if present, written after each build)
    compute_capabilities: tuple[str, ...] = field(default=())  # TensorRT-RTX targets, e.g. ("SM86",)
    overwrite: bool = False  # replace engines the bundle already has

    def __post_init__(self) -> None:
        object.__setattr__(self, "compute_capabilities",
                           tuple(c.strip() for c in self.compute_capabilities if c.strip()))
        if self.prefill_opt is not None and self.prefill_opt < 1:
            raise ConfigError("--prefill-opt must be >= 1 (it is capped at the bundle's max context).")
        if self.workspace_mb is not None and self.workspace_mb <= 0:
            raise ConfigError("--workspace-mb must be positive.")

    def to_json(self) -> dict[str, Any]:
        return {"prefill_opt": self.prefill_opt, "workspace_mb": self.workspace_mb,
                "timing_cache": Path(self.timing_cache).name if self.timing_cache else None,  # no machine paths
                "compute_capabilities": list(self.compute_capabilities)}


@dataclass
class CompileResult:
    bundle_dir: Path
    manifest: dict[str, Any]
    engines: dict[str, dict[str, Any]]  # role -> its backends.tensorrt record
    seconds: float


def compile_bundle(bundle_dir: Path | str, config: CompileConfig = CompileConfig(), *,
                   progress: Progress | None = None) -> CompileResult:
    """Build the TensorRT engines of every model in `bundle_dir` from its ONNX graphs and record them in its
    manifest (see the module docstring for how the bundle stays valid throughout)."""
    progress = progress or Progress()
    start = time.perf_counter()
    bundle_dir = Path(bundle_dir)
    manifest_path = bundle_dir / MANIFEST_NAME
    original = _read_bytes(manifest_path, bundle_dir)
    manifest = read_manifest(bundle_dir)
    raw = manifest.raw
    roles = [role for role in ROLES if raw["models"].get(role) is not None]
    for role in roles:
        check_compilable(bundle_dir, role, raw["models"][role])
    targets = _engine_targets(bundle_dir, raw, roles, overwrite=config.overwrite)
    _require_tensorrt()
    _require_space(manifest, roles)
    prefill_opt = config.prefill_opt or _built_prefill_opt(raw)
    widths = manifest.target.widths

    progress.say(f"spectrt compile → {bundle_dir}")
    graphs = {p for role in roles for p in (raw["models"][role]["backends"]["onnx"]["path"],
                                            raw["models"][role]["backends"]["onnx"].get("data")) if p}
    with progress.step("check the ONNX graphs against their sha256"):
        verify_files(manifest, only=graphs)

    temporary: list[Path] = []  # ours to remove if anything fails
    stale: list[Path] = []  # old engines the new manifest no longer lists, removed once it is in place
    try:
        records, built = {}, {}
        for role in roles:
            onnx = raw["models"][role]["backends"]["onnx"]
            final = targets[role]
            tmp = bundle_dir / f".{final.name}{TEMP_MARK}{secrets.token_hex(4)}"
            temporary += [tmp, partial_path(tmp)]
            profiles = entry_profiles(role, raw["models"][role], widths, prefill_opt)
            with progress.step(f"compile {role} TensorRT engine ({len(profiles)} profiles)"):
                records[role] = compile_model_engine(
                    manifest.file(onnx["path"]), tmp, profiles, record_path=final.name,
                    workspace_mb=config.workspace_mb,
                    timing_cache=Path(config.timing_cache) if config.timing_cache else None,
                    compute_capabilities=config.compute_capabilities)
            built[role] = (tmp, final)
        with progress.step("hash the engines and write the manifest"):
            new = _new_manifest(raw, records, built, config, prefill_opt)
            parse_manifest(bundle_dir, new)  # the runtime must accept what we write
            manifest_tmp = bundle_dir / f".{MANIFEST_NAME}{TEMP_MARK}{secrets.token_hex(4)}"
            temporary.append(manifest_tmp)
            write_synced(manifest_tmp, json.dumps(new, indent=2).encode())
            for tmp, _final in built.values():
                fsync_file(tmp)
            stale = _stale_engines(bundle_dir, raw, new)
            _swap_in(bundle_dir, [built[role] for role in roles], manifest_tmp, original)
    except OSError as exc:
        _remove(temporary)
        raise BundleError(f"compiling bundle '{bundle_dir}' failed ({exc}); the bundle was left as it was. Check "
                          f"the folder's permissions and free space, then run `spectrt compile` again.") from exc
    except BaseException:
        _remove(temporary)
        raise
    _remove(stale)
    return CompileResult(bundle_dir, new, records, time.perf_counter() - start)


# -- checks before any work -------------------------------------------------------------------------


def check_compilable(bundle_dir: Path, role: str, entry: dict[str, Any]) -> None:
    """Refuse a model TensorRT cannot build: no ONNX graph, or ONNX Runtime contrib ops (weight-quantized)."""
    onnx = entry["backends"].get("onnx")
    if onnx is None:
        raise BundleError(f"bundle '{bundle_dir}' has no ONNX graph for its {role} model, and `spectrt compile` "
                          f"builds engines from the ONNX graphs; rebuild the bundle with `spectrt build` "
                          f"(--backend onnx), then compile it.")
    contrib_ops = list(onnx.get("contrib_ops") or [])
    quantization = entry.get("quantization")
    if contrib_ops or quantization:
        what = ", ".join(contrib_ops) or "MatMulNBits"
        scheme = f"{quantization['scheme']} " if quantization else ""
        raise EngineBuildError(
            f"bundle '{bundle_dir}': the {role} graph uses ONNX Runtime contrib ops ({what}: {scheme}weight "
            f"quantization for the ONNX Runtime CPU path), which TensorRT cannot parse. Engines need a graph of "
            f"plain ONNX ops: rebuild without --quantize (fp16 recommended for TensorRT: `spectrt build ... "
            f"--precision fp16`), then run `spectrt compile` on that bundle.")


def _engine_targets(bundle_dir: Path, raw: dict[str, Any], roles: list[str], *, overwrite: bool) -> dict[str, Path]:
    """Where each role's engine goes (`<role>.engine`); refuses existing engines without `overwrite`, and a file
    at that name that the bundle does not list (spectrt never replaces what it did not build)."""
    files = raw["files"]
    existing, targets = [], {}
    for role in roles:
        final = bundle_dir / f"{role}.engine"
        record = raw["models"][role]["backends"].get("tensorrt")
        if os.path.lexists(final) and final.name not in files:
            raise BundleError(f"'{final}' exists but is not a file of this bundle (its manifest does not list it); "
                              f"spectrt never replaces what it did not build: move it away, then run `spectrt "
                              f"compile` again.")
        if record is not None:
            existing.append(f"{role}: {record['path']} ({record['module']} {record['version']})")
        elif os.path.lexists(final):
            existing.append(f"{role}: {final.name}")
        targets[role] = final
    if existing and not overwrite:
        raise ConfigError(f"bundle '{bundle_dir}' already has TensorRT engines ({'; '.join(existing)}). Pass "
                          f"--overwrite to replace them (the old engines stay in use until the new ones are built "
                          f"and recorded), or compile a copy of the bundle.")
    return targets


def _require_tensorrt() -> None:
    """Fail fast without importing TensorRT here (the build processes import it; this one stays small)."""
    from importlib.util import find_spec

    if not any(find_spec(name) is not None for name in ("tensorrt", "tensorrt_rtx")):
        raise BackendUnavailableError("spectrt compile needs TensorRT, which is not installed: "
                                      + INSTALL_HINT.replace(", or build with --backend onnx", "")
                                      + " On a Jetson, use JetPack's TensorRT (python3-libnvinfer).")


def _require_space(manifest: Any, roles: list[str]) -> None:
    """An engine is about as large as its graph's weights; refuse before hours of building if they cannot fit."""
    needed = 0
    for role in roles:
        onnx = manifest.raw["models"][role]["backends"]["onnx"]
        needed += sum(manifest.files[p]["size"] for p in (onnx["path"], onnx.get("data")) if p in manifest.files)
    free = shutil.disk_usage(manifest.path).free
    if free < needed * 1.1:
        raise BundleError(f"the engines need about {needed / 2**20:.0f} MiB in '{manifest.path}', which has "
                          f"{free / 2**20:.0f} MiB free; free some space, then run `spectrt compile` again.")


def _built_prefill_opt(raw: dict[str, Any]) -> int:
    value = (raw.get("build") or {}).get("prefill_opt")
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else DEFAULT_PREFILL_OPT


# -- the new manifest and the swap ------------------------------------------------------------------


def _new_manifest(raw: dict[str, Any], records: dict[str, dict[str, Any]], built: dict[str, tuple[Path, Path]],
                  config: CompileConfig, prefill_opt: int) -> dict[str, Any]:
    """The old manifest plus the engines: backends.tensorrt records, files entries (size, sha256 of the
    temporary file that will be renamed into place), and a `compile` record of how they were built."""
    new = copy.deepcopy(raw)
    files = new["files"]
    for role, record in records.items():
        old = raw["models"][role]["backends"].get("tensorrt")
        if old is not None and old["path"] != record["path"]:
            files.pop(old["path"], None)  # removed after the swap (_stale_engines), if nothing else uses it
        tmp, final = built[role]
        files[final.name] = file_facts(tmp)
        new["models"][role]["backends"]["tensorrt"] = record
    module, version = next(iter(records.values()))["module"], next(iter(records.values()))["version"]
    new["files"] = dict(sorted(files.items()))
    new["compile"] = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **config.to_json(),
        "prefill_opt": prefill_opt,
        "tool_versions": {"spectrt": __version__, "python": platform.python_version(), module: version},
        "platform": platform.platform(),
        "machine": platform.machine(),
    }
    versions = new.setdefault("provenance", {}).setdefault("tool_versions", {})
    if isinstance(versions, dict):
        for other in ("tensorrt", "tensorrt_rtx"):
            versions.pop(other, None)
        versions[module] = version
    return new


def _stale_engines(bundle_dir: Path, old: dict[str, Any], new: dict[str, Any]) -> list[Path]:
    """Engine files the old manifest listed that the new one no longer does (an old engine of another name)."""
    paths = []
    for role, entry in old["models"].items():
        record = (entry or {}).get("backends", {}).get("tensorrt")
        if record is not None and record["path"] in old["files"] and record["path"] not in new["files"]:
            paths.append(bundle_dir / record["path"])
    return paths


def _swap_in(bundle_dir: Path, moves: list[tuple[Path, Path]], manifest_tmp: Path, original: bytes) -> None:
    """Rename each (temporary engine, final name) into place, then the manifest over manifest.json; old engines
    move aside first and come back if anything fails, so the folder never mixes an old manifest with new
    engines. Ctrl-C waits until this is done."""
    manifest_path = bundle_dir / MANIFEST_NAME
    with interrupts_deferred():
        if _read_bytes(manifest_path, bundle_dir) != original:
            raise BundleError(f"'{manifest_path}' changed while the engines were built (another build or compile "
                              f"of this bundle?); nothing was changed: run `spectrt compile` again.")
        placed: list[tuple[Path, Path | None]] = []  # (final, where the old file went, or None)
        try:
            for tmp, final in moves:
                backup = None
                if os.path.lexists(final):
                    backup = final.with_name(f".{final.name}{BACKUP_MARK}{secrets.token_hex(4)}")
                    os.rename(final, backup)
                    placed.append((final, backup))
                os.rename(tmp, final)
                if backup is None:
                    placed.append((final, None))
            _install_manifest(manifest_tmp, manifest_path)
        except BaseException:
            for final, backup in reversed(placed):
                if backup is not None:
                    os.replace(backup, final)
                else:
                    final.unlink(missing_ok=True)
            raise
    fsync_dir(bundle_dir)
    _remove([backup for _final, backup in placed if backup is not None])


def _install_manifest(manifest_tmp: Path, manifest_path: Path) -> None:
    os.replace(manifest_tmp, manifest_path)


# -- small file helpers -----------------------------------------------------------------------------


def _read_bytes(path: Path, bundle_dir: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise BundleError(f"'{bundle_dir}' has no {MANIFEST_NAME}; it is not a spectrt bundle (build one with "
                          f"`spectrt build`).") from None
    except OSError as exc:
        raise BundleError(f"{path} cannot be read ({exc}); check its permissions.") from exc


def _remove(paths: list[Path]) -> None:
    """Remove our own temporary / replaced files (never folders)."""
    for path in paths:
        try:
            if not path.is_dir() or path.is_symlink():
                path.unlink(missing_ok=True)
        except OSError:
            pass
