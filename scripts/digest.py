"""Content digests of input files (a leaf module: it imports nothing from the bundle)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

__all__ = ["file_digest"]


def file_digest(paths: Sequence[str | Path], chunk: int = 1 << 22) -> str:
    """sha256 (hex) over the bytes of the given files, in order, read ``chunk`` bytes at a time."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while block := f.read(chunk):
                digest.update(block)
    return digest.hexdigest()
