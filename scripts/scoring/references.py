"""Which volumes each query volume is scored against: :class:`ReferenceSet` parses the ``references`` key,
:func:`plan_references` and :func:`bank_plan` turn it into a :class:`ReferencePlan` of volume indices."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scripts.errors import CS3FInputError

__all__ = [
    "MODES",
    "ReferencePlan",
    "ReferenceSet",
    "bank_plan",
    "chunk_ranges",
    "plan_references",
    "reference_subsets",
]

MODES = ("all", "chunks", "random", "bank")


@dataclass(frozen=True)
class ReferenceSet:
    """The references of each query volume: ``mode`` (:data:`MODES`), ``size`` (``chunks``: volumes per chunk,
    ``>= 2``; ``random``: references per volume, ``>= 1``) and ``folder`` (``bank``)."""

    mode: str = "all"
    size: int | None = None
    folder: str | None = None

    @classmethod
    def parse(cls, value: ReferenceSet | str | Mapping | None) -> ReferenceSet:
        """From ``None``/``"all"``, ``"chunks:N"``, ``"random:N"``, ``"bank:DIR"`` or a dict of the fields;
        :class:`CS3FInputError` naming a bad value."""
        if isinstance(value, ReferenceSet):
            return value
        if value is None:
            return cls()
        if isinstance(value, Mapping):
            unknown = set(value) - {"mode", "size", "folder"}
            if unknown:
                raise CS3FInputError(f"references: unknown fields {sorted(unknown)} (mode, size, folder)")
            mode, size, folder = value.get("mode", "all"), value.get("size"), value.get("folder")
        elif isinstance(value, str):
            mode, _, arg = value.partition(":")
            size, folder = (None, arg or None) if mode == "bank" else (arg or None, None)
        else:
            raise CS3FInputError(f"references must be a string such as 'random:32' or a dict, got {value!r}")
        return cls._checked(str(mode).strip().lower(), size, folder, value)

    @classmethod
    def _checked(cls, mode: str, size: object, folder: object, value: object) -> ReferenceSet:
        forms = "'all', 'chunks:N' (N >= 2), 'random:N' (N >= 1) or 'bank:DIR'"
        if mode not in MODES:
            raise CS3FInputError(f"references must be {forms}, got {value!r}")
        if mode == "bank":
            if not folder:
                raise CS3FInputError(f"references 'bank:DIR' needs the bank folder, got {value!r}")
            return cls(mode, None, str(folder))
        if mode == "all":
            if size is not None or folder is not None:
                raise CS3FInputError(f"references 'all' takes no argument, got {value!r}")
            return cls()
        low = 2 if mode == "chunks" else 1
        try:
            number = int(str(size))
        except ValueError:
            number = None
        if number is None or number < low or isinstance(size, bool):
            raise CS3FInputError(f"references must be {forms}, got {value!r}")
        return cls(mode, number, None)

    def __str__(self) -> str:
        if self.mode == "all":
            return "all"
        return f"{self.mode}:{self.folder if self.mode == 'bank' else self.size}"


def chunk_ranges(b: int, chunk_size: int) -> list[tuple[int, int]]:
    """``max(1, b // chunk_size)`` consecutive ``(start, stop)`` chunks of near-equal size (``chunk_size`` to
    ``2 * chunk_size - 1`` volumes) of ``b`` volumes (paper Sec. 5.1, Table 8)."""
    if isinstance(chunk_size, bool) or int(chunk_size) != chunk_size or chunk_size < 2:
        raise ValueError(f"chunk_size must be an int >= 2 (volumes per independently scored chunk), got {chunk_size}")
    n_chunks = max(1, b // int(chunk_size))
    base, extra = divmod(b, n_chunks)
    ranges, start = [], 0
    for c in range(n_chunks):
        stop = start + base + (c < extra)
        ranges.append((start, stop))
        start = stop
    return ranges


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _name_hash(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"cs3f-references\0{int(seed)}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser (uint64 arrays wrap around, as intended)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def reference_subsets(
    names: Sequence[str],
    n: int,
    seed: int = 0,
    queries: Iterable[int] | None = None,
    subjects: Sequence[object] | None = None,
) -> dict[int, list[int]]:
    """``{query index: [its n reference indices, in name order]}``: the ``min(n, B - 1)`` other volumes with the
    smallest ``mix(h(seed, names[i]) * phi + h(seed, name))`` (``h``: sha256, ``mix``: splitmix64), seeded
    and independent of the datalist order; never the other scans of the query's ``subjects`` entry.

    Args:
        names: unique volume names (the workflow passes the image stems).
        queries: the query indices wanted (default: all).
    """
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise ValueError(f"n_references must be an int >= 1, got {n}")
    names = [str(v) for v in names]
    if len(set(names)) != len(names):
        raise ValueError("reference subsets need unique volume names")
    b = len(names)
    hashes = np.array([_name_hash(seed, v) for v in names], dtype=np.uint64)
    rank = np.empty(b, dtype=np.int64)
    rank[np.argsort(np.array(names, dtype=object), kind="stable")] = np.arange(b)
    ids: dict[object, int] = {}
    groups = np.array([ids.setdefault(s, len(ids)) for s in (range(b) if subjects is None else subjects)])
    out: dict[int, list[int]] = {}
    for i in range(b) if queries is None else queries:
        i = int(i)
        keys = _mix(hashes[i : i + 1] * _GOLDEN + hashes)
        keep = np.flatnonzero(groups != groups[i]) if subjects is not None else np.delete(np.arange(b), i)
        others, keys = keep, keys[keep]
        take = min(int(n), len(others))
        if take < len(others):
            others = others[np.argpartition(keys, take - 1)[:take]]
        out[i] = sorted(others.tolist(), key=lambda j: rank[j])
    return out


@dataclass(frozen=True)
class ReferencePlan:
    """Which reference volumes each query volume (``queries``, sorted) of a cohort is scored against.

    Exactly one of ``batches`` (the members of groups each scored within itself: ``all``, ``chunks:N``),
    ``subsets`` (``{query: its references}``: ``random:N``) or ``skips`` (a bank: per cohort volume the
    bank volumes that are *not* its references, or ``None``); ``subjects``: per volume, for batches.
    """

    queries: tuple[int, ...]
    batches: tuple[tuple[int, ...], ...] | None = None
    subsets: Mapping[int, list[int]] | None = None
    skips: tuple[int | Sequence[int] | None, ...] | None = None
    subjects: tuple[object, ...] | None = None

    def batch_queries(self, members: Sequence[int]) -> list[int]:
        wanted = set(self.queries)
        return [j for j, i in enumerate(members) if i in wanted]

    def batch_subjects(self, members: Sequence[int]) -> list[object] | None:
        return None if self.subjects is None else [self.subjects[i] for i in members]


def _wanted(b: int, queries: Iterable[int] | None) -> tuple[int, ...]:
    return tuple(range(b)) if queries is None else tuple(sorted({int(i) for i in queries}))


def plan_references(
    references: ReferenceSet,
    b: int,
    seed: int = 0,
    queries: Iterable[int] | None = None,
    names: Sequence[str] | None = None,
    subjects: Sequence[object] | None = None,
) -> ReferencePlan:
    """The plan of a cohort-internal reference set (not ``bank``) for ``b`` volumes; ``seed`` and ``names``
    (default: the positions) seed the ``random`` draw, a volume's other ``subjects`` scans are never its
    references."""
    if references.mode == "bank":
        raise ValueError("a reference bank needs its tokens: score with the bank (bank_plan)")
    if b < 2:
        raise ValueError(f"CS3F scores volumes against each other: need at least 2 volumes, got {b}")
    wanted = _wanted(b, queries)
    groups = None if subjects is None else tuple(subjects)
    if references.mode == "all" or (references.mode == "random" and subjects is None and references.size >= b - 1):
        return ReferencePlan(wanted, batches=(tuple(range(b)),), subjects=groups)  # every other volume
    if references.mode == "chunks":
        chunks = [tuple(range(lo, hi)) for lo, hi in chunk_ranges(b, references.size)]
        mine = tuple(c for c in chunks if not set(c).isdisjoint(wanted))
        return ReferencePlan(wanted, batches=mine, subjects=groups)
    labels = [str(i) for i in range(b)] if names is None else list(names)
    if len(labels) != b:
        raise ValueError(f"got {len(labels)} names for {b} volumes")
    return ReferencePlan(wanted, subsets=reference_subsets(labels, references.size, seed, wanted, subjects))


def bank_plan(
    b: int, queries: Iterable[int] | None = None, exclude: Sequence[int | Sequence[int] | None] | None = None
) -> ReferencePlan:
    """The plan of ``b >= 1`` new volumes scored against a reference bank only; ``exclude``: per new volume,
    the bank index (or indices: its subject's scans) of itself, or ``None``."""
    if b < 1:
        raise ValueError("no volumes to score against the reference bank")
    skips = (None,) * b if exclude is None else tuple(exclude)
    if len(skips) != b:
        raise ValueError(f"exclude has {len(skips)} entries for {b} volumes")
    return ReferencePlan(_wanted(b, queries), skips=skips)
