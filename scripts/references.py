"""Which volumes a query volume is scored against: the reference set, chosen by one config key.

The paper scores every volume against all the other volumes of its batch. Everything else that picks
other references is one concept here, :class:`ReferenceSet`, set by the bundle's ``references`` key:

* ``"all"`` (default, the paper): every other volume of the cohort.
* ``"chunks:N"``: the paper's batch-size ablation (Sec. 5.1, Table 8), see :func:`chunk_ranges`.
* ``"random:N"``: ``N`` references per volume drawn from the others, see :func:`reference_subsets`.
* ``"bank:DIR"``: a saved reference bank (``configs/build_bank.json``); new volumes are scored against
  the bank's volumes only, never against each other.

:func:`score_with_references` runs the cohort-internal modes on a :class:`scripts.batch_scorer.BatchScorer`;
the bank mode needs the bank's tokens, which the engine loads (:mod:`scripts.storage.bank`) and passes
to :meth:`scripts.inferer.CS3FInferer.score_references`. Selection is pure bookkeeping on volume indices
and names:

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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scripts.batch_scorer import BatchScorer, TokenScores
from scripts.errors import CS3FInputError
from scripts.tokens import FINE_SUFFIX, VolumeTokens

__all__ = [
    "MODES",
    "REPLACED_KEYS",
    "ReferenceSet",
    "check_bank_grids",
    "chunk_ranges",
    "reference_subsets",
    "reject_replaced_keys",
    "score_with_references",
]

MODES = ("all", "chunks", "random", "bank")
#: config keys the ``references`` key replaced, with the new spelling
REPLACED_KEYS = {"chunk_size": "chunks:N", "n_references": "random:N", "reference_bank": "bank:DIR"}


@dataclass(frozen=True)
class ReferenceSet:
    """The references of each query volume.

    Attributes:
        mode: one of :data:`MODES`.
        size: ``chunks``: volumes per chunk (``>= 2``); ``random``: references per volume (``>= 1``).
        folder: ``bank``: the bank folder.
    """

    mode: str = "all"
    size: int | None = None
    folder: str | None = None

    @classmethod
    def parse(cls, value: ReferenceSet | str | Mapping | None) -> ReferenceSet:
        """From ``None``/``"all"``, ``"chunks:N"``, ``"random:N"``, ``"bank:DIR"`` or a dict of the fields.

        Raises:
            CS3FInputError: one line naming the bad value and the accepted forms.
        """
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


def reject_replaced_keys(**values: object) -> None:
    """Stop with one line when a config key that ``references`` replaced is still set."""
    for key, value in values.items():
        if value is not None:
            raise CS3FInputError(
                f"{key} was replaced by the references key: use --references {REPLACED_KEYS[key]} "
                f"(e.g. --references {REPLACED_KEYS[key].split(':')[0]}:{value})"
            )


def chunk_ranges(b: int, chunk_size: int) -> list[tuple[int, int]]:
    """Consecutive ``(start, stop)`` chunks of ``b`` volumes for a target ``chunk_size``.

    ``max(1, b // chunk_size)`` chunks of as equal size as possible (the first ``b mod n_chunks`` one
    larger): every chunk has at least ``chunk_size`` volumes (so never a lone volume) and fewer than
    ``2 * chunk_size``; when ``chunk_size`` divides ``b`` they are exactly ``chunk_size``, as in the
    paper's equal-sized chunks. ``b <= chunk_size``: one chunk, the whole cohort.
    """
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
        subjects: optional subject per volume; the other scans of a query's subject are never drawn
            (the draw is then over the volumes of other subjects, ``min(n, count)`` of them).

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


def score_with_references(
    scorer: BatchScorer,
    bank: Sequence[VolumeTokens],
    references: ReferenceSet,
    seed: int = 0,
    queries: Sequence[int] | None = None,
    names: Sequence[str] | None = None,
    subjects: Sequence[object] | None = None,
) -> TokenScores:
    """Token scores of ``queries`` (default: all) of ``bank`` against their references within ``bank``.

    ``all``: the exact scorer on the whole batch. ``chunks``: each chunk scored on its own.
    ``random``: each volume against the batch of itself and its references (CS3F-C in one pass per
    key; F/MS one batch per query). ``names`` seed the random draw so that it does not depend on the
    order of ``bank`` (default: the positions). ``subjects`` (one per volume): the other scans of a
    volume's subject are never its references, in every mode.
    """
    if references.mode == "bank":
        raise ValueError("a reference bank is scored with CS3FInferer.score_references")
    b = len(bank)
    if references.mode == "all" or (references.mode == "random" and subjects is None and references.size >= b - 1):
        return scorer.exact(bank, queries, subjects)  # every other volume is a reference: exact
    if b < 2:
        raise ValueError(f"CS3F scores volumes against each other: need at least 2 volumes, got {b}")
    wanted = list(range(b)) if queries is None else sorted({int(i) for i in queries})
    if references.mode == "chunks":
        jobs = []
        for lo, hi in chunk_ranges(b, references.size):
            mine = [i - lo for i in wanted if lo <= i < hi]
            if mine:
                jobs.append((list(range(lo, hi)), mine))
        return _score_jobs(scorer, bank, jobs, "chunk", subjects)
    labels = [str(i) for i in range(b)] if names is None else list(names)
    if len(labels) != b:
        raise ValueError(f"got {len(labels)} names for {b} volumes")
    subsets = reference_subsets(labels, references.size, seed, wanted, subjects)
    if scorer.variant == "C":
        return scorer.subsets(bank, subsets)
    return _score_jobs(scorer, bank, [([i, *subsets[i]], [0]) for i in wanted], "volume")


def _score_jobs(
    scorer: BatchScorer,
    bank: Sequence[VolumeTokens],
    jobs: list[tuple[list[int], list[int]]],
    what: str,
    subjects: Sequence[object] | None = None,
) -> TokenScores:
    """Score each job ``(members, local queries)`` as its own batch; one progress bar over the jobs."""
    results: TokenScores = [{} for _ in bank]
    progress, scorer.progress = scorer.progress, False
    try:
        iterator: Iterable = jobs
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(jobs, desc=f"scoring ({what}s)", unit=what)
        for members, local in iterator:
            groups = None if subjects is None else [subjects[j] for j in members]
            scored = scorer.exact([bank[j] for j in members], local, groups)
            for j in local:  # a copy: a view would keep the job's whole score grid alive
                results[members[j]] = {k: v.clone() for k, v in scored[j].items()}
    finally:
        scorer.progress = progress
    return results


def check_bank_grids(
    references: Mapping[str, tuple[torch.Tensor, torch.Tensor]], bank: Sequence[VolumeTokens], d: int
) -> None:
    """Raise ``ValueError`` unless every grid of every new volume matches the reference bank's."""
    for key in bank[0].grids:
        if key not in references:
            fine = " (fine tokens: build the bank with variant F or MS)" if key.endswith(FINE_SUFFIX) else ""
            raise ValueError(f"the reference bank has no {key!r} tokens{fine}; it has {sorted(references)}")
        n_ref = references[key][0].shape[1]
        for i, vt in enumerate(bank):
            grid = vt.grids.get(key)
            if grid is None or grid.valid.numel() != n_ref or grid.tokens.shape[-1] != d:
                got = "missing" if grid is None else f"{tuple(grid.shape)} x d={grid.tokens.shape[-1]}"
                raise ValueError(
                    f"volume {i}: {key} token grid {got} does not match the reference bank's "
                    f"{n_ref} tokens x d={references[key][0].shape[-1]}: volumes must be on its grid"
                )
