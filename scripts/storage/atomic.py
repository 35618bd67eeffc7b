"""Crash-safe output writing: every file the bundle writes appears whole or not at all."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from enum import Enum
from pathlib import Path
from typing import Any

from monai.data import NibabelWriter
from scripts.errors import os_error

__all__ = [
    "AtomicNibabelWriter",
    "atomic_write",
    "atomic_write_csv",
    "atomic_write_json",
    "atomic_write_text",
    "commit",
    "jsonable",
    "temp_name",
    "temp_path",
]

#: extensions that libraries read to pick a format (or append when missing): kept by ``keep_suffix``
_DOUBLE_SUFFIXES = (".nii.gz",)


def temp_name(name: str, keep_suffix: bool = False) -> str:
    """The name of a temporary file for ``name`` (``.<stem>.tmp-<8 hex>[<ext>]``), as long as any other."""
    ext = next((s for s in _DOUBLE_SUFFIXES if name.endswith(s)), Path(name).suffix) if keep_suffix else ""
    return f".{name[: len(name) - len(ext)]}.tmp-{uuid.uuid4().hex[:8]}{ext}"


def temp_path(path: str | Path, keep_suffix: bool = False) -> Path:
    """Create an empty hidden temporary file beside ``path`` (its folder created) and return its name;
    ``keep_suffix`` ends it with the target's extension, for libraries that pick the format from it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.with_name(temp_name(path.name, keep_suffix))
        try:
            # O_EXCL: never another writer's file; 0o666: the kernel applies the umask, as open() does.
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def commit(tmp: str | Path, path: str | Path) -> Path:
    """Flush the finished ``tmp`` to disk and rename it to ``path`` (replacing any previous file)."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename must not reach the disk before the data does
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return Path(path)


def atomic_write(path: str | Path, write: Callable[[Path], Any], keep_suffix: bool = False) -> Path:
    """Write ``path`` atomically: ``write(tmp)`` fills an empty temporary file, which then replaces ``path``.

    Args:
        path: the file to write.
        write: called with the temporary file's path, e.g. ``lambda tmp: torch.save(obj, tmp)``.
        keep_suffix: see :func:`temp_path`.

    Returns:
        ``path``.

    Raises:
        CS3FInputError: an OS fault (:func:`scripts.errors.os_error`) naming ``path``, also one a library
            hides (``torch.save`` only says its write failed: an append to the temporary file asks the OS).
    """
    tmp = None
    try:
        tmp = temp_path(path, keep_suffix=keep_suffix)
        try:
            write(tmp)
        except Exception as err:
            if not isinstance(err, OSError):
                _probe(tmp)
            raise
        return commit(tmp, path)
    except OSError as err:
        fault = os_error(err, path, "cannot write")
        if fault is None:
            raise
        raise fault from None
    finally:
        if tmp is not None and tmp.exists():
            tmp.unlink()


def _probe(tmp: Path) -> None:
    """Raise the OS error that writing to ``tmp`` now meets, if any."""
    with open(tmp, "ab") as f:
        f.write(bytes(1 << 16))
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically, line endings as given (no newline translation)."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding=encoding, newline="") as f:
            f.write(text)

    return atomic_write(path, write)


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    """Write ``jsonable(obj)`` as JSON (non-finite floats as ``null``) and a final newline, atomically."""
    return atomic_write_text(path, json.dumps(jsonable(obj), indent=indent, allow_nan=False) + "\n")


def atomic_write_csv(
    path: str | Path, rows: Iterable[Sequence], header: Sequence[str] | None = None, **fmtparams: Any
) -> Path:
    """Write ``header`` and ``rows`` through :func:`csv.writer` (``fmtparams`` as there), atomically."""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, **fmtparams)
    if header is not None:
        writer.writerow(header)
    writer.writerows(rows)
    return atomic_write_text(path, buffer.getvalue())


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON data (tuples as lists, numpy/torch values as numbers and lists, enums as
    their value, non-finite floats as ``None``, anything else as its ``str``)."""
    if isinstance(value, Enum):
        value = value.value
    if hasattr(value, "tolist") and not isinstance(value, str):  # numpy and torch scalars and arrays
        value = value.tolist()
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, bool | int | str):
        return value
    return str(value)


class AtomicNibabelWriter(NibabelWriter):
    """MONAI's ``NibabelWriter`` writing through :func:`atomic_write` (``SaveImaged(writer=...)``)."""

    def write(self, filename, verbose: bool = False, **obj_kwargs) -> None:  # noqa: ANN001 - as NibabelWriter
        def write(tmp: Path) -> None:
            NibabelWriter.write(self, str(tmp), verbose=verbose, **obj_kwargs)

        atomic_write(filename, write, keep_suffix=True)  # nibabel compresses by the .gz ending
