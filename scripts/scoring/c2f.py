"""Coarse scores and coarse-to-fine routed fine scores (paper Sec. 3.5-3.6, Eq. 6): the coarse pass keeps,
per query coarse token and reference volume, its ``L`` nearest coarse tokens, whose fine children are
the only candidates of the query's fine children."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from scripts.scoring.blocks import (
    DEFAULT_BLOCK_ELEMENTS,
    DEFAULT_QUERY_TILE,
    pack_valid,
    reference_blocks,
    sq_norms,
    workspace,
)
from scripts.scoring.exact import (
    check_inputs,
    check_volumes,
    empty_volumes_error,
    k_nearest,
    mean_of_k_nearest,
    neighbours_per_volume,
    same_subject,
)

__all__ = ["CANDIDATE_ELEMENTS", "DEFAULT_ROUTES", "c2f_scores"]

DEFAULT_ROUTES = 16
# Elements of the reused buffer of gathered fine candidates on the CPU (see _candidate_elements).
CANDIDATE_ELEMENTS = 1 << 21


def _c2f_profiles(
    coarse_q: torch.Tensor, fine_q: torch.Tensor, bank: _C2FBank, exclude: int | Sequence[int], group: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(coarse_d2 [Q, B], coarse_nn [Q, B], fine_d2 [Q, h, B], fine_nn [Q, h, B])`` of one query tile
    (``coarse_q [Q, d]``, ``fine_q [Q, h, d]``) against every volume but ``exclude``, ``group`` per GEMM.
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
    blocks = reference_blocks(coarse_q, bank.coarse, bank.packed_norms, exclude, group, bank.workspace, bank.index)
    for start, stop, d2 in blocks:
        if masks is None:
            # The same reduction yields the coarse nearest neighbour (Eq. 1) and the routing (Eq. 6).
            top = d2.topk(routes, dim=-1, largest=False)  # sorted ascending
            route_index = top.indices  # [G, Q, L]
            best_values, best_index = top.values[..., 0], top.indices[..., 0]
        else:
            # Masks differ: d2 holds finite norms for the union; mask each reduction separately.
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
        # Restricted fine search (Eq. 6): the h children of the L routed coarse tokens, gathered for some
        # queries x the G reference volumes at a time into one reused buffer (bound by this gather).
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
                # [g * S, d, h] as the transpose of a contiguous [g * S, h, d]: MKL's faster layout.
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
    """Elements of the candidate buffer: 8 MiB on the CPU (stays in cache), the scorer's block on a GPU."""
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
        if coarse.ndim != 3:
            raise ValueError(f"coarse tokens must be [B, N_c, d], got shape {tuple(coarse.shape)}")
        b, n_c, d = coarse.shape
        if fine.ndim != 4 or fine.shape[:2] != (b, n_c) or fine.shape[3] != d:
            raise ValueError(
                f"fine tokens must be [B, N_c, h, d] = [{b}, {n_c}, h, {d}] (the h depth children of each "
                f"coarse token), got shape {tuple(fine.shape)}"
            )
        if isinstance(L, bool) or int(L) != L or L < 1:
            raise ValueError(f"L (coarse routes per reference volume) must be an int >= 1, got {L}")
        coarse_valid = check_inputs(coarse, coarse_valid)
        h = fine.shape[2]
        if fine_valid is None:
            fine_valid = torch.ones(b, n_c, h, dtype=torch.bool, device=fine.device)
        elif fine_valid.shape != (b, n_c, h):
            raise ValueError(f"fine_valid must be [B, N_c, h] = {(b, n_c, h)}, got {tuple(fine_valid.shape)}")
        fine_valid = fine_valid.to(device=fine.device, dtype=torch.bool)
        empty = torch.nonzero(fine_valid.flatten(1).sum(dim=1) == 0).flatten().tolist()
        if empty:
            raise empty_volumes_error(empty, "valid fine token")
        self.coarse_valid, self.fine_valid = coarse_valid, fine_valid
        self.coarse, self.fine = coarse, fine
        self.h = h
        # A coarse token is worth routing to iff it has a valid fine child (see c2f_scores).
        routable = self.fine_valid.any(dim=2)
        self.queries_of = self.coarse_valid | routable
        coarse_norms = sq_norms(coarse, self.queries_of)
        # The coarse GEMM and top-L read the union's positions only; ``index`` maps a packed column to its token.
        self.index, self.packed_norms = pack_valid(self.queries_of, coarse_norms)
        width = n_c if self.index is None else self.index.shape[1]
        self.routes = min(int(L), width)
        same = torch.equal(routable, self.coarse_valid)
        masks = None if same else (self.coarse_valid, routable)
        if masks is not None and self.index is not None:
            masks = tuple(m.gather(1, self.index) for m in masks)
        self.masks = masks
        # Rows of h children: one index_select row per routed coarse token (a view when contiguous).
        self.fine_rows = fine.reshape(b * n_c, h * d)
        self.fine_norm_rows = sq_norms(fine, self.fine_valid).reshape(b * n_c, h)
        self.per_query = width + 2 * self.routes
        self.tile = max(1, min(int(query_tile), block_elements // self.per_query))
        self.block_elements = block_elements
        self.workspace = workspace(block_elements, coarse.device)
        # Gathered fine candidates (rows of h*d values), reused by every block: at least one query's L routes.
        rows = _candidate_elements(fine.device, block_elements) // (h * d)
        self.candidates = torch.empty(max(self.routes, rows), h * d, dtype=fine.dtype, device=fine.device)

    def tiles(
        self, volumes: Sequence[int] | None, same: Sequence[Sequence[int]] | None = None
    ) -> Iterator[tuple[int, torch.Tensor, tuple]]:
        """``(i, index, profiles)`` per query tile of ``volumes``; ``same[i]``: not references of ``i``."""
        for i in check_volumes(volumes, self.coarse.shape[0]):
            exclude = [i, *same[i]] if same is not None and same[i] else i
            query_index = torch.nonzero(self.queries_of[i]).flatten()
            for start in range(0, query_index.numel(), self.tile):
                idx = query_index[start : start + self.tile]
                group = max(1, self.block_elements // (idx.numel() * self.per_query))
                profiles = _c2f_profiles(self.coarse[i, idx].float(), self.fine[i, idx].float(), self, exclude, group)
                yield i, idx, profiles


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

    The coarse scores equal :func:`mutual_similarity_scores` on ``coarse``; routes go to coarse tokens with a
    valid fine child, so with ``L >= N_c`` the fine scores equal it on the fine tokens (they never increase
    with ``L``). A fine query is routed by its parent, valid or not. Invalid tokens score 0.

    Args:
        coarse, coarse_valid: ``[B, N_c, d]`` coarse tokens (any float dtype), ``[B, N_c]`` bool or ``None``.
        fine, fine_valid: ``[B, N_c, h, d]`` the ``h`` depth children of each coarse token, ``[B, N_c, h]`` or ``None``.
        L: coarse routes per (query coarse token, reference volume); clipped to ``N_c``.
        rho, query_tile, block_elements, volumes, groups: as in :func:`mutual_similarity_scores`.

    Returns:
        ``(coarse_scores [B, N_c], fine_scores [B, N_c, h])`` fp32 on the device of ``coarse``.
    """
    bank = _C2FBank(coarse, fine, coarse_valid, fine_valid, L, query_tile, block_elements)
    b, n_c, h, _ = fine.shape
    same = same_subject(groups, b)
    ks = neighbours_per_volume(b, rho, same)
    coarse_scores = torch.zeros(b, n_c, dtype=torch.float32, device=coarse.device)
    fine_scores = torch.zeros(b, n_c, h, dtype=torch.float32, device=coarse.device)

    def fine_lookup(v: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return fine[v, torch.div(j, h, rounding_mode="floor"), j % h]

    for i, idx, (coarse_d2, coarse_nn, fine_d2, fine_nn) in bank.tiles(volumes, same):
        k = ks[i]
        coarse_q, fine_q = coarse[i, idx].float(), fine[i, idx].float()
        chosen = k_nearest(coarse_d2, k)  # [Q, K]
        c = mean_of_k_nearest(coarse_q, chosen, coarse_nn.gather(-1, chosen), lambda v, j: coarse[v, j], block_elements)
        coarse_scores[i, idx] = torch.where(bank.coarse_valid[i, idx], c, 0.0)
        chosen = k_nearest(fine_d2, k)  # [Q, h, K]
        f = mean_of_k_nearest(fine_q, chosen, fine_nn.gather(-1, chosen), fine_lookup, block_elements)
        fine_scores[i, idx] = torch.where(bank.fine_valid[i, idx], f, 0.0)
    return coarse_scores, fine_scores
