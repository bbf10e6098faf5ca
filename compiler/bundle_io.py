"""Where a built bundle may go, and how it replaces an old one without ever losing it.

A build only ever deletes two things: the temporary folder it created, and the old bundle it has
just swapped out. `check_out_dir` refuses every destination that could hold anything else;
`replace_dir_atomically` swaps the new folder in so that the destination always holds either the
complete old bundle or the complete new one. `install_staged` replaces files inside a bundle (train-head)
so that the bundle on disk verifies at every moment.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import os
import posixpath
import secrets
import shutil
import signal
import stat
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

from spectrt.errors import BundleError, ConfigError
from spectrt.runtime.manifest import MANIFEST_NAME, file_facts, parse_manifest

AT_FDCWD = -100
RENAME_EXCHANGE = 2
SHOWN_ENTRIES = 3  # how many unexpected entries an error names


def check_out_dir(out_dir: Path, *, overwrite: bool) -> None:
    """Refuse an --out a build must not replace: links, protected folders, files, non-bundles, or
    (without `overwrite`) an existing bundle. A missing or empty folder is fine."""
    path = Path(out_dir).absolute()
    if path.is_symlink():
        raise ConfigError(f"--out {out_dir} is a symbolic link; spectrt does not build through links: "
                          f"choose another --out (or give the folder it points to).")
    _refuse_protected(path, out_dir)
    if not path.exists():
        return
    if not path.is_dir():
        raise ConfigError(f"--out {out_dir} is a file, not a folder; choose another --out.")
    entries = _list(path, out_dir)
    if not entries:
        return
    name, unexpected = _bundle_contents(path, entries)
    if unexpected:
        raise ConfigError(_not_a_bundle_message(out_dir, name, unexpected))
    if not overwrite:
        raise ConfigError(f"--out {out_dir} already holds the bundle '{name}'; pass --overwrite to replace it, "
                          f"or choose another --out.")


def _refuse_protected(path: Path, shown: Path) -> None:
    """Refuse the filesystem root, the home folder, the current folder and its ancestors."""
    resolved = path.resolve()
    cwd = Path.cwd().resolve()
    protected = {parent: "an ancestor of the current folder" for parent in cwd.parents}
    protected[cwd] = "the current folder"
    with contextlib.suppress(RuntimeError, KeyError):
        protected[Path.home().resolve()] = "your home folder"
    protected[Path(resolved.anchor)] = "the filesystem root"
    if resolved in protected:
        raise ConfigError(f"--out {shown} is {protected[resolved]}; a build replaces its --out folder as a whole, "
                          f"so choose a folder of its own, e.g. engines/<name>.")
    if path.name in ("", ".", ".."):
        raise ConfigError(f"--out {shown} does not name a bundle folder; give one, e.g. engines/<name>.")


def _list(path: Path, shown: Path) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError as exc:
        raise ConfigError(f"cannot read --out {shown} ({exc.strerror}); choose another --out.") from exc


def _bundle_contents(path: Path, entries: list[str]) -> tuple[str | None, list[str]]:
    """The bundle's name (None if `path` has no bundle manifest) and the entries that are not its own files."""
    files = _manifest_files(path / MANIFEST_NAME)
    if files is None:
        return None, entries
    name, own = files
    return name, [e for e in entries if e not in own or not _is_plain_file(path / e)]


def _manifest_files(manifest: Path) -> tuple[str, set[str]] | None:
    """(bundle name, names it owns) from a manifest.json holding an object with a `files` dict, else None."""
    try:
        data = json.loads(manifest.read_text()) if _is_plain_file(manifest) else None
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        return None
    name = data.get("name") if isinstance(data.get("name"), str) else manifest.parent.name
    return name, set(data["files"]) | {MANIFEST_NAME}


def _is_plain_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _not_a_bundle_message(shown: Path, name: str | None, unexpected: list[str]) -> str:
    listed = ", ".join(f"'{e}'" for e in unexpected[:SHOWN_ENTRIES])
    more = f" and {len(unexpected) - SHOWN_ENTRIES} more" if len(unexpected) > SHOWN_ENTRIES else ""
    what = (f"holds the bundle '{name}' plus entries that are not its files:" if name is not None
            else "is not a spectrt bundle: it holds")
    return (f"--out {shown} {what} {listed}{more}. spectrt never deletes what it did not build: "
            f"choose another --out, or remove them yourself.")


