"""Where a built bundle may go, and how it replaces an old one without ever losing it.

A build only ever deletes two things: the temporary folder it created, and the old bundle it has
just swapped out. `check_out_dir` refuses every destination that could hold anything else;
`replace_dir_atomically` swaps the new folder in so that the destination always holds either the
complete old bundle or the complete new one.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import os
import secrets
import shutil
import signal
import stat
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

from spectrt.errors import ConfigError
from spectrt.runtime.manifest import MANIFEST_NAME

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
    with _interrupts_deferred():
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
def _interrupts_deferred() -> Iterator[None]:
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
