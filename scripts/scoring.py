"""Cross-subject mutual-similarity scoring (paper Sec. 3.2, Eq. 1-2) and coarse-to-fine routing
(Sec. 3.5-3.6, Eq. 6-7).

Pure tensor code: no files, no encoders. Every token of every volume is scored by its distance to
its nearest token in each *other* volume of the batch; the anomaly score is the mean of the
``K = max(1, floor(rho * (B - 1)))`` smallest of those ``B - 1`` distances.

* :func:`mutual_similarity_scores` - exact, exhaustive scoring of one token set.
* :func:`c2f_scores` - coarse scores (exact) and fine scores by coarse-to-fine routing: the coarse
  distance pass that yields the coarse scores also keeps, per query coarse token and reference
  volume, its ``L`` nearest coarse tokens; each fine child is matched only against the fine children
  of those (Eq. 6).

Memory: the ``B x N x B x N`` distance tensor is never formed. Queries are processed one volume and
one block of ``query_tile`` tokens at a time against groups of reference volumes; each group is one
batched GEMM in the ``|a|^2 + |b|^2 - 2 a.b`` form and is immediately reduced to a per
(query, reference volume) minimum (and, for C2F, top-``L`` routing indices that live only as long as
that block). Extra memory is therefore ``O(query_tile x ref_budget)`` plus the ``[query_tile, B]``
profile, independent of how many tokens the batch holds.

Work: the exact scorers multiply only valid reference tokens. Each reference block is gathered at
the positions of its volumes' valid tokens (:func:`_pack_valid`, padded to the largest valid count),
so with brain or lung masks the GEMM and the min shrink to the masked fraction of the grid.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import torch
from scripts.mixed_precision import ROW_BUCKET, LowPrecisionBlocks, kth_smallest, resolve_precision, spec_of

__all__ = [
    "num_neighbours",
    "mutual_similarity_scores",
    "nearest_distance_profile",
    "c2f_scores",
    "c2f_tiles",
    "reference_scores",
    "subset_scores",
]

# Elements of the largest intermediate block (fp32): 2^21 -> 8 MiB. Small enough that the GEMM's
# output is still in cache when the min reads it back (a much larger block goes through DRAM twice;
# docs/performance.md has the measurements), large enough to amortise the per-block calls.
DEFAULT_BLOCK_ELEMENTS = 1 << 21
DEFAULT_QUERY_TILE = 1024
DEFAULT_ROUTES = 16
# precision="auto" takes the reduced-precision pass only when volumes have at least this many valid
# tokens: below, the blocks are so small that per-call costs dominate (docs/performance.md).
AUTO_MIN_TOKENS = 256
# Elements of the reused buffer of gathered C2F fine candidates on the CPU (see _candidate_elements).
CANDIDATE_ELEMENTS = 1 << 21


def num_neighbours(batch_size: int, rho: float) -> int:
    """``K = max(1, floor(rho * (B - 1)))`` of Eq. 2.

    A tiny tolerance guards the floor against binary rounding (``0.29 * 100 = 28.999...``).
    """
    if not 0.0 < rho <= 1.0:
        raise ValueError(f"rho must be in (0, 1], got {rho}")
    if batch_size < 2:
        raise ValueError(f"mutual-similarity scoring needs at least 2 volumes in the batch, got {batch_size}")
    return max(1, math.floor(rho * (batch_size - 1) + 1e-9))


def _empty_volumes_error(empty: list[int], what: str = "valid token") -> ValueError:
    return ValueError(
        f"volume(s) {empty} of the batch have no {what} (empty or all-background mask, or "
        f"delta too high): they can neither be scored nor serve as references"
    )


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
    empty = torch.nonzero(valid.sum(dim=1) == 0).flatten().tolist()
    if empty:
        raise _empty_volumes_error(empty)
    return valid


def _check_volumes(volumes: Sequence[int] | None, b: int) -> list[int]:
    if volumes is None:
        return list(range(b))
    out = [int(v) for v in volumes]
    bad = [v for v in out if not 0 <= v < b]
    if bad:
        raise ValueError(f"volumes {bad} are not in the batch of {b}")
    return out


def _sq_norms(tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """fp32 squared norms over the last dim, ``+inf`` where invalid (never a nearest neighbour).

    Computed a few volumes at a time through one reused fp32 buffer (at most 4 MiB), so that an
    fp16 or memory-mapped bank is never copied whole to fp32 - not even as freed heap: one fp32
    temporary per volume, interleaved with the small results, fragments glibc's heap and keeps about
    the bank's fp32 size resident.
    """
    b = tokens.shape[0]
    norms = torch.empty(tokens.shape[:-1], dtype=torch.float32, device=tokens.device)
    group = max(1, min(b, (1 << 20) // max(1, tokens[0].numel())))
    buffer = torch.empty((group, *tokens.shape[1:]), dtype=torch.float32, device=tokens.device)
    for start in range(0, b, group):
        stop = min(start + group, b)
        chunk = buffer[: stop - start]
        chunk.copy_(tokens[start:stop])
        norms[start:stop] = torch.einsum("...d,...d->...", chunk, chunk)
    return norms.masked_fill_(~valid, float("inf"))


def _excluded(exclude: int | Sequence[int] | None) -> list[int]:
    """The excluded reference volumes, sorted: none, one volume, or several (one subject's scans)."""
    if exclude is None:
        return []
    return sorted({int(exclude)}) if isinstance(exclude, int) else sorted({int(e) for e in exclude})


def _group_ranges(b: int, exclude: int | Sequence[int] | None, group: int) -> Iterator[tuple[int, int]]:
    """Contiguous ranges of reference volumes, ``group`` at a time, skipping the volumes ``exclude``
    (the query's own volume, or every scan of its subject; ``None``: skip none, e.g. a query scored
    against a separate reference bank)."""
    lo = 0
    for skip in [*_excluded(exclude), b]:
        for start in range(lo, skip, group):
            yield start, min(start + group, skip)
        lo = skip + 1


def _same_subject(groups: Sequence[object] | None, b: int) -> list[list[int]]:
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


def _neighbours_per_volume(b: int, rho: float, same: Sequence[Sequence[int]]) -> list[int]:
    """``K`` of each volume: Eq. 2 over the references it actually has (``B - 1`` minus the other
    scans of its subject)."""
    lonely = [i for i, s in enumerate(same) if b - len(s) < 2]
    if lonely:
        raise ValueError(
            f"volume(s) {lonely} have no reference: every other volume of the batch is a scan of the same subject"
        )
    return [num_neighbours(b - len(s), rho) for s in same]


def _workspace(elements: int, device: torch.device) -> torch.Tensor:
    """A flat fp32 buffer reused by every block of a scorer call.

    On the CPU a fresh block above glibc's mmap threshold (at most 32 MiB) is page-faulted in on
    every allocation, which costs about as much as the GEMM that fills it; one reused buffer does not.
    """
    return torch.empty(elements, dtype=torch.float32, device=device)


def _pack_valid(valid: torch.Tensor, sq_norms: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Positions of each volume's valid tokens, valid first, for GEMMs over valid references only.

    Returns ``(index [B, M], packed_norms [B, M])`` with ``M`` the largest valid count: row ``b`` of
    ``index`` lists volume ``b``'s valid token positions in order, padded with positions of its
    invalid tokens, whose ``+inf`` norms keep them from ever being the nearest. With masks most
    reference tokens are background (docs/performance.md), and multiplying them only to discard
    the result would be most of the scorer's work. ``(None, sq_norms)`` when every token
    is valid: nothing to skip, and the bank is then read in place.
    """
    if bool(valid.all()):
        return None, sq_norms
    m = int(valid.sum(dim=1).max())
    # A stable sort of the invalid flag puts valid tokens first and keeps their order.
    index = torch.argsort((~valid).to(torch.uint8), dim=1, stable=True)[:, :m]
    return index, sq_norms.gather(1, index)


def _reference_blocks(
    queries: torch.Tensor,
    tokens: torch.Tensor,
    ref_sq_norms: torch.Tensor,
    exclude: int | Sequence[int] | None,
    group: int,
    workspace: torch.Tensor | None = None,
    index: torch.Tensor | None = None,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``(start, stop, d2)`` per group of reference volumes, ``d2 [G, Q, M] = |r|^2 - 2 q.r`` (fp32).

    One batched GEMM per group; the reduction over reference tokens is then along the contiguous last
    dim (a min or a top-L there is several times cheaper than across the middle dim). With a
    ``workspace`` of at least ``group * Q * M`` elements, ``d2`` is a view of it, valid until the next
    block is requested. With ``index`` (:func:`_pack_valid`), volume ``b`` is read at the ``M``
    positions ``index[b]`` and ``ref_sq_norms`` is ``[B, M]`` in that order; otherwise ``M = N``.
    """
    n, nq = ref_sq_norms.shape[1], queries.shape[0]
    for start, stop in _group_ranges(tokens.shape[0], exclude, group):
        g = stop - start
        if index is None:
            refs = tokens[start:stop]
        else:
            volumes = torch.arange(start, stop, device=index.device).unsqueeze(1)
            refs = tokens[volumes.to(tokens.device), index[start:stop].to(tokens.device)]
        refs = refs.to(device=queries.device, dtype=torch.float32)
        norms = ref_sq_norms[start:stop].to(queries.device).unsqueeze(1)  # [G, 1, M]
        out = None
        if workspace is not None and workspace.numel() >= g * nq * n:
            out = workspace[: g * nq * n].view(g, nq, n)
        d2 = torch.baddbmm(norms, queries.expand(g, -1, -1), refs.transpose(1, 2), alpha=-2.0, out=out)
        yield start, stop, d2


def nearest_distance_profile(
    queries: torch.Tensor,
    tokens: torch.Tensor,
    ref_sq_norms: torch.Tensor,
    exclude: int | Sequence[int] | None,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
    workspace: torch.Tensor | None = None,
    index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared distance of each query to its nearest token in every reference volume (Eq. 1).

    Args:
        queries: ``[Q, d]`` float32 query tokens.
        tokens: ``[B, N, d]`` reference token bank (any float dtype; cast to fp32 per block).
        ref_sq_norms: ``[B, N]`` fp32 squared norms of the references, ``+inf`` for invalid tokens
            so that they are never the nearest; ``[B, M]`` in the order of ``index`` when given.
        exclude: index of the query's own volume (or indices: every scan of its subject); their
            columns are ``+inf``. ``None``: the queries are not in ``tokens`` (a separate reference
            bank), every column is a reference.
        block_elements: budget for the ``[G, Q, N]`` intermediate; sets the group size ``G``.
        workspace: optional flat fp32 buffer of ``block_elements`` reused for that intermediate.
        index: optional ``[B, M]`` token positions to read per volume (valid tokens packed first,
            see :func:`_pack_valid`); ``None`` reads all ``N``.

    Returns:
        ``(d2, nearest)``: ``[Q, B]`` fp32 squared nearest distances in the GEMM form (not clamped,
        self column ``+inf``) and ``[Q, B]`` int64 position of that nearest token in each volume
        (a position in ``tokens``' ``N`` axis, also when ``index`` is given).
    """
    b = tokens.shape[0]
    n = ref_sq_norms.shape[1]
    nq = queries.shape[0]
    group = max(1, block_elements // max(1, n * nq))
    profile = torch.full((nq, b), float("inf"), dtype=torch.float32, device=queries.device)
    nearest = torch.zeros((nq, b), dtype=torch.long, device=queries.device)
    blocks = _reference_blocks(queries, tokens, ref_sq_norms, exclude, group, workspace, index)
    for start, stop, d2 in blocks:
        best = d2.min(dim=-1)
        profile[:, start:stop] = best.values.t()
        at = best.indices if index is None else index[start:stop].to(queries.device).gather(1, best.indices)
        nearest[:, start:stop] = at.t()
    return profile + queries.pow(2).sum(dim=1).unsqueeze(1), nearest


def _distance_profile(
    queries: torch.Tensor,
    tokens: torch.Tensor,
    ref_sq_norms: torch.Tensor,
    exclude: int | Sequence[int] | None,
    block_elements: int,
    workspace: torch.Tensor | None,
    index: torch.Tensor | None,
) -> torch.Tensor:
    """The ``[Q, B]`` squared-distance profile of :func:`nearest_distance_profile`, values only.

    ``amin`` instead of ``min`` with indices: on the CPU the indexed reduction is not vectorised and
    costs many times the plain one (docs/performance.md); only the ``K`` chosen volumes need their
    nearest token, found afterwards by
    :func:`_mean_of_k_nearest_exact` at ``K / (B - 1)`` of the GEMM's work.
    """
    b, nq = tokens.shape[0], queries.shape[0]
    group = max(1, block_elements // max(1, ref_sq_norms.shape[1] * nq))
    profile = torch.full((nq, b), float("inf"), dtype=torch.float32, device=queries.device)
    for start, stop, d2 in _reference_blocks(queries, tokens, ref_sq_norms, exclude, group, workspace, index):
        profile[:, start:stop] = d2.amin(dim=-1).t()
    return profile


def _mean_of_k_nearest_exact(
    queries: torch.Tensor,
    profile: torch.Tensor,
    k: int,
    tokens: torch.Tensor,
    ref_sq_norms: torch.Tensor,
    index: torch.Tensor | None,
    block_elements: int,
) -> torch.Tensor:
    """Eq. 2 from a values-only ``[Q, B]`` profile: mean of the ``k`` smallest, recomputed directly.

    For each reference volume chosen by some query, the nearest token of those queries is found by one
    GEMM against that volume (its valid tokens when ``index`` is given), and the distance to it is
    recomputed as ``|q - r|`` so that identical anatomy scores exactly 0 (the GEMM form loses
    ~sqrt(eps)*|v| to cancellation near zero).
    """
    chosen = profile.topk(k, dim=-1, largest=False).indices  # [Q, K]
    return _mean_distance_to(queries, chosen, tokens, ref_sq_norms, index, block_elements)


def _mean_distance_to(
    queries: torch.Tensor,
    chosen: torch.Tensor,
    tokens: torch.Tensor,
    ref_sq_norms: torch.Tensor,
    index: torch.Tensor | None,
    block_elements: int,
) -> torch.Tensor:
    """Mean over the ``[Q, K]`` ``chosen`` volumes of each query's exact distance to its nearest token
    there (see :func:`_mean_of_k_nearest_exact`)."""
    nq, k = chosen.shape
    dist = torch.empty(nq, k, dtype=torch.float32, device=queries.device)
    for v in chosen.unique().tolist():
        at, slot = torch.nonzero(chosen == v, as_tuple=True)
        positions = None if index is None else index[v].to(tokens.device)
        refs = tokens[v] if positions is None else tokens[v][positions]
        refs = refs.to(device=queries.device, dtype=torch.float32)
        dist[at, slot] = _nearest_distances(queries[at], refs, ref_sq_norms[v], block_elements)
    return dist.mean(dim=1)


def _nearest_distances(
    queries: torch.Tensor, refs: torch.Tensor, sq_norms: torch.Tensor, block_elements: int
) -> torch.Tensor:
    """``[Q]`` fp32 distance of each query to its nearest token of one volume (``refs [M, d]`` fp32,
    ``sq_norms [M]``, ``+inf`` where invalid): the nearest chosen by one fp32 GEMM, the distance then
    recomputed as ``|q - r|`` (exact near 0, where the GEMM form loses ~sqrt(eps)|v|). A few rows at a
    time, within ``block_elements``."""
    rows = max(1, block_elements // max(1, refs.shape[0]))
    norms = sq_norms.to(queries.device).unsqueeze(0)
    out = torch.empty(queries.shape[0], dtype=torch.float32, device=queries.device)
    for r0 in range(0, queries.shape[0], rows):
        q = queries[r0 : r0 + rows]
        nearest = torch.addmm(norms, q, refs.t(), alpha=-2.0).argmin(dim=1)
        out[r0 : r0 + rows] = (q - refs[nearest]).norm(dim=1)
    return out


def _query_tiles(index: torch.Tensor, tile: int) -> Iterator[torch.Tensor]:
    """``index`` split into ``ceil(len / tile)`` near-equal tiles of at most ``tile``.

    Equal tiles rather than full tiles plus a remainder: each tile re-reads the whole reference bank,
    which a tile of a few tokens would not amortise.
    """
    count = index.numel()
    if count == 0:
        return
    tiles = -(-count // max(1, tile))
    size = -(-count // tiles)
    for start in range(0, count, size):
        yield index[start : start + size]


def _mean_of_k_nearest(
    queries: torch.Tensor,
    d2: torch.Tensor,
    nearest: torch.Tensor,
    k: int,
    lookup,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
) -> torch.Tensor:
    """Eq. 2 from a ``[Q, ..., B]`` profile: the mean of the ``k`` smallest, recomputed directly.

    The GEMM form loses ~sqrt(eps)*|v| to cancellation near zero distance; the ``k`` chosen distances
    are recomputed as ``|q - r|`` (``k*d`` work per query) so that identical anatomy scores exactly 0.
    ``lookup(volumes, index)`` returns the reference tokens ``[..., k, d]``. The gathered references
    grow with ``k`` (hence with the batch), so they are taken a few rows of ``Q`` at a time, within
    ``block_elements`` fp32 values.
    """
    rows = max(1, block_elements // (2 * k * queries[0].numel()))
    volumes = d2.topk(k, dim=-1, largest=False).indices  # [Q, ..., K]
    chosen = nearest.gather(-1, volumes)
    parts = []
    for start in range(0, queries.shape[0], rows):
        part = slice(start, start + rows)
        refs = lookup(volumes[part], chosen[part]).float()
        parts.append((queries[part].unsqueeze(-2) - refs).norm(dim=-1).mean(dim=-1))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class _PairBlocks:
    """Distance blocks of volume pairs in one canonical form, shared by both exact scoring orders.

    The block of the pair ``a < b`` is always computed the same way: one query tile of ``a``'s valid
    tokens (rows; tiles from :func:`_query_tiles`) against all of ``b``'s packed valid tokens
    (columns), as the full squared distance ``(|p|^2 + |t|^2) - 2 p.t`` in one ``addmm``. (Folding
    the norms into the GEMM as two extra operand columns, which saves the pass that adds them, is
    slower: it needs augmented copies of both sides.) Its row
    minima are ``a``'s nearest distances in ``b`` and its column minima ``b``'s nearest distances in
    ``a``, so one GEMM serves both volumes (the pair-symmetric order) - and a query volume scored on
    its own (``volumes=``, a rank's share) reads the very same blocks, so both orders give the same
    profile values and the same scores, bit for bit, whatever the sharding.
    """

    def __init__(self, tokens: torch.Tensor, valid: torch.Tensor, query_tile: int, block_elements: int) -> None:
        self.tokens = tokens
        self.index, self.norms = _pack_valid(valid, _sq_norms(tokens, valid))
        self.m = self.norms.shape[1]
        self.counts = valid.sum(dim=1).tolist()
        # Rows per tile: the block [tile, M] stays within the budget (and in cache), 64..query_tile.
        self.tile = max(1, min(int(query_tile), max(64, block_elements // max(1, self.m))))
        self.workspace = _workspace(max(block_elements, self.tile * self.m), tokens.device)
        self._tiles = [
            [slice(int(t[0]), int(t[-1]) + 1) for t in _query_tiles(torch.arange(count), self.tile)]
            for count in self.counts
        ]
        self.block_elements = block_elements

    def refs(self, b: int) -> torch.Tensor:
        """``[M, d]`` fp32 packed tokens of volume ``b`` (its valid tokens first)."""
        t = self.tokens[b] if self.index is None else self.tokens[b][self.index[b]]
        return t.float()

    def gather(self, volumes: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """fp32 tokens of ``volumes`` at their packed ``positions`` (two index tensors of one shape)."""
        at = positions if self.index is None else self.index[volumes, positions]
        return self.tokens[volumes.to(self.tokens.device), at.to(self.tokens.device)].float()

    def tiles(self, a: int) -> list[slice]:
        """Packed positions of volume ``a``'s query tiles (its valid tokens are packed first)."""
        return self._tiles[a]

    def block(self, p: torch.Tensor, a: int, rows: slice, b: int, refs_b: torch.Tensor) -> torch.Tensor:
        """``[rows, M]`` full squared distances of volume ``a``'s packed tokens ``rows`` (``p``, the
        rows of :meth:`refs` of ``a``) to volume ``b`` (``refs_b``); a view of the workspace. Padding
        columns (invalid tokens, ``|t|^2 = +inf``) come out ``+inf``."""
        q = p[rows]
        out = self.workspace[: q.shape[0] * self.m].view(q.shape[0], self.m)
        torch.add(self.norms[a, rows].unsqueeze(1), self.norms[b].unsqueeze(0), out=out)
        return out.addmm_(q, refs_b.t(), alpha=-2.0)

    def scores(self, a: int, p: torch.Tensor, chosen: torch.Tensor, scores: torch.Tensor) -> None:
        """Eq. 2 for all valid tokens of volume ``a`` (``p``) from their ``[count, K]`` chosen volumes,
        written into ``scores [B, N]``."""
        count = self.counts[a]
        got = _mean_distance_to(p[:count], chosen, self.tokens, self.norms, self.index, self.block_elements)
        where = torch.arange(count, device=scores.device) if self.index is None else self.index[a, :count]
        scores[a, where] = got


def _scores_per_volume(
    pairs: _PairBlocks, volumes: Sequence[int], ks: Sequence[int], scores: torch.Tensor, same: Sequence[Sequence[int]]
) -> None:
    """Exact scores of each of ``volumes`` on its own: its column minima in every lower volume's blocks,
    then its tiles' row minima in every higher volume's blocks (the scans of its own subject,
    ``same[i]``, are skipped and stay ``+inf``)."""
    b = len(pairs.counts)
    for i in volumes:
        count = pairs.counts[i]
        p_i = pairs.refs(i)
        # [B, count]: each reference volume's minima are a contiguous row.
        profile = torch.full((b, count), float("inf"), dtype=torch.float32, device=scores.device)
        for a in range(i):
            if a in same[i]:
                continue
            p_a = pairs.refs(a)
            for rows in pairs.tiles(a):
                col = pairs.block(p_a, a, rows, i, p_i).amin(dim=0)[:count]
                torch.minimum(profile[a], col, out=profile[a])
        for c in range(i + 1, b):
            if c in same[i]:
                continue
            refs_c = pairs.refs(c)
            for rows in pairs.tiles(i):
                profile[c, rows] = pairs.block(p_i, i, rows, c, refs_c).amin(dim=1)
        pairs.scores(i, p_i, profile.t().topk(ks[i], dim=1, largest=False).indices, scores)


def _scores_pair_symmetric(
    pairs: _PairBlocks, ks: Sequence[int], scores: torch.Tensor, same: Sequence[Sequence[int]]
) -> None:
    """Exact scores of every volume with one GEMM per volume pair.

    Volumes are taken in order as the row side. Each block's row minima complete the row volume's
    profile over the higher volumes; its column minima (over all the row volume's tiles) are folded
    into a running top-``k`` of each higher volume's tokens, which is all that volume needs from the
    lower ones when its turn comes: ``[B, M, k]`` values and volume ids (int16) instead of the
    ``[B, M, B]`` profile. Pairs of scans of one subject are never computed; their entries stay
    ``+inf`` and are never chosen, because each volume's ``K`` counts only the references it has.
    """
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
                continue
            refs_c = pairs.refs(c)
            for rows in pairs.tiles(a):
                block = pairs.block(p_a, a, rows, c, refs_c)
                row_min[rows, j] = block.amin(dim=1)
                torch.minimum(columns[j], block.amin(dim=0), out=columns[j])
        # Candidates: the k best lower volumes (complete: every lower volume has been a row side) and
        # every higher one; ids index the batch.
        values = torch.cat([best[a, :count], row_min], dim=1)
        ids = torch.cat(
            [best_id[a, :count].long(), torch.tensor(higher, dtype=torch.long, device=device).expand(count, -1)], dim=1
        )
        pairs.scores(a, p_a, ids.gather(1, values.topk(ks[a], dim=1, largest=False).indices), scores)
        # Volume a is now a complete column of every higher volume's profile: keep their k best.
        for j, c in enumerate(higher):
            values = torch.cat([best[c], columns[j].unsqueeze(1)], dim=1)
            ids = torch.cat([best_id[c], torch.full((m, 1), a, dtype=torch.int16, device=device)], dim=1)
            keep = values.topk(k, dim=1, largest=False).indices
            best[c] = values.gather(1, keep)
            best_id[c] = ids.gather(1, keep)


def _low_blocks(pairs: _PairBlocks, precision: str) -> LowPrecisionBlocks:
    """The reduced-precision blocks of ``pairs`` (half squared norms, per-token slacks)."""
    return LowPrecisionBlocks(spec_of(precision), pairs.refs, pairs.gather, pairs.norms / 2.0)


def _store_width(ks: Sequence[int]) -> int:
    """Lower volumes kept per token by the mixed pair-symmetric order: the ``K`` nearest and as many
    again (at least 4) for the candidates that the error bound cannot tell from them. A token whose
    last kept value is still a candidate falls back to all volumes (:func:`_mixed_volume_scores`)."""
    k = max(ks)
    return k + max(8, 2 * k)


def _mixed_volume_scores(
    pairs: _PairBlocks,
    low: LowPrecisionBlocks,
    a: int,
    operands: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    profile: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    k: int,
    scores: torch.Tensor,
    skip: Sequence[int],
) -> int:
    """Exact Eq. 2 for the valid tokens of volume ``a`` from their low-precision profile.

    ``operands = (p_a, left_a, workspace)``: ``a``'s fp32 packed tokens, their low-precision left
    operand and a workspace. ``profile = (values [count, W], ids [count, W], lower_kth [count])``:
    low-precision nearest ``h`` per (token, volume ``ids``) and the ``k_store``-th smallest over the
    lower volumes (``+inf`` if fewer). The candidates of a token are the volumes whose value is within
    the error bound of its ``k``-th smallest (:meth:`LowPrecisionBlocks.radius`): they hold every volume
    that can be among its ``k`` nearest. Each candidate's nearest distance is then found exactly
    (:meth:`LowPrecisionBlocks.nearest`: the tokens within the bound, their distances ``|q - r|`` in
    fp32) and the ``k`` smallest are averaged. A token whose last kept lower value is a candidate too
    (the store may have dropped others) takes every volume but ``a`` and ``skip``: full search.

    Returns the number of such fallback tokens.
    """
    p_a, left, workspace = operands
    values, ids, lower_kth = profile
    count, b = values.shape[0], len(pairs.counts)
    limit = low.limits(a, slice(0, count), kth_smallest(values, k))
    fallback = lower_kth <= limit
    want = torch.zeros(b, count, dtype=torch.bool, device=values.device)
    at, slot = torch.nonzero(values <= limit.unsqueeze(1), as_tuple=True)
    want[ids[at, slot], at] = True
    want[:, fallback] = True
    want[[a, *skip]] = False
    vols, rows = torch.nonzero(want, as_tuple=True)  # sorted by volume
    dist = torch.full((count, b), float("inf"), dtype=torch.float32, device=values.device)
    dist[rows, vols] = low.nearest(a, (rows, vols), left, p_a, workspace)
    where = torch.arange(count, device=scores.device) if pairs.index is None else pairs.index[a, :count]
    scores[a, where] = dist.topk(k, dim=1, largest=False).values.mean(dim=1)
    return int(fallback.sum())


def _keep_smallest(best: tuple[torch.Tensor, torch.Tensor], new: torch.Tensor, volume: int, chunk: int = 16) -> None:
    """Fold one more volume's values ``new [H, M]`` into the stores ``best = (values [H, M, k],
    ids [H, M, k])`` of ``H`` volumes, keeping the ``k`` smallest (``chunk`` volumes at a time)."""
    values, ids = best
    k = values.shape[2]
    for h0 in range(0, new.shape[0], chunk):
        h1 = min(h0 + chunk, new.shape[0])
        merged = torch.cat([values[h0:h1], new[h0:h1].unsqueeze(2)], dim=2)
        merged_ids = torch.cat([ids[h0:h1], torch.full_like(ids[h0:h1, :, :1], volume)], dim=2)
        keep = merged.topk(k, dim=2, largest=False).indices
        values[h0:h1] = merged.gather(2, keep)
        ids[h0:h1] = merged_ids.gather(2, keep)


def _scores_mixed_symmetric(
    pairs: _PairBlocks, low: LowPrecisionBlocks, ks: Sequence[int], scores: torch.Tensor, same: Sequence[Sequence[int]]
) -> int:
    """:func:`_scores_pair_symmetric` with the low-precision pass: one reduced-precision block per volume
    pair and tile, its row minima for the row volume and its column minima into a running store of
    the ``k_store`` (:func:`_store_width`) smallest values of each higher volume's tokens; each volume's
    scores from its candidates, exactly (:func:`_mixed_volume_scores`). Returns the fallback tokens."""
    b, m, k_store = len(pairs.counts), pairs.m, _store_width(ks)
    device = scores.device
    best = torch.full((b, m, k_store), float("inf"), dtype=torch.float32, device=device)
    best_id = torch.zeros((b, m, k_store), dtype=torch.int16, device=device)
    workspace = low.workspace(max(pairs.workspace.numel(), (pairs.tile + ROW_BUCKET) * pairs.m))
    fallbacks = 0
    for a in range(b):
        count, p_a = pairs.counts[a], pairs.refs(a)
        left = low.left(a, p_a)
        higher = list(range(a + 1, b))
        row_min = low.raw_full((count, len(higher)))
        columns = low.raw_full((len(higher), m))
        for j, c in enumerate(higher):
            if c in same[a]:
                continue
            refs_c = pairs.refs(c) if low.right is None else None
            for rows in pairs.tiles(a):
                block = low.block(left, a, rows, c, refs_c, workspace)
                row_min[rows, j] = block[: rows.stop - rows.start].amin(dim=1)
                torch.minimum(columns[j], block.amin(dim=0), out=columns[j])
        values = torch.cat([best[a, :count], low.values(row_min)], dim=1)
        higher_ids = torch.tensor(higher, dtype=torch.long, device=device).expand(count, -1)
        ids = torch.cat([best_id[a, :count].long(), higher_ids], dim=1)
        profile = (values, ids, best[a, :count, -1])
        operands = (p_a, left, workspace)
        fallbacks += _mixed_volume_scores(pairs, low, a, operands, profile, ks[a], scores, same[a])
        # Volume a is now a complete column of every higher volume's profile.
        _keep_smallest((best[a + 1 :], best_id[a + 1 :]), low.values(columns), a)
    return fallbacks


def _scores_mixed_per_volume(
    pairs: _PairBlocks,
    low: LowPrecisionBlocks,
    volumes: Sequence[int],
    ks: Sequence[int],
    scores: torch.Tensor,
    same: Sequence[Sequence[int]],
) -> int:
    """:func:`_scores_per_volume` with the low-precision pass: each volume's profile from the very
    blocks of :func:`_scores_mixed_symmetric`, and the same fallback rule (its ``k_store``-th smallest
    lower value), so both orders give bit-identical scores. Returns the fallback tokens."""
    b, k_store = len(pairs.counts), _store_width(ks)
    workspace = low.workspace(max(pairs.workspace.numel(), (pairs.tile + ROW_BUCKET) * pairs.m))
    fallbacks = 0
    for i in volumes:
        count, p_i = pairs.counts[i], pairs.refs(i)
        profile = low.raw_full((b, count))
        refs_i = p_i if low.right is None else None
        for a in range(i):
            if a in same[i]:
                continue
            left_a = low.left(a, pairs.refs(a))
            for rows in pairs.tiles(a):
                col = low.block(left_a, a, rows, i, refs_i, workspace).amin(dim=0)[:count]
                torch.minimum(profile[a], col, out=profile[a])
        left_i = low.left(i, p_i)
        for c in range(i + 1, b):
            if c in same[i]:
                continue
            refs_c = pairs.refs(c) if low.right is None else None
            for rows in pairs.tiles(i):
                block = low.block(left_i, i, rows, c, refs_c, workspace)
                profile[c, rows] = block[: rows.stop - rows.start].amin(dim=1)
        values = low.values(profile).t()
        ids = torch.arange(b, device=scores.device).expand(count, -1)
        lower = (values, ids, kth_smallest(values[:, :i], k_store))
        operands = (p_i, left_i, workspace)
        fallbacks += _mixed_volume_scores(pairs, low, i, operands, lower, ks[i], scores, same[i])
    return fallbacks


def mutual_similarity_scores(
    tokens: torch.Tensor,
    valid: torch.Tensor | None = None,
    rho: float = 0.1,
    query_tile: int = DEFAULT_QUERY_TILE,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
    volumes: Sequence[int] | None = None,
    groups: Sequence[object] | None = None,
    precision: str = "fp32",
) -> torch.Tensor:
    """Exact mutual-similarity anomaly scores (Eq. 1-2), tiled.

    Args:
        tokens: ``[B, N, d]`` float tokens of ``B`` volumes (fp16/bf16 storage is accumulated in fp32).
        valid: ``[B, N]`` bool, or ``None`` for all valid. An invalid token neither queries nor is
            matched, and scores 0.
        rho: neighbour ratio, ``K = max(1, floor(rho * (B - 1)))``.
        query_tile: number of query tokens processed together.
        block_elements: element budget of the largest intermediate block (see module docstring).
        volumes: score only the tokens of these volumes (all are still references); the other rows
            stay 0. ``None``: all. For sharding the query side (and benchmarks).
        groups: optional subject of each volume (``[B]`` hashables). Scans of one subject (repeat
            scans, follow-ups, copies) are never references for each other, and each volume's ``K`` is
            Eq. 2 over the references it has: ``max(1, floor(rho * (B - S)))`` for a subject with
            ``S`` scans. ``None``: every volume is its own subject (the paper).
        precision: the distance pass that chooses the neighbours: ``"fp32"`` (default, the reference),
            ``"bf16"`` or ``"tf32"`` (a reduced-precision pass whose candidates within its error
            bound are decided in fp32: :mod:`scripts.mixed_precision`; the chosen distances are exact
            either way), or ``"auto"`` (:func:`scripts.mixed_precision.resolve_precision`; fp32 when
            no volume has :data:`AUTO_MIN_TOKENS` valid tokens).

    Returns:
        ``[B, N]`` fp32 scores on the device of ``tokens``.

    Raises:
        ValueError: ``B < 2``, bad shapes, bad ``rho``, a volume without any valid token, a volume
            whose subject holds every other volume of the batch, or an unknown ``precision``.
    """
    valid = _check_inputs(tokens, valid)
    b, n, _ = tokens.shape
    same = _same_subject(groups, b)
    ks = _neighbours_per_volume(b, rho, same)
    wanted = _check_volumes(volumes, b)
    auto = str(precision).strip().lower() == "auto"
    precision = resolve_precision(precision, tokens.device)
    pairs = _PairBlocks(tokens, valid, query_tile, block_elements)
    if auto and pairs.m < AUTO_MIN_TOKENS:
        precision = "fp32"  # small blocks: fixed costs dominate and the exact pass is as fast
    scores = torch.zeros(b, n, dtype=torch.float32, device=tokens.device)
    low = None if precision == "fp32" else _low_blocks(pairs, precision)
    # The pair-symmetric order keeps a [B, M, K] top-K store (fp32 + int16; K + extra for the mixed
    # pass): used when every volume is a query and the store stays within an eighth of the bank (or
    # one block).
    store = b * pairs.m * (max(ks) if low is None else _store_width(ks)) * 6
    bank_bytes = tokens.numel() * tokens.element_size()
    symmetric = set(wanted) == set(range(b)) and b < 2**15
    if symmetric and store <= max(bank_bytes // 8, 4 * block_elements):
        if low is None:
            _scores_pair_symmetric(pairs, ks, scores, same)
        else:
            _scores_mixed_symmetric(pairs, low, ks, scores, same)
    elif low is None:
        _scores_per_volume(pairs, wanted, ks, scores, same)
    else:
        _scores_mixed_per_volume(pairs, low, wanted, ks, scores, same)
    return scores


def _as_skip(value: int | Sequence[int]) -> int | list[int]:
    return int(value) if isinstance(value, int) else [int(v) for v in value]


def _check_reference_side(tokens: torch.Tensor, valid: torch.Tensor | None, what: str) -> torch.Tensor:
    """Shape and validity checks of one side of :func:`reference_scores` (``B >= 1`` volumes)."""
    if tokens.ndim != 3 or tokens.shape[0] < 1:
        raise ValueError(f"{what} tokens must be [B, N, d] with B >= 1, got shape {tuple(tokens.shape)}")
    b, n, _ = tokens.shape
    if valid is None:
        return torch.ones(b, n, dtype=torch.bool)
    if valid.shape != (b, n):
        raise ValueError(f"{what} valid must be [B, N] = {(b, n)}, got {tuple(valid.shape)}")
    valid = valid.to(dtype=torch.bool)
    empty = torch.nonzero(valid.sum(dim=1) == 0).flatten().tolist()
    if empty:
        raise ValueError(f"{what} " + str(_empty_volumes_error(empty)))
    return valid


def reference_scores(
    queries: torch.Tensor,
    query_valid: torch.Tensor | None,
    references: torch.Tensor,
    reference_valid: torch.Tensor | None = None,
    rho: float = 0.1,
    exclude: Sequence[int | None] | None = None,
    query_tile: int = DEFAULT_QUERY_TILE,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
) -> torch.Tensor:
    """Mutual-similarity scores of new volumes against a fixed set of reference volumes (Eq. 1-2).

    Reference-bank mode: each query volume is matched against the reference volumes only, never
    against the other query volumes, and scores the mean of its ``K = max(1, floor(rho * R))``
    smallest nearest-token distances over its ``R`` references (the exact scorer's rule with
    ``B - 1`` replaced by the number of references). A query volume that is itself in the bank is
    left out of its own references with ``exclude`` (then ``R = B_ref - 1``), so scoring a cohort
    against its own bank gives the exact scores of that cohort.

    The references are read one group of volumes at a time (``references[start:stop]``, cast to fp32
    per block by :func:`nearest_distance_profile`) and their squared norms are computed volume by
    volume, so an fp16 bank memory-mapped from disk (``torch.from_numpy(np.load(path,
    mmap_mode="r"))``) is streamed, never copied whole (let alone in fp32). Extra memory: the
    ``[B_ref, N_ref]`` fp32 norms, one block of ``block_elements`` and the ``[query_tile, B_ref]``
    profile. Each query tile streams the references once.

    Args:
        queries: ``[B_q, N, d]`` tokens of the new volumes (any float dtype; accumulated in fp32).
        query_valid: ``[B_q, N]`` bool or ``None`` (all valid).
        references: ``[B_ref, N_ref, d]`` reference tokens (any float dtype, may be memory-mapped,
            may live on another device than the queries: blocks are moved to the queries' device).
        reference_valid: ``[B_ref, N_ref]`` bool or ``None``; an invalid reference token is never
            matched.
        rho: neighbour ratio.
        exclude: per query volume, the index of the reference that is that same volume (or a list of
            indices: every scan of its subject in the bank), or ``None``.
        query_tile, block_elements: as in :func:`mutual_similarity_scores`.

    Returns:
        ``[B_q, N]`` fp32 scores on the device of ``queries`` (0 for invalid query tokens).

    Raises:
        ValueError: bad shapes, ``rho``, ``exclude``, a volume without a valid token, or a query left
            without any reference.
    """
    query_valid = _check_reference_side(queries, query_valid, "query").to(queries.device)
    reference_valid = _check_reference_side(references, reference_valid, "reference")
    reference_valid = reference_valid.to(references.device)
    bq, n, d = queries.shape
    b_ref, n_ref, d_ref = references.shape
    if d_ref != d:
        raise ValueError(f"queries have d={d} but the references have d={d_ref}")
    skips = [None] * bq if exclude is None else [None if e is None else _as_skip(e) for e in exclude]
    if len(skips) != bq or any(not 0 <= e < b_ref for s in skips for e in _excluded(s)):
        raise ValueError(f"exclude must give None or reference indices in [0, {b_ref}) per query volume")
    lonely = [i for i, s in enumerate(skips) if b_ref - len(_excluded(s)) < 1]
    if lonely:
        raise ValueError(f"query volume(s) {lonely} have no reference: the bank holds only the volume itself")

    index, ref_sq_norms = _pack_valid(reference_valid, _sq_norms(references, reference_valid))
    scores = torch.zeros(bq, n, dtype=torch.float32, device=queries.device)
    workspace = _workspace(max(block_elements, min(query_tile, n) * ref_sq_norms.shape[1]), queries.device)
    for i in range(bq):
        # R references: all of the bank, or all but the query volume itself (or its subject's scans).
        k = num_neighbours(b_ref - len(_excluded(skips[i])) + 1, rho)
        for idx in _query_tiles(torch.nonzero(query_valid[i]).flatten(), query_tile):
            tile = queries[i, idx].float()
            profile = _distance_profile(tile, references, ref_sq_norms, skips[i], block_elements, workspace, index)
            scores[i, idx] = _mean_of_k_nearest_exact(tile, profile, k, references, ref_sq_norms, index, block_elements)
    return scores


def subset_scores(
    tokens: torch.Tensor,
    valid: torch.Tensor | None,
    references: Mapping[int, Sequence[int]],
    rho: float = 0.1,
    query_tile: int = DEFAULT_QUERY_TILE,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
) -> torch.Tensor:
    """Mutual-similarity scores of each query volume against its own subset of the other volumes.

    The ``n_references`` mode (:func:`scripts.references.reference_subsets` draws the subsets): volume
    ``i`` is scored by Eq. 1-2 against the volumes ``references[i]`` only, with
    ``K = max(1, floor(rho * len(references[i])))``, i.e. exactly as :func:`mutual_similarity_scores`
    scores volume 0 of the batch ``[i, *references[i]]``. Cost ``O(sum_i |references[i]| N^2 d)``,
    linear in ``B`` for subsets of a fixed size. The references of a query are gathered into one
    reused buffer and scored by :func:`nearest_distance_profile` with one reused workspace, so the
    per-query overhead is a copy of ``|references[i]|`` volumes and no allocation.

    Args:
        tokens: ``[B, N, d]`` tokens (any float dtype).
        valid: ``[B, N]`` bool or ``None``.
        references: ``{query volume: reference volumes}``; a query is never its own reference. Volumes
            not in ``references`` score 0.
        rho, query_tile, block_elements: as in :func:`mutual_similarity_scores`.

    Returns:
        ``[B, N]`` fp32 scores on the device of ``tokens``.
    """
    valid = _check_inputs(tokens, valid)
    b, n, d = tokens.shape
    plan = {}
    for i, refs in references.items():
        i, refs = int(i), [int(j) for j in refs]
        if not refs or i in refs or any(not 0 <= j < b for j in [i, *refs]):
            raise ValueError(f"volume {i}: references must be other volumes of the batch of {b}, got {refs}")
        plan[i] = refs
    packed, ref_sq_norms = _pack_valid(valid, _sq_norms(tokens, valid))
    scores = torch.zeros(b, n, dtype=torch.float32, device=tokens.device)
    if not plan:
        return scores
    buffer = torch.empty((max(map(len, plan.values())), n, d), dtype=tokens.dtype, device=tokens.device)
    workspace = _workspace(max(block_elements, min(query_tile, n) * ref_sq_norms.shape[1]), tokens.device)
    for i, refs in plan.items():
        index = torch.tensor(refs, device=tokens.device)
        subset = buffer[: len(refs)]
        torch.index_select(tokens, 0, index, out=subset)
        subset_norms = ref_sq_norms.index_select(0, index)
        subset_packed = None if packed is None else packed.index_select(0, index)
        k = num_neighbours(len(refs) + 1, rho)
        for idx in _query_tiles(torch.nonzero(valid[i]).flatten(), query_tile):
            tile = tokens[i, idx].float()
            profile = _distance_profile(tile, subset, subset_norms, None, block_elements, workspace, subset_packed)
            scores[i, idx] = _mean_of_k_nearest_exact(
                tile, profile, k, subset, subset_norms, subset_packed, block_elements
            )
    return scores


# ---------------------------------------------------------------------------------------------------
# Coarse-to-fine routing (Sec. 3.5)


def _check_c2f_inputs(
    coarse: torch.Tensor,
    fine: torch.Tensor,
    coarse_valid: torch.Tensor | None,
    fine_valid: torch.Tensor | None,
    routes: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    if coarse.ndim != 3:
        raise ValueError(f"coarse tokens must be [B, N_c, d], got shape {tuple(coarse.shape)}")
    b, n_c, d = coarse.shape
    if fine.ndim != 4 or fine.shape[:2] != (b, n_c) or fine.shape[3] != d:
        raise ValueError(
            f"fine tokens must be [B, N_c, h, d] = [{b}, {n_c}, h, {d}] (the h depth children of each "
            f"coarse token), got shape {tuple(fine.shape)}"
        )
    if isinstance(routes, bool) or int(routes) != routes or routes < 1:
        raise ValueError(f"L (coarse routes per reference volume) must be an int >= 1, got {routes}")
    coarse_valid = _check_inputs(coarse, coarse_valid)
    h = fine.shape[2]
    if fine_valid is None:
        fine_valid = torch.ones(b, n_c, h, dtype=torch.bool, device=fine.device)
    elif fine_valid.shape != (b, n_c, h):
        raise ValueError(f"fine_valid must be [B, N_c, h] = {(b, n_c, h)}, got {tuple(fine_valid.shape)}")
    fine_valid = fine_valid.to(device=fine.device, dtype=torch.bool)
    empty = torch.nonzero(fine_valid.flatten(1).sum(dim=1) == 0).flatten().tolist()
    if empty:
        raise _empty_volumes_error(empty, "valid fine token")
    return coarse_valid, fine_valid


def _c2f_profiles(
    coarse_q: torch.Tensor, fine_q: torch.Tensor, bank: _C2FBank, exclude: int | Sequence[int], group: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Coarse and C2F fine distance profiles of one query tile against every other volume.

    Args:
        coarse_q: ``[Q, d]`` fp32 query coarse tokens; ``fine_q``: ``[Q, h, d]`` their fine children.
        bank: the validated bank (norms, masks, buffers).
        exclude: the query volume (or every scan of its subject).
        group: reference volumes per coarse GEMM.

    Returns:
        ``(coarse_d2 [Q, B], coarse_nn [Q, B], fine_d2 [Q, h, B], fine_nn [Q, h, B])`` (see
        :func:`c2f_tiles`).
    """
    b, n_c, h, d = bank.fine.shape
    routes, masks = bank.routes, bank.masks
    nq = coarse_q.shape[0]
    device = coarse_q.device
    inf = float("inf")
    coarse_d2 = torch.full((nq, b), inf, dtype=torch.float32, device=device)
    coarse_nn = torch.zeros((nq, b), dtype=torch.long, device=device)
    fine_d2 = torch.full((nq, h, b), inf, dtype=torch.float32, device=device)
    fine_nn = torch.zeros((nq, h, b), dtype=torch.long, device=device)
    blocks = _reference_blocks(coarse_q, bank.coarse, bank.packed_norms, exclude, group, bank.workspace, bank.index)
    for start, stop, d2 in blocks:
        if masks is None:
            # The same reduction yields the coarse nearest neighbour (Eq. 1) and the routing (Eq. 6).
            top = d2.topk(routes, dim=-1, largest=False)  # sorted ascending
            route_index = top.indices  # [G, Q, L]
            best_values, best_index = top.values[..., 0], top.indices[..., 0]
        else:
            # Masks differ (a valid coarse token without valid fine child, or the converse): d2 holds
            # finite norms for the union; mask each reduction separately.
            coarse_ok, route_ok = (m[start:stop].unsqueeze(1).to(device) for m in masks)
            best = d2.masked_fill(~coarse_ok, inf).min(dim=-1)
            best_values, best_index = best.values, best.indices
            route_index = d2.masked_fill_(~route_ok, inf).topk(routes, dim=-1, largest=False).indices
        if bank.index is not None:  # packed columns -> token positions
            columns = bank.index[start:stop].to(device).unsqueeze(1).expand(-1, nq, -1)  # [G, Q, M]
            route_index = columns.gather(2, route_index)
            best_index = columns.gather(2, best_index.unsqueeze(-1)).squeeze(-1)
        coarse_d2[:, start:stop] = best_values.t()
        coarse_nn[:, start:stop] = best_index.t()
        # Restricted fine search (Eq. 6): the h children of each of the L routed coarse tokens, gathered
        # for some queries x the G reference volumes at a time into one reused buffer (the search reads
        # each candidate h times only, so it is bound by this gather, not by arithmetic).
        rows = route_index + (torch.arange(start, stop, device=device) * n_c).view(-1, 1, 1)  # [G, Q, L]
        capacity = bank.candidates.shape[0]  # rows of the buffer, at least L
        volumes_step = max(1, capacity // routes)
        for g0 in range(0, stop - start, volumes_step):
            g1 = min(g0 + volumes_step, stop - start)
            g = g1 - g0
            step = max(1, capacity // (g * routes))
            for s0 in range(0, nq, step):
                s1 = min(s0 + step, nq)
                where = rows[g0:g1, s0:s1].reshape(-1).to(bank.fine_rows.device)  # [g * S * L]
                cand = bank.candidates[: where.numel()]
                torch.index_select(bank.fine_rows, 0, where, out=cand)
                cand = cand.to(device=device, dtype=torch.float32).view(g * (s1 - s0), routes * h, d)
                cand_norms = bank.fine_norm_rows.index_select(0, where).to(device).view(-1, routes * h, 1)
                # [g * S, d, h] as the transpose of a contiguous [g * S, h, d]: MKL's small-N path is
                # much faster for this layout than for a contiguous [d, h] operand (docs/multiscale.md).
                queries = fine_q[s0:s1].expand(g, -1, -1, -1).reshape(-1, h, d).transpose(1, 2)
                # |c|^2 - 2 c.f for the L*h candidates x h fine queries of each coarse query.
                best = torch.baddbmm(cand_norms, cand, queries, alpha=-2.0).min(dim=1)  # [g * S, h]
                fine_d2[s0:s1, :, start + g0 : start + g1] = best.values.view(g, s1 - s0, h).permute(1, 2, 0)
                child = best.indices.view(g, s1 - s0, h)
                parent = route_index[g0:g1, s0:s1].gather(2, torch.div(child, h, rounding_mode="floor"))
                fine_nn[s0:s1, :, start + g0 : start + g1] = (parent * h + child % h).permute(1, 2, 0)
    coarse_d2 += coarse_q.pow(2).sum(dim=-1).unsqueeze(-1)
    fine_d2 += fine_q.pow(2).sum(dim=-1).unsqueeze(-1)
    return coarse_d2, coarse_nn, fine_d2, fine_nn


def _candidate_elements(device: torch.device, block_elements: int) -> int:
    """Elements of the C2F candidate buffer: :data:`CANDIDATE_ELEMENTS` on the CPU (8 MiB stays in
    cache and below glibc's mmap threshold); on a GPU as large as the scorer's block, since each
    gather-and-match step is a few kernel launches whatever its size, and a buffer of a few thousand
    rows turns the fine search into millions of launches at the paper's scale."""
    return CANDIDATE_ELEMENTS if device.type != "cuda" else max(CANDIDATE_ELEMENTS, int(block_elements))


class _C2FBank:
    """Validated inputs of a C2F run and the per-bank quantities every query tile needs."""

    def __init__(
        self,
        coarse: torch.Tensor,
        fine: torch.Tensor,
        coarse_valid: torch.Tensor | None,
        fine_valid: torch.Tensor | None,
        L: int,  # noqa: N803
        query_tile: int,
        block_elements: int,
    ) -> None:
        self.coarse_valid, self.fine_valid = _check_c2f_inputs(coarse, fine, coarse_valid, fine_valid, L)
        self.coarse, self.fine = coarse, fine
        b, n_c, h, d = fine.shape
        self.h = h
        # A coarse token is worth routing to iff it has a valid fine child (see c2f_scores).
        routable = self.fine_valid.any(dim=2)
        self.queries_of = self.coarse_valid | routable
        coarse_norms = _sq_norms(coarse, self.queries_of)
        # The coarse GEMM and top-L read each reference volume at the positions of the union only
        # (most tokens are background under a mask); ``index`` maps a packed column to its token.
        self.index, self.packed_norms = _pack_valid(self.queries_of, coarse_norms)
        width = n_c if self.index is None else self.index.shape[1]
        self.routes = min(int(L), width)
        same = torch.equal(routable, self.coarse_valid)
        masks = None if same else (self.coarse_valid, routable)
        if masks is not None and self.index is not None:
            masks = tuple(m.gather(1, self.index) for m in masks)
        self.masks = masks
        # Rows of h children: one index_select row per routed coarse token (a view when contiguous).
        self.fine_rows = fine.reshape(b * n_c, h * d)
        self.fine_norm_rows = _sq_norms(fine, self.fine_valid).reshape(b * n_c, h)
        # Per query and reference volume: the packed coarse distances (the routes and profiles are small).
        self.per_query = width + 2 * self.routes
        self.tile = max(1, min(int(query_tile), block_elements // self.per_query))
        self.block_elements = block_elements
        self.workspace = _workspace(block_elements, coarse.device)
        # Gathered fine candidates (rows of h*d values), reused by every block: at least one query's L routes.
        rows = _candidate_elements(fine.device, block_elements) // (h * d)
        self.candidates = torch.empty(max(self.routes, rows), h * d, dtype=fine.dtype, device=fine.device)

    def tiles(
        self, volumes: Sequence[int] | None, same: Sequence[Sequence[int]] | None = None
    ) -> Iterator[tuple[int, torch.Tensor, tuple]]:
        for i in _check_volumes(volumes, self.coarse.shape[0]):
            exclude = [i, *same[i]] if same is not None and same[i] else i
            query_index = torch.nonzero(self.queries_of[i]).flatten()
            for start in range(0, query_index.numel(), self.tile):
                idx = query_index[start : start + self.tile]
                group = max(1, self.block_elements // (idx.numel() * self.per_query))
                profiles = _c2f_profiles(self.coarse[i, idx].float(), self.fine[i, idx].float(), self, exclude, group)
                yield i, idx, profiles


def c2f_tiles(
    coarse: torch.Tensor,
    fine: torch.Tensor,
    coarse_valid: torch.Tensor | None = None,
    fine_valid: torch.Tensor | None = None,
    L: int = DEFAULT_ROUTES,  # noqa: N803
    query_tile: int = DEFAULT_QUERY_TILE,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
    volumes: Sequence[int] | None = None,
) -> Iterator[tuple[int, torch.Tensor, tuple[torch.Tensor, ...]]]:
    """The distance profiles behind :func:`c2f_scores`, one query tile at a time (for analysis).

    Yields ``(i, index, (coarse_d2, coarse_nn, fine_d2, fine_nn))`` for query volume ``i`` and its
    coarse tokens ``index``: ``[Q, B]`` / ``[Q, h, B]`` squared distances in the GEMM form (self column
    ``+inf``) and nearest indices (``fine_nn`` indexes the flattened ``N_c * h`` fine tokens of each
    volume, ``parent * h + child``). Arguments as in :func:`c2f_scores`.
    """
    yield from _C2FBank(coarse, fine, coarse_valid, fine_valid, L, query_tile, block_elements).tiles(volumes)


def c2f_scores(
    coarse: torch.Tensor,
    fine: torch.Tensor,
    coarse_valid: torch.Tensor | None = None,
    fine_valid: torch.Tensor | None = None,
    rho: float = 0.1,
    L: int = DEFAULT_ROUTES,  # noqa: N803
    query_tile: int = DEFAULT_QUERY_TILE,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
    volumes: Sequence[int] | None = None,
    groups: Sequence[object] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Coarse scores and coarse-to-fine routed fine scores (Sec. 3.5, Eq. 2 and 6).

    One coarse distance pass per (query tile, group of reference volumes) gives both the coarse
    nearest neighbour of each coarse query token in each other volume (hence the exact coarse scores,
    equal to :func:`mutual_similarity_scores` on ``coarse``) and its ``L`` nearest routable coarse
    tokens there. Each fine child of the query coarse token is then matched only against the fine
    children of those ``L`` coarse tokens (Eq. 6), and scores the mean of its ``K`` smallest
    approximate distances over the reference volumes. The routing indices live only for that block.

    Validity (an invalid token neither queries nor is matched, and scores 0):

    * coarse scores use ``coarse_valid`` exactly as the exact scorer does;
    * routing in a reference volume is over its coarse tokens that have at least one valid fine
      child (whatever their own coarse validity): every routed region then offers a candidate, so
      the approximate distance to a volume is always finite, and with ``L >= N_c`` the candidates are
      all valid fine tokens of that volume, so the fine scores equal
      :func:`mutual_similarity_scores` on the fine tokens (the correctness anchor of Sec. 3.5). With
      the inferer's masks and ``delta = 0`` the two masks coincide (a coarse token is valid iff one
      of its children is), and one reduction serves both;
    * a fine query is routed by its parent coarse token whether or not the parent is coarse-valid.

    Each approximate distance is an exhaustive minimum over a superset of the candidates of any
    smaller ``L`` (top-``L`` sets are nested), so fine scores never increase with ``L``.

    Args:
        coarse: ``[B, N_c, d]`` coarse tokens (any float dtype; accumulated in fp32).
        fine: ``[B, N_c, h, d]`` the ``h`` depth children of each coarse token, in depth order.
        coarse_valid: ``[B, N_c]`` bool or ``None`` (all valid).
        fine_valid: ``[B, N_c, h]`` bool or ``None`` (all valid).
        rho: neighbour ratio, ``K = max(1, floor(rho * (B - 1)))``.
        L: coarse routes per (query coarse token, reference volume); clipped to ``N_c``.
        query_tile: at most this many query coarse tokens together (fewer when ``L * h * d`` is large,
            to keep the gathered candidates within ``block_elements``).
        block_elements: element budget of the largest intermediate block.
        volumes: score only these volumes (see :func:`mutual_similarity_scores`).
        groups: optional subject of each volume (see :func:`mutual_similarity_scores`).

    Returns:
        ``(coarse_scores [B, N_c], fine_scores [B, N_c, h])`` fp32 on the device of ``coarse``.

    Raises:
        ValueError: ``B < 2``, bad shapes or ``L``, bad ``rho``, or a volume without any valid coarse
            or fine token.
    """
    bank = _C2FBank(coarse, fine, coarse_valid, fine_valid, L, query_tile, block_elements)
    b, n_c, h, _ = fine.shape
    same = _same_subject(groups, b)
    ks = _neighbours_per_volume(b, rho, same)
    coarse_scores = torch.zeros(b, n_c, dtype=torch.float32, device=coarse.device)
    fine_scores = torch.zeros(b, n_c, h, dtype=torch.float32, device=coarse.device)

    def fine_lookup(v: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return fine[v, torch.div(j, h, rounding_mode="floor"), j % h]

    for i, idx, (coarse_d2, coarse_nn, fine_d2, fine_nn) in bank.tiles(volumes, same):
        k = ks[i]
        coarse_q, fine_q = coarse[i, idx].float(), fine[i, idx].float()
        c = _mean_of_k_nearest(coarse_q, coarse_d2, coarse_nn, k, lambda v, j: coarse[v, j], block_elements)
        coarse_scores[i, idx] = torch.where(bank.coarse_valid[i, idx], c, 0.0)
        f = _mean_of_k_nearest(fine_q, fine_d2, fine_nn, k, fine_lookup, block_elements)
        fine_scores[i, idx] = torch.where(bank.fine_valid[i, idx], f, 0.0)
    return coarse_scores, fine_scores
