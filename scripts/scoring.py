"""Cross-subject mutual-similarity scoring (paper Sec. 3.2, Eq. 1-2).

Pure tensor code: no files, no encoders. Every token of every volume is scored by its distance to
its nearest token in each *other* volume of the batch; the anomaly score is the mean of the
``K = max(1, floor(rho * (B - 1)))`` smallest of those ``B - 1`` distances.

Memory: the ``B x N x B x N`` distance tensor is never formed. Queries are processed one volume and
one block of ``query_tile`` tokens at a time against groups of reference volumes; each group is one
batched GEMM in the ``|a|^2 + |b|^2 - 2 a.b`` form and is immediately reduced to a per
(query, reference volume) minimum. Extra memory is therefore ``O(query_tile x ref_budget)`` plus the
``[query_tile, B]`` profile, independent of how many tokens the batch holds.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

__all__ = ["num_neighbours", "mutual_similarity_scores", "nearest_distance_profile"]

# Elements of the largest intermediate [G, N, query_tile] block (fp32): 2^24 -> 64 MiB.
DEFAULT_BLOCK_ELEMENTS = 1 << 24
DEFAULT_QUERY_TILE = 1024


def num_neighbours(batch_size: int, rho: float) -> int:
    """``K = max(1, floor(rho * (B - 1)))`` of Eq. 2.

    A tiny tolerance guards the floor against binary rounding (``0.29 * 100 = 28.999...``).
    """
    if not 0.0 < rho <= 1.0:
        raise ValueError(f"rho must be in (0, 1], got {rho}")
    if batch_size < 2:
        raise ValueError(f"mutual-similarity scoring needs at least 2 volumes in the batch, got {batch_size}")
    return max(1, math.floor(rho * (batch_size - 1) + 1e-9))


def _check_inputs(tokens: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    if tokens.ndim != 3:
        raise ValueError(f"tokens must be [B, N, d], got shape {tuple(tokens.shape)}")
    b, n, _ = tokens.shape
    if b < 2:
        raise ValueError(f"mutual-similarity scoring needs at least 2 volumes in the batch, got {b}")
    if valid is None:
        return torch.ones(b, n, dtype=torch.bool, device=tokens.device)
    if valid.shape != (b, n):
        raise ValueError(f"valid must be [B, N] = {(b, n)}, got {tuple(valid.shape)}")
    valid = valid.to(device=tokens.device, dtype=torch.bool)
    counts = valid.sum(dim=1)
    empty = torch.nonzero(counts == 0).flatten().tolist()
    if empty:
        raise ValueError(
            f"volume(s) {empty} of the batch have no valid token (empty or all-background mask, or "
            f"delta too high): they can neither be scored nor serve as references"
        )
    return valid


def _group_ranges(b: int, exclude: int, group: int) -> Iterator[tuple[int, int]]:
    """Contiguous ranges of reference volumes, ``group`` at a time, skipping volume ``exclude``."""
    for lo, hi in ((0, exclude), (exclude + 1, b)):
        for start in range(lo, hi, group):
            yield start, min(start + group, hi)


def nearest_distance_profile(
    queries: torch.Tensor,
    tokens: torch.Tensor,
    ref_sq_norms: torch.Tensor,
    exclude: int,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
) -> torch.Tensor:
    """Squared distance of each query to its nearest token in every reference volume (Eq. 1).

    Args:
        queries: ``[Q, d]`` float32 query tokens.
        tokens: ``[B, N, d]`` reference token bank (any float dtype; cast to fp32 per block).
        ref_sq_norms: ``[B, N]`` fp32 squared norms of the references, ``+inf`` for invalid tokens
            so that they are never the nearest.
        exclude: index of the query's own volume; its column is ``+inf``.
        block_elements: budget for the ``[G, N, Q]`` intermediate; sets the group size ``G``.

    Returns:
        ``(d2, index)``: ``[Q, B]`` fp32 squared nearest distances in the GEMM form (not clamped,
        self column ``+inf``) and ``[Q, B]`` int64 index of that nearest token in each volume.
    """
    b, n, _ = tokens.shape
    nq = queries.shape[0]
    group = max(1, block_elements // max(1, n * nq))
    profile = torch.full((nq, b), float("inf"), dtype=torch.float32, device=queries.device)
    nearest = torch.zeros((nq, b), dtype=torch.long, device=queries.device)
    q_sq = queries.pow(2).sum(dim=1)
    q_t = queries.t().contiguous()
    for start, stop in _group_ranges(b, exclude, group):
        refs = tokens[start:stop].to(device=queries.device, dtype=torch.float32)
        norms = ref_sq_norms[start:stop].to(queries.device).unsqueeze(-1)  # [G, N, 1]
        # |r|^2 - 2 r.q for every (reference token, query) pair of the group in one batched GEMM.
        d2 = torch.baddbmm(norms, refs, q_t.expand(stop - start, -1, -1), alpha=-2.0)  # [G, N, Q]
        best = d2.min(dim=1)
        profile[:, start:stop] = best.values.t()
        nearest[:, start:stop] = best.indices.t()
    return profile + q_sq.unsqueeze(1), nearest


def mutual_similarity_scores(
    tokens: torch.Tensor,
    valid: torch.Tensor | None = None,
    rho: float = 0.1,
    query_tile: int = DEFAULT_QUERY_TILE,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
) -> torch.Tensor:
    """Exact mutual-similarity anomaly scores (Eq. 1-2), tiled.

    Args:
        tokens: ``[B, N, d]`` float tokens of ``B`` volumes (fp16/bf16 storage is accumulated in fp32).
        valid: ``[B, N]`` bool, or ``None`` for all valid. An invalid token neither queries nor is
            matched, and scores 0.
        rho: neighbour ratio, ``K = max(1, floor(rho * (B - 1)))``.
        query_tile: number of query tokens processed together.
        block_elements: element budget of the largest intermediate block (see module docstring).

    Returns:
        ``[B, N]`` fp32 scores on the device of ``tokens``.

    Raises:
        ValueError: ``B < 2``, bad shapes, bad ``rho``, or a volume without any valid token.
    """
    valid = _check_inputs(tokens, valid)
    b, n, _ = tokens.shape
    k = num_neighbours(b, rho)
    # Per volume, so that an fp16 bank is never copied whole to fp32.
    ref_sq_norms = torch.stack([t.float().pow(2).sum(dim=-1) for t in tokens])
    ref_sq_norms = ref_sq_norms.masked_fill(~valid, float("inf"))
    scores = torch.zeros(b, n, dtype=torch.float32, device=tokens.device)
    for i in range(b):
        query_index = torch.nonzero(valid[i]).flatten()
        for start in range(0, query_index.numel(), query_tile):
            idx = query_index[start : start + query_tile]
            queries = tokens[i, idx].float()
            d2, nearest = nearest_distance_profile(queries, tokens, ref_sq_norms, i, block_elements)
            volumes = d2.topk(k, dim=1, largest=False).indices  # [Q, K]
            # The GEMM form loses ~sqrt(eps)*|v| to cancellation near zero distance; recompute the K
            # chosen distances directly (Q*K*d work) so that identical anatomy scores exactly 0.
            refs = tokens[volumes, nearest.gather(1, volumes)].float()  # [Q, K, d]
            scores[i, idx] = (queries.unsqueeze(1) - refs).norm(dim=-1).mean(dim=1)
    return scores
