"""Several processes (``torchrun``, ``configs/multi_gpu_inference.json``) giving one process's outputs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from scripts.tokens import TokenGrid, VolumeTokens

__all__ = ["broadcast", "dataset_order", "gather_cohort", "gather_scores", "world"]


def world() -> tuple[int, int]:
    """``(rank, world size)`` of this process; ``(0, 1)`` without ``torch.distributed``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def dataset_order(data_loader: Any) -> list[str] | None:
    """The volume names of the loader's datalist, in order, if its rows are named."""
    data = getattr(getattr(data_loader, "dataset", None), "data", None)
    if isinstance(data, Sequence) and all(isinstance(r, dict) and "name" in r for r in data):
        return [r["name"] for r in data]
    return None


def _all_gather(local: Any) -> list:
    gathered: list = [None] * world()[1]
    torch.distributed.all_gather_object(gathered, local)
    return gathered


def broadcast(value: Any) -> Any:
    """Rank 0's ``value``, on every rank."""
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _compact(bank: Mapping[str, Mapping[str, VolumeTokens]]) -> dict[str, dict[str, VolumeTokens]]:
    """Copies of every grid (a grid is a view of a BatchBuffer row: pickled, it would send the whole buffer)."""

    def copy(vt: VolumeTokens) -> VolumeTokens:
        return VolumeTokens(
            vt.spatial_shape, {k: TokenGrid(g.tokens.clone(), g.valid.clone()) for k, g in vt.grids.items()}
        )

    return {part: {n: copy(vt) for n, vt in volumes.items()} for part, volumes in bank.items()}


def gather_cohort(
    names: list[str],
    bank: Mapping[str, Mapping[str, VolumeTokens]],
    skipped: list[dict],
    counts: Mapping[str, int],
    sources: Mapping[str, str],
    order: Sequence[str] | None = None,
    subjects: Mapping[str, tuple[str, str]] | None = None,
) -> tuple[list[str], dict, list[dict], dict[str, int], dict[str, str], dict[str, tuple[str, str]]]:
    """All-gather every rank's volumes so that each rank sees the whole cohort as references.

    Args:
        names, bank, counts, sources, subjects: this rank's volumes, tokens ``{part: {name: VolumeTokens}}``,
            ``{"encoded": n, "cached": n}``, ``{name: source sha256}`` and ``{name: (subject, voxel sha256)}``.
        skipped: volumes left out (the datalist's, the same on every rank, and this rank's own).
        order: the single-process order of the names (:func:`dataset_order`), for identical tables.

    Returns:
        ``(names, bank, skipped, counts, sources, subjects)`` of the whole cohort.
    """
    local = {"names": names, "bank": _compact(bank), "skipped": skipped, "counts": counts, "sources": sources}
    local["subjects"] = dict(subjects or {})
    gathered = _all_gather(local)
    all_names = [n for g in gathered for n in g["names"]]
    if order is not None:
        position = {n: i for i, n in enumerate(order)}
        all_names.sort(key=lambda n: position.get(n, len(position)))
    all_bank = {part: {n: b for g in gathered for n, b in g["bank"].get(part, {}).items()} for part in bank}
    all_skipped = [s for g in gathered for s in g["skipped"] if s not in skipped] + list(skipped)
    all_counts = {k: sum(g["counts"][k] for g in gathered) for k in counts}
    all_sources = {n: s for g in gathered for n, s in g["sources"].items()}
    all_subjects = {n: s for g in gathered for n, s in g["subjects"].items()}
    return all_names, all_bank, all_skipped, all_counts, all_sources, all_subjects


def gather_scores(
    scores: Mapping[str, dict[str, float]], seconds: Mapping[str, float], registration: Mapping[str, dict]
) -> tuple[dict[str, dict[str, float]], dict[str, float], dict[str, dict]]:
    """Every rank's subject scores and registrations, and the longest time any rank spent in each stage."""
    gathered = _all_gather({"scores": scores, "seconds": seconds, "registration": registration})
    all_scores = {n: v for g in gathered for n, v in g["scores"].items()}
    all_registration = {n: v for g in gathered for n, v in g["registration"].items()}
    return all_scores, {k: max(g["seconds"][k] for g in gathered) for k in seconds}, all_registration
