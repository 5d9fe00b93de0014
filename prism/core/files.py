"""Writing a file so that a kill mid-write never leaves it half-written."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: str | Path, text: str) -> None:
    """`path` holds all of `text` or what it held before, never part of it: written to a hidden sibling,
    then renamed over it (`os.replace` is atomic within a file system)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
