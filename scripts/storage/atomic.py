"""Crash-safe output writing: every file appears whole or not at all (temp file + ``os.replace``)."""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path

from monai.data import NibabelWriter

__all__ = ["atomic_write_text", "AtomicNibabelWriter"]


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class AtomicNibabelWriter(NibabelWriter):
    """MONAI's ``NibabelWriter`` that writes to a hidden temporary name and renames when complete.

    A run killed while saving leaves at most a hidden ``.*.tmp-*.nii.gz`` file, never a truncated
    ``*_anomaly.nii.gz`` that a later step would take for a result. Use it as
    ``SaveImaged(writer="scripts.storage.atomic.AtomicNibabelWriter")``.
    """

    def write(self, filename, verbose: bool = False, **obj_kwargs) -> None:  # noqa: ANN001
        final = Path(filename)
        suffix = "".join(final.suffixes[-2:]) if final.name.endswith(".nii.gz") else final.suffix
        tmp = final.with_name(f".{final.name[: -len(suffix)]}.tmp-{uuid.uuid4().hex[:8]}{suffix}")
        try:
            super().write(str(tmp), verbose=verbose, **obj_kwargs)
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
