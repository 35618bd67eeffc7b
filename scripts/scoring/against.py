"""Eq. 1-2 against given references: a subset of the cohort (:func:`subset_scores`, ``random:N``) or a
fixed reference bank (:func:`reference_scores`, ``bank:DIR``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from scripts.scoring.blocks import (
    DEFAULT_BLOCK_ELEMENTS,
    DEFAULT_QUERY_TILE,
    distance_profile,
    excluded,
    pack_valid,
    query_tiles,
    sq_norms,
    workspace,
)
from scripts.scoring.exact import check_inputs, check_valid, exact_mean_of_k_nearest, k_nearest, num_neighbours

__all__ = ["reference_scores", "subset_scores"]


def _score_volume(
    out: torch.Tensor,
    queries: torch.Tensor,
    valid: torch.Tensor,
    references: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
    skip: int | Sequence[int] | None,
    k: int,
    sizes: tuple[int, int, torch.Tensor],
) -> None:
    """Eq. 1-2 of one volume's valid tokens (``queries [N, d]``) against ``references`` ``(tokens [R, N_ref, d],
    norms [R, M], index)`` but ``skip``, into ``out [N]``; ``sizes``: ``(query_tile, block_elements, workspace)``."""
    tokens, norms, index = references
    query_tile, block_elements, buffer = sizes
    for idx in query_tiles(torch.nonzero(valid).flatten(), query_tile):
        tile = queries[idx].float()
        profile = distance_profile(tile, tokens, norms, skip, block_elements, buffer, index)
        out[idx] = exact_mean_of_k_nearest(tile, k_nearest(profile, k), tokens, norms, index, block_elements)


def _check_reference_side(tokens: torch.Tensor, valid: torch.Tensor | None, what: str) -> torch.Tensor:
    """:func:`scripts.scoring.exact.check_valid` of one side of :func:`reference_scores` (``B >= 1``)."""
    if tokens.ndim != 3 or tokens.shape[0] < 1:
        raise ValueError(f"{what} tokens must be [B, N, d] with B >= 1, got shape {tuple(tokens.shape)}")
    return check_valid(tokens, valid, f"{what} ")


def _check_skips(exclude: Sequence[int | Sequence[int] | None] | None, bq: int, b_ref: int) -> list:
    """``exclude`` normalised to one entry (``None``, an index or a list) per query volume."""
    skips = [None] * bq if exclude is None else list(exclude)
    skips = [e if e is None else int(e) if isinstance(e, int) else [int(v) for v in e] for e in skips]
    if len(skips) != bq or any(not 0 <= e < b_ref for s in skips for e in excluded(s)):
        raise ValueError(f"exclude must give None or reference indices in [0, {b_ref}) per query volume")
    lonely = [i for i, s in enumerate(skips) if b_ref - len(excluded(s)) < 1]
    if lonely:
        raise ValueError(f"query volume(s) {lonely} have no reference: the bank holds only the volume itself")
    return skips


def reference_scores(
    queries: torch.Tensor,
    query_valid: torch.Tensor | None,
    references: torch.Tensor,
    reference_valid: torch.Tensor | None = None,
    rho: float = 0.1,
    exclude: Sequence[int | Sequence[int] | None] | None = None,
    query_tile: int = DEFAULT_QUERY_TILE,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
) -> torch.Tensor:
    """Mutual-similarity scores of new volumes against reference volumes only (Eq. 1-2), with
    ``K = max(1, floor(rho * R))`` over each query's ``R`` references; the bank is streamed group by group.

    Args:
        queries, query_valid: ``[B_q, N, d]`` new volumes (any float dtype), ``[B_q, N]`` bool or ``None``.
        references, reference_valid: ``[B_ref, N_ref, d]`` (any float dtype and device), ``[B_ref, N_ref]`` or ``None``.
        exclude: per query volume, the index (or indices: its subject's scans) of itself in the bank, or ``None``.
        rho, query_tile, block_elements: as in :func:`scripts.scoring.exact.mutual_similarity_scores`.

    Returns:
        ``[B_q, N]`` fp32 scores on the device of ``queries`` (0 for invalid query tokens).
    """
    query_valid = _check_reference_side(queries, query_valid, "query")
    reference_valid = _check_reference_side(references, reference_valid, "reference")
    bq, n, d = queries.shape
    b_ref, _, d_ref = references.shape
    if d_ref != d:
        raise ValueError(f"queries have d={d} but the references have d={d_ref}")
    skips = _check_skips(exclude, bq, b_ref)
    index, norms = pack_valid(reference_valid, sq_norms(references, reference_valid))
    scores = torch.zeros(bq, n, dtype=torch.float32, device=queries.device)
    buffer = workspace(max(block_elements, min(query_tile, n) * norms.shape[1]), queries.device)
    for i in range(bq):
        # R references: all of the bank, or all but the query volume itself (or its subject's scans).
        k = num_neighbours(b_ref - len(excluded(skips[i])) + 1, rho)
        sizes = (query_tile, block_elements, buffer)
        _score_volume(scores[i], queries[i], query_valid[i], (references, norms, index), skips[i], k, sizes)
    return scores


def subset_scores(
    tokens: torch.Tensor,
    valid: torch.Tensor | None,
    references: Mapping[int, Sequence[int]],
    rho: float = 0.1,
    query_tile: int = DEFAULT_QUERY_TILE,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
) -> torch.Tensor:
    """``[B, N]`` fp32 scores of each query volume ``i`` against its own references, as the exact scorer
    scores volume 0 of the batch ``[i, *references[i]]``.

    Args:
        tokens, valid: ``[B, N, d]`` (any float dtype), ``[B, N]`` bool or ``None``.
        references: ``{query volume: reference volumes}``; volumes not in it score 0.
        rho, query_tile, block_elements: as in :func:`scripts.scoring.exact.mutual_similarity_scores`.
    """
    valid = check_inputs(tokens, valid)
    b, n, d = tokens.shape
    plan = {int(i): [int(j) for j in refs] for i, refs in references.items()}
    for i, refs in plan.items():
        if not refs or i in refs or any(not 0 <= j < b for j in [i, *refs]):
            raise ValueError(f"volume {i}: references must be other volumes of the batch of {b}, got {refs}")
    packed, norms = pack_valid(valid, sq_norms(tokens, valid))
    scores = torch.zeros(b, n, dtype=torch.float32, device=tokens.device)
    if not plan:
        return scores
    gathered = torch.empty((max(map(len, plan.values())), n, d), dtype=tokens.dtype, device=tokens.device)
    buffer = workspace(max(block_elements, min(query_tile, n) * norms.shape[1]), tokens.device)
    sizes = (query_tile, block_elements, buffer)
    for i, refs in plan.items():
        index = torch.tensor(refs, device=tokens.device)
        subset = gathered[: len(refs)]
        torch.index_select(tokens, 0, index, out=subset)
        subset_packed = None if packed is None else packed.index_select(0, index)
        k = num_neighbours(len(refs) + 1, rho)
        _score_volume(
            scores[i], tokens[i], valid[i], (subset, norms.index_select(0, index), subset_packed), None, k, sizes
        )
    return scores