def replace_dir_atomically(new: Path, dest: Path) -> None:
    """Move folder `new` to `dest`, replacing what `dest` holds; `dest` always holds the complete old or
    new folder. Linux: one renameat2(RENAME_EXCHANGE); elsewhere two renames, undone on any failure."""
    new, dest = Path(new).absolute(), Path(dest).absolute()
    with interrupts_deferred():
        if not os.path.lexists(dest):
            os.rename(new, dest)  # never replaces a non-empty folder that appeared meanwhile
        elif _exchange(new, dest):
            shutil.rmtree(new, ignore_errors=True)  # the old folder now sits at `new`
        else:
            _replace_by_renames(new, dest)


def _replace_by_renames(new: Path, dest: Path) -> None:
    """dest → .<name>.old-*, new → dest, drop the old; put the old back if the new did not arrive."""
    old = dest.parent / f".{dest.name}.old-{secrets.token_hex(4)}"
    try:
        os.rename(dest, old)
        os.rename(new, dest)
    except BaseException:
        if os.path.lexists(new) and os.path.lexists(old):
            os.rename(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step; False where the system cannot (then nothing changed)."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


@functools.lru_cache(maxsize=1)
def _renameat2() -> Callable[..., int] | None:
    """glibc's renameat2 (2.28+), or None off Linux or on an older libc."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C back while the folders move (main thread only), then raise it."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is None:
        yield
        return
    caught: list[Any] = []
    previous = signal.signal(signal.SIGINT, lambda *args: caught.append(args))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


# -- files replaced inside a bundle (train-head) ----------------------------------------------------------------------

STAGE_MARK = ".staged-"  # files written under temporary names inside a bundle: .<name>.staged-<hex>, .<label>.staged-<hex>/
PLACING_MARK = ".placing-"  # a final name's temporary link or copy: .<name>.placing-<hex>
WRITING_MARK = ".writing-"  # a manifest being written: .manifest.json.writing-<hex>


def staged_name(final: str) -> str:
    """A fresh temporary name beside bundle path `final` (same folder: a graph's relative data locations still hold)."""
    folder, name = posixpath.split(final)
    return posixpath.join(folder, f".{name}{STAGE_MARK}{secrets.token_hex(4)}")


def install_staged(bundle: Path, moves: dict[str, str], manifest_for: Callable[[Callable[[str], str]], dict[str, Any]],
                   original: bytes) -> dict[str, Any]:
    """Install files written (and synced) under staged names, `moves` = {final path: staged path} relative to the
    bundle, together with the manifest that lists them, so that the bundle on disk verifies at every moment:

    1. manifest.json := `manifest_for(staged name)`: the new bundle, its new files under their staged names (the
       final names are listed no more, whatever they hold);
    2. each final name := a hard link (else a synced copy) of its staged file, renamed into place;
    3. manifest.json := `manifest_for(final name)`: the new bundle under its final names;
    4. the staged files go, and whatever an interrupted earlier install left (names with our marks, unlisted now).

    An interruption (a crash, a kill, a full disk) leaves the old bundle (before 1), the new one under staged names
    (1 to 3) or the new one; Ctrl-C waits until 3 is done. `manifest_for(where)` returns a fresh manifest whose
    entries name each new file as where(final); this fills in their `files` records. `original`: the manifest's bytes
    the new one was derived from (if they changed meanwhile, nothing is installed). Returns the final manifest."""
    bundle = Path(bundle)
    facts = {final: file_facts(bundle / staged) for final, staged in moves.items()}
    staged_manifest = _with_files(manifest_for(moves.__getitem__), moves, facts, staged=True)
    final_manifest = _with_files(manifest_for(lambda final: final), moves, facts, staged=False)
    for manifest in (staged_manifest, final_manifest):
        parse_manifest(bundle, manifest)  # the runtime must accept every state we write
    manifest_path = bundle / MANIFEST_NAME
    with interrupts_deferred():
        if manifest_path.read_bytes() != original:
            raise BundleError(f"'{manifest_path}' changed meanwhile (another train-head, build or compile of this "
                              f"bundle?); nothing was installed: run the command again.")
        for folder in {(bundle / staged).parent for staged in moves.values()}:
            fsync_dir(folder)
        write_manifest(bundle, staged_manifest)
        for final, staged in moves.items():
            _place(bundle / staged, bundle / final)
        for folder in {(bundle / final).parent for final in moves}:
            fsync_dir(folder)
        write_manifest(bundle, final_manifest)
    leftovers = [p for p in bundle.iterdir() if any(m in p.name for m in (STAGE_MARK, PLACING_MARK, WRITING_MARK))]
    discard_staged(bundle, [*(bundle / p for p in moves.values()), *leftovers])
    return final_manifest


def _with_files(manifest: dict[str, Any], moves: dict[str, str], facts: dict[str, dict[str, Any]], *,
                staged: bool) -> dict[str, Any]:
    files = manifest["files"]
    for final, staged_path in moves.items():
        files.pop(final, None)
        files.pop(staged_path, None)
        files[staged_path if staged else final] = facts[final]
    manifest["files"] = dict(sorted(files.items()))
    return manifest


def _place(staged: Path, final: Path) -> None:
    """`final` := the content of `staged` (which stays): a hard link, or a synced copy where links fail, renamed."""
    tmp = final.with_name(f".{final.name}{PLACING_MARK}{secrets.token_hex(4)}")
    try:
        try:
            os.link(staged, tmp)
        except OSError:  # a filesystem without hard links
            shutil.copyfile(staged, tmp)
            fsync_file(tmp)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_manifest(bundle: Path, manifest: dict[str, Any]) -> None:
    """Replace the bundle's manifest.json by one rename of a synced temporary file; the folder is synced after."""
    tmp = Path(bundle) / f".{MANIFEST_NAME}{WRITING_MARK}{secrets.token_hex(4)}"
    try:
        write_synced(tmp, (json.dumps(manifest, indent=2) + "\n").encode())
        os.replace(tmp, Path(bundle) / MANIFEST_NAME)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(Path(bundle))


def discard_staged(bundle: Path, paths: list[Path]) -> None:
    """Remove staged files and folders (ours), except any the bundle's manifest lists now (an install interrupted
    after step 1 of install_staged: they are the bundle). Never raises: this runs while an error propagates."""
    with contextlib.suppress(Exception):
        manifest = json.loads((Path(bundle) / MANIFEST_NAME).read_text())
        listed = {os.path.normpath(Path(bundle) / p) for p in manifest["files"]}
        for path in paths:
            inside = [p for p in listed if p == os.path.normpath(path) or p.startswith(os.path.normpath(path) + os.sep)]
            if inside:
                continue
            with contextlib.suppress(OSError):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
            if path.parent != Path(bundle) and STAGE_MARK in path.parent.name:
                with contextlib.suppress(OSError):
                    path.parent.rmdir()  # its staging folder, once empty


def write_synced(path: Path, data: bytes) -> None:
    """Write `data` to `path` and flush it to the disk before returning."""
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def fsync_file(path: Path) -> None:
    """Flush a written file's data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (renames, new names) to the disk, where the filesystem can."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot sync a folder; the renames are done either way
    finally:
        os.close(fd)


def finish_interrupted_install(bundle: Path) -> bool:
    """Complete an install_staged that stopped between its steps 1 and 3 (the manifest lists staged names): the
    files move to their final names as install_staged does. False if there was none."""
    manifest_path = Path(bundle) / MANIFEST_NAME
    original = manifest_path.read_bytes()
    data = json.loads(original)
    moves = {_final_name(path): path for path in data["files"] if STAGE_MARK in path}
    if not moves:
        return False

    def renamed(where: Callable[[str], str]) -> dict[str, Any]:
        names = {staged: where(final) for final, staged in moves.items()}
        return _replace_strings(data, names)

    install_staged(Path(bundle), moves, renamed, original)
    return True


def _final_name(staged: str) -> str:
    """.<label>.staged-<hex>/head.onnx -> head.onnx; sub/.target.onnx.staged-<hex> -> sub/target.onnx"""
    parts = staged.split("/")
    folders = [p for p in parts[:-1] if STAGE_MARK not in p]
    name = parts[-1]
    if STAGE_MARK in name:
        name = name[1:name.rindex(STAGE_MARK)] if name.startswith(".") else name[:name.rindex(STAGE_MARK)]
    return posixpath.join(*folders, name)


def _replace_strings(value: Any, names: dict[str, str]) -> Any:
    """A copy of JSON `value` with every string in `names` replaced (dict keys kept)."""
    if isinstance(value, dict):
        return {key: _replace_strings(item, names) for key, item in value.items()}
    if isinstance(value, list):
        return [_replace_strings(item, names) for item in value]
    return names.get(value, value) if isinstance(value, str) else value
