"""The held-out texts `spectrt eval` reads: shipped ones by name (texts/README.md says where they come from) or
any UTF-8 file by path."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from .errors import QualityError

TEXTS_DIR = Path(__file__).resolve().parent / "texts"
SHIPPED = {"prose": "prose.txt", "code": "code.txt"}
MAX_BYTES = 8 << 20  # a text file beyond this is surely a mistake (the evaluation reads a few thousand tokens)


@dataclass(frozen=True)
class EvalText:
    name: str  # the shipped name, or the file's stem
    origin: str  # "shipped:<name>" or "file:<file name>" (never a machine path: results get shared)
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def load_text(name_or_path: str) -> EvalText:
    """A shipped text by name (prose, code) or a UTF-8 text file."""
    if name_or_path in SHIPPED:
        path = TEXTS_DIR / SHIPPED[name_or_path]
        return EvalText(name_or_path, f"shipped:{name_or_path}", path.read_text(encoding="utf-8"))
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise QualityError(f"unknown text '{name_or_path}': pass {' or '.join(SHIPPED)} (shipped with spectrt) or the "
                           f"path of a UTF-8 text file.")
    if path.stat().st_size > MAX_BYTES:
        raise QualityError(f"text file '{path}' is larger than {MAX_BYTES >> 20} MiB; pass an excerpt.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise QualityError(f"text file '{path}' is not UTF-8 ({exc}).") from exc
    if not text.strip():
        raise QualityError(f"text file '{path}' is empty.")
    return EvalText(path.stem, f"file:{path.name}", text)
