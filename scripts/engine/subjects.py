"""Which volumes are scans of one subject, so that they are never references for each other.

The subject of a volume is its ``subject`` column in ``cohort.csv``; else the first group (or the match)
of ``subject_pattern`` in the image name; else its own name. Volumes with identical voxels are joined
into one subject (one warning).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence

from scripts.errors import CS3FInputError

__all__ = ["subject_of", "join_identical"]


def subject_of(name: str, row: Mapping[str, str] | None = None, pattern: str | None = None) -> str:
    """The subject of the volume ``name`` (see the module docstring)."""
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
