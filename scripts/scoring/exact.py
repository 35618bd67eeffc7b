"""Exact cross-subject mutual-similarity scores (paper Sec. 3.2, Eq. 1-2); :func:`mean_of_k_nearest` is
Eq. 2's mean for every scorer."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from scripts.scoring.blocks import (
    DEFAULT_BLOCK_ELEMENTS,
    DEFAULT_QUERY_TILE,
    pack_valid,
    query_tiles,
    sq_norms,
    workspace,
)

__all__ = [
    "check_inputs",
    "check_valid",
    "check_volumes",
    "empty_volumes_error",
    "exact_mean_of_k_nearest",
    "k_nearest",
    "mean_of_k_nearest",
    "mutual_similarity_scores",
    "neighbours_per_volume",
    "num_neighbours",
    "same_subject",
]


def num_neighbours(batch_size: int, rho: float) -> int:
    """``K = max(1, floor(rho * (B - 1)))`` of Eq. 2 (a 1e-9 tolerance guards the floor against rounding)."""
    if not 0.0 < rho <= 1.0:
        raise ValueError(f"rho must be in (0, 1], got {rho}")
    if batch_size < 2:
        raise ValueError(f"mutual-similarity scoring needs at least 2 volumes in the batch, got {batch_size}")
    return max(1, math.floor(rho * (batch_size - 1) + 1e-9))


def empty_volumes_error(empty: list[int], what: str = "valid token") -> ValueError:
    """The error for volumes that have nothing to score or to match."""
    return ValueError(
        f"volume(s) {empty} of the batch have no {what} (empty or all-background mask, or "
        f"delta too high): they can neither be scored nor serve as references"
    )


def check_valid(tokens: torch.Tensor, valid: torch.Tensor | None, what: str = "") -> torch.Tensor:
    """``valid [B, N]`` bool on the device of ``tokens [B, N, d]`` (all ``True`` for ``None``), checked;
    ``what`` prefixes the errors."""
    b, n, _ = tokens.shape
    if valid is None:
        return torch.ones(b, n, dtype=torch.bool, device=tokens.device)
    if valid.shape != (b, n):
        raise ValueError(f"{what}valid must be [B, N] = {(b, n)}, got {tuple(valid.shape)}")
    valid = valid.to(device=tokens.device, dtype=torch.bool)
    empty = torch.nonzero(valid.sum(dim=1) == 0).flatten().tolist()
    if empty:
        raise ValueError(what + str(empty_volumes_error(empty)))
    return valid


def check_inputs(tokens: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """:func:`check_valid` of a batch of ``B >= 2`` volumes."""
    if tokens.ndim != 3:
        raise ValueError(f"tokens must be [B, N, d], got shape {tuple(tokens.shape)}")
    if tokens.shape[0] < 2:
        raise ValueError(f"mutual-similarity scoring needs at least 2 volumes in the batch, got {tokens.shape[0]}")
    return check_valid(tokens, valid)


def check_volumes(volumes: Sequence[int] | None, b: int) -> list[int]:
    """The query volumes as ints (all ``b`` for ``None``), each checked to be in the batch."""
    if volumes is None:
        return list(range(b))
    out = [int(v) for v in volumes]
    bad = [v for v in out if not 0 <= v < b]
    if bad:
        raise ValueError(f"volumes {bad} are not in the batch of {b}")
    return out


def same_subject(groups: Sequence[object] | None, b: int) -> list[list[int]]:
    """Per volume, the *other* volumes of its subject (``groups[i]``: subject of volume ``i``)."""
    if groups is None:
        return [[] for _ in range(b)]
    groups = list(groups)
    if len(groups) != b:
        raise ValueError(f"groups must give one subject per volume: {len(groups)} for {b} volumes")
    members: dict[object, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    return [[j for j in members[g] if j != i] for i, g in enumerate(groups)]


def neighbours_per_volume(b: int, rho: float, same: Sequence[Sequence[int]]) -> list[int]:
    """``K`` of each volume over the references it has (``B - 1`` minus its subject's other scans)."""
    lonely = [i for i, s in enumerate(same) if b - len(s) < 2]
    if lonely:
        raise ValueError(
            f"volume(s) {lonely} have no reference: every other volume of the batch is a scan of the same subject"
        )
    return [num_neighbours(b - len(s), rho) for s in same]


def k_nearest(profile: torch.Tensor, k: int) -> torch.Tensor:
    """``[..., K]`` columns of the ``k`` smallest values of a ``[..., B]`` distance profile."""
    return profile.topk(k, dim=-1, largest=False).indices


def mean_of_k_nearest(
    queries: torch.Tensor,
    chosen: torch.Tensor,
    positions: torch.Tensor,
    lookup: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
) -> torch.Tensor:
    """Eq. 2: ``[Q, ...]`` fp32 mean over the ``K`` chosen volumes of each query's distance to its nearest
    token there, as ``|q - r|`` (the GEMM form's cancellation would keep identical anatomy off 0).

    Args:
        queries: ``[Q, ..., d]`` fp32 query tokens.
        chosen: ``[Q, ..., K]`` the chosen reference volumes of each query (:func:`k_nearest`).
        positions: ``[Q, ..., K]`` the position of the query's nearest token in each chosen volume.
        lookup: ``lookup(volumes, positions)`` -> reference tokens ``[..., K, d]`` (any float dtype).
        block_elements: element budget of the gathered references.
    """
    rows = max(1, block_elements // (2 * chosen.shape[-1] * queries[0].numel()))
    parts = []
    for start in range(0, queries.shape[0], rows):
        part = slice(start, start + rows)
        refs = lookup(chosen[part], positions[part]).float()
        parts.append((queries[part].unsqueeze(-2) - refs).norm(dim=-1).mean(dim=-1))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def exact_mean_of_k_nearest(
    queries: torch.Tensor,
    chosen: torch.Tensor,
    tokens: torch.Tensor,
    ref_sq_norms: torch.Tensor,
    index: torch.Tensor | None,
    block_elements: int,
) -> torch.Tensor:
    """``[Q]`` :func:`mean_of_k_nearest` at each query's nearest token in each chosen volume, found again by one
    fp32 GEMM per chosen volume for the queries that chose it.

    Args:
        queries: ``[Q, d]`` fp32.
        chosen: ``[Q, K]`` volumes of ``tokens [B, N, d]`` (any float dtype, any device).
        ref_sq_norms: ``[B, M]`` fp32 squared norms (``+inf`` where invalid), in ``index`` order.
        index: ``[B, M]`` packed token positions (:func:`scripts.scoring.blocks.pack_valid`) or ``None``.
    """
    found = torch.empty(chosen.shape, dtype=torch.long, device=queries.device)
    for v in chosen.unique().tolist():
        at, slot = torch.nonzero(chosen == v, as_tuple=True)
        packed = None if index is None else index[v].to(tokens.device)
        refs = tokens[v] if packed is None else tokens[v][packed]
        refs = refs.to(device=queries.device, dtype=torch.float32)
        rows = max(1, block_elements // max(1, refs.shape[0]))
        norms = ref_sq_norms[v].to(queries.device).unsqueeze(0)
        for r0 in range(0, at.numel(), rows):
            q = queries[at[r0 : r0 + rows]]
            nearest = torch.addmm(norms, q, refs.t(), alpha=-2.0).argmin(dim=1)
            if packed is not None:
                nearest = packed.to(queries.device)[nearest]
            found[at[r0 : r0 + rows], slot[r0 : r0 + rows]] = nearest

    def lookup(volumes: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
        return tokens[volumes.to(tokens.device), at.to(tokens.device)].to(queries.device)

    return mean_of_k_nearest(queries, chosen, found, lookup, block_elements)


class _PairBlocks:
    """Distance blocks of volume pairs in one canonical form: the block of ``a < b`` is a query tile of ``a``
    against ``b``'s packed tokens, ``(|p|^2 + |t|^2) - 2 p.t``; its row minima serve ``a``, its column
    minima ``b``, so both scoring orders give the same scores, bit for bit."""

    def __init__(self, tokens: torch.Tensor, valid: torch.Tensor, query_tile: int, block_elements: int) -> None:
        self.tokens = tokens
        self.index, self.norms = pack_valid(valid, sq_norms(tokens, valid))
        self.m = self.norms.shape[1]
        self.counts = valid.sum(dim=1).tolist()
        # Rows per tile: the block [tile, M] stays within the budget (and in cache), 64..query_tile.
        self.tile = max(1, min(int(query_tile), max(64, block_elements // max(1, self.m))))
        self.workspace = workspace(max(block_elements, self.tile * self.m), tokens.device)
        self.tiles = [  # per volume, the packed positions of its query tiles
            [slice(int(t[0]), int(t[-1]) + 1) for t in query_tiles(torch.arange(count), self.tile)]
            for count in self.counts
        ]
        self.block_elements = block_elements

    def refs(self, b: int) -> torch.Tensor:
        """``[M, d]`` fp32 packed tokens of volume ``b`` (its valid tokens first)."""
        t = self.tokens[b] if self.index is None else self.tokens[b][self.index[b]]
        return t.float()

    def block(self, p: torch.Tensor, a: int, rows: slice, b: int, refs_b: torch.Tensor) -> torch.Tensor:
        """``[rows, M]`` squared distances of ``a``'s packed rows to volume ``b``; a view of the workspace."""
        q = p[rows]
        out = self.workspace[: q.shape[0] * self.m].view(q.shape[0], self.m)
        torch.add(self.norms[a, rows].unsqueeze(1), self.norms[b].unsqueeze(0), out=out)
        return out.addmm_(q, refs_b.t(), alpha=-2.0)

    def scores(self, a: int, p: torch.Tensor, chosen: torch.Tensor, scores: torch.Tensor) -> None:
        """Eq. 2 for the valid tokens of volume ``a`` from their ``[count, K]`` chosen volumes, into ``scores``."""
        count = self.counts[a]
        got = exact_mean_of_k_nearest(p[:count], chosen, self.tokens, self.norms, self.index, self.block_elements)
        where = torch.arange(count, device=scores.device) if self.index is None else self.index[a, :count]
        scores[a, where] = got


def _scores_per_volume(
    pairs: _PairBlocks,
    volumes: Sequence[int],
    ks: Sequence[int],
    scores: torch.Tensor,
    same: Sequence[Sequence[int]],
    progress: Callable[[int], None],
) -> None:
    """Exact scores of each of ``volumes`` on its own (its subject's other scans stay ``+inf``)."""
    b = len(pairs.counts)
    for i in volumes:
        count = pairs.counts[i]
        p_i = pairs.refs(i)
        # [B, count]: each reference volume's minima are a contiguous row.
        profile = torch.full((b, count), float("inf"), dtype=torch.float32, device=scores.device)
        for a in range(i):
            if a not in same[i]:
                p_a = pairs.refs(a)
                for rows in pairs.tiles[a]:
                    col = pairs.block(p_a, a, rows, i, p_i).amin(dim=0)[:count]
                    torch.minimum(profile[a], col, out=profile[a])
            progress(1)
        for c in range(i + 1, b):
            if c not in same[i]:
                refs_c = pairs.refs(c)
                for rows in pairs.tiles[i]:
                    profile[c, rows] = pairs.block(p_i, i, rows, c, refs_c).amin(dim=1)
            progress(1)
        pairs.scores(i, p_i, k_nearest(profile.t(), ks[i]), scores)


def _scores_pair_symmetric(
    pairs: _PairBlocks,
    ks: Sequence[int],
    scores: torch.Tensor,
    same: Sequence[Sequence[int]],
    progress: Callable[[int], None],
) -> None:
    """Exact scores of every volume with one GEMM per volume pair: row minima complete the row volume's
    profile, column minima go into a running top-``k`` of each higher volume (``[B, M, k]``, not ``[B, M, B]``)."""
    b, m = len(pairs.counts), pairs.m
    k = max(ks)
    device = scores.device
    inf = float("inf")
    best = torch.full((b, m, k), inf, dtype=torch.float32, device=device)
    best_id = torch.zeros((b, m, k), dtype=torch.int16, device=device)
    for a in range(b):
        count = pairs.counts[a]
        p_a = pairs.refs(a)
        higher = list(range(a + 1, b))
        row_min = torch.empty((count, len(higher)), dtype=torch.float32, device=device)
        columns = torch.full((len(higher), m), inf, dtype=torch.float32, device=device)
        for j, c in enumerate(higher):
            if c in same[a]:
                row_min[:, j] = inf
            else:
                refs_c = pairs.refs(c)
                for rows in pairs.tiles[a]:
                    block = pairs.block(p_a, a, rows, c, refs_c)
                    row_min[rows, j] = block.amin(dim=1)
                    torch.minimum(columns[j], block.amin(dim=0), out=columns[j])
            progress(1)
        # Candidates: the k best lower volumes (complete: every lower volume has been a row side) and
        # every higher one; ids index the batch.
        values = torch.cat([best[a, :count], row_min], dim=1)
        ids = torch.cat(
            [best_id[a, :count].long(), torch.tensor(higher, dtype=torch.long, device=device).expand(count, -1)], dim=1
        )
        pairs.scores(a, p_a, ids.gather(1, k_nearest(values, ks[a])), scores)
        # Volume a is now a complete column of every higher volume's profile: keep their k best.
        for j, c in enumerate(higher):
            values = torch.cat([best[c], columns[j].unsqueeze(1)], dim=1)
            ids = torch.cat([best_id[c], torch.full((m, 1), a, dtype=torch.int16, device=device)], dim=1)
            keep = k_nearest(values, k)
            best[c] = values.gather(1, keep)
            best_id[c] = ids.gather(1, keep)


def mutual_similarity_scores(
    tokens: torch.Tensor,
    valid: torch.Tensor | None = None,
    rho: float = 0.1,
    query_tile: int = DEFAULT_QUERY_TILE,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
    volumes: Sequence[int] | None = None,
    groups: Sequence[object] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Exact mutual-similarity anomaly scores ``[B, N]`` (fp32, on the tokens' device) of Eq. 1-2, tiled.

    Args:
        tokens: ``[B, N, d]`` float tokens of ``B`` volumes (fp16/bf16 storage is accumulated in fp32).
        valid: ``[B, N]`` bool or ``None`` (all valid); an invalid token neither queries nor is matched (scores 0).
        rho: neighbour ratio, ``K = max(1, floor(rho * (B - 1)))``.
        query_tile, block_elements: query tokens per tile, elements of the largest intermediate block.
        volumes: score only these volumes (all stay references; the other rows stay 0). ``None``: all.
        groups: optional subject of each volume; scans of one subject are never references for each other.
        progress: ``progress(done, total)`` after each (query volume, reference volume) pair visited.
    """
    valid = check_inputs(tokens, valid)
    b, n, _ = tokens.shape
    same = same_subject(groups, b)
    ks = neighbours_per_volume(b, rho, same)
    wanted = check_volumes(volumes, b)
    pairs = _PairBlocks(tokens, valid, query_tile, block_elements)
    scores = torch.zeros(b, n, dtype=torch.float32, device=tokens.device)
    # The pair-symmetric order's [B, M, K] top-K store (fp32 + int16) must stay within 1/8 of the bank (or a block).
    store = b * pairs.m * max(ks) * 6
    bank_bytes = tokens.numel() * tokens.element_size()
    symmetric = set(wanted) == set(range(b)) and b < 2**15
    if symmetric and store <= max(bank_bytes // 8, 4 * block_elements):
        _scores_pair_symmetric(pairs, ks, scores, same, _counter(progress, b * (b - 1) // 2))
    else:
        _scores_per_volume(pairs, wanted, ks, scores, same, _counter(progress, len(wanted) * (b - 1)))
    return scores


def _counter(progress: Callable[[int, int], None] | None, total: int) -> Callable[[int], None]:
    """``step(n)``: ``n`` more volume pairs done, reported to ``progress(done, total)``."""
    done = 0

    def step(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    return step
