"""Which volumes are scans of one subject, so that they are never references for each other."""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence

from scripts.errors import CS3FInputError
from scripts.scoring.references import ReferenceSet, chunk_ranges

__all__ = ["join_identical", "no_reference_error", "subject_of", "without_references"]


def subject_of(name: str, row: Mapping[str, str] | None = None, pattern: str | None = None) -> str:
    """``row``'s ``subject`` (``cohort.csv``), else the first group (or the match) of ``pattern`` in ``name``,
    else ``name``."""
    if row is not None and str(row.get("subject") or "").strip():
        return str(row["subject"]).strip()
    if pattern:
        try:
            match = re.search(pattern, name)
        except re.error as err:
            raise CS3FInputError(f"subject_pattern {pattern!r} is not a regular expression: {err}") from None
        if match is None:
            raise CS3FInputError(f"subject_pattern {pattern!r} does not match the image name {name!r}")
        return match.group(1) if match.groups() else match.group(0)
    return name


def join_identical(names: Sequence[str], subjects: Sequence[str], digests: Sequence[str]) -> list[str]:
    """``subjects`` with the subjects of volumes of equal voxel ``digests`` joined (one warning each),
    transitively, to the smallest subject linked (independent of the order of ``names``)."""
    parent: dict[str, str] = {s: s for s in subjects}

    def root(s: str) -> str:
        while parent[s] != s:
            parent[s] = parent[parent[s]]
            s = parent[s]
        return s

    by_digest: dict[str, list[int]] = {}
    for i, digest in enumerate(digests):
        if digest:
            by_digest.setdefault(digest, []).append(i)
    for members in by_digest.values():
        if len(members) < 2:
            continue
        same = sorted(names[i] for i in members)
        warnings.warn(
            f"cs3f: identical volumes {same}: scored as scans of one subject (never references for each other)",
            stacklevel=2,
        )
        roots = sorted({root(subjects[i]) for i in members})
        for r in roots[1:]:
            parent[r] = roots[0]
    return [root(s) for s in subjects]


def without_references(subjects: Sequence[object], references: ReferenceSet) -> list[int]:
    """Indices of the volumes whose cohort (``all``, ``random:N``) or chunk (``chunks:N``) holds one subject
    only (a reference bank is checked when it is read)."""
    if references.mode == "bank":
        return []
    b = len(subjects)
    spans = chunk_ranges(b, references.size) if references.mode == "chunks" else [(0, b)]
    return [i for lo, hi in spans if len(set(subjects[lo:hi])) < 2 for i in range(lo, hi)]


def no_reference_error(volumes: Sequence[str], references: ReferenceSet, how: str) -> CS3FInputError:
    """The error for ``volumes`` found by :func:`without_references`; ``how``: where the subjects came from."""
    scope = f"their chunk (references {references})" if references.mode == "chunks" else "the cohort"
    shown = ", ".join(volumes[:3]) + (f" and {len(volumes) - 3} more" if len(volumes) > 3 else "")
    return CS3FInputError(
        f"{len(volumes)} volume(s) would have no reference: every volume of {scope} is a scan of one subject "
        f"(subjects from {how}) ({shown})"
    )
