"""Which volumes score against which: batch chunking (paper Sec. 5.1, Table 8) and random reference
subsets, the two ways of keeping cross-subject scoring affordable on a large cohort (issue 9).

Pure bookkeeping on volume indices and names; the scoring itself is :mod:`scripts.scoring`, wired by
:meth:`scripts.inferer.CS3FInferer.score`.

* :func:`chunk_ranges` - the paper's ablation: the cohort, in datalist order, cut into consecutive
  chunks that are scored independently (a volume's references are the other volumes of its chunk).
  Cost ``O(B * chunk_size)``; a chunk's quality depends on its size (Table 8: >= 30 volumes).
* :func:`reference_subsets` - what this project recommends instead: every query volume is scored
  against ``n`` references drawn from all the others. Cost ``O(B * n)`` too, but the draw is
  per query, so no volume is stuck in an unlucky chunk (e.g. one holding many lesions at one site),
  and it does not depend on the datalist order: the ``n`` references of query ``q`` are the other
  volumes with the ``n`` smallest values of a 64-bit hash of ``(seed, q, reference)`` names.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["chunk_ranges", "reference_subsets"]


def chunk_ranges(b: int, chunk_size: int) -> list[tuple[int, int]]:
    """Consecutive ``(start, stop)`` chunks of ``b`` volumes for a target ``chunk_size``.

    ``max(1, b // chunk_size)`` chunks of as equal size as possible (the first ``b mod n_chunks`` one
    larger): every chunk has at least ``chunk_size`` volumes (so never a lone volume) and fewer than
    ``2 * chunk_size``; when ``chunk_size`` divides ``b`` they are exactly ``chunk_size``, as in the
    paper's equal-sized chunks. ``b <= chunk_size``: one chunk, the whole cohort.
    """
    if isinstance(chunk_size, bool) or int(chunk_size) != chunk_size or chunk_size < 2:
        raise ValueError(
            f"chunk_size must be an int >= 2 (volumes per independently scored chunk), got {chunk_size}"
        )
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
    names: Sequence[str], n: int, seed: int = 0, queries: Iterable[int] | None = None
) -> dict[int, list[int]]:
    """For each query volume, the indices of its ``n`` references among the other volumes.

    The references of ``names[i]`` are the ``min(n, B - 1)`` other volumes with the smallest
    ``mix(h(seed, names[i]) * phi + h(seed, name))`` (``h``: sha256 of the name, once per volume;
    ``mix``: splitmix64), listed in name order. So the subsets are seeded, reproducible, and depend
    only on the set of names, not on the order of the datalist. Work: ``O(B)`` vectorised per query.

    Args:
        names: unique volume names (the workflow passes the image stems).
        n: references per query volume, ``>= 1``.
        seed: seed of the draw.
        queries: the query indices wanted (default: all).

    Returns:
        ``{query index: [reference indices, in name order]}``.
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
    take = min(int(n), b - 1)
    out: dict[int, list[int]] = {}
    for i in range(b) if queries is None else queries:
        i = int(i)
        keys = _mix(hashes[i : i + 1] * _GOLDEN + hashes)
        others = np.delete(np.arange(b), i)
        keys = np.delete(keys, i)
        if take < b - 1:
            others = others[np.argpartition(keys, take - 1)[:take]]
        out[i] = sorted(others.tolist(), key=lambda j: rank[j])
    return out
