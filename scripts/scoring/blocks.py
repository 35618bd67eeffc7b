"""fp32 distance blocks between query tokens and reference volumes (paper Eq. 1): batched GEMMs over
valid tokens only, each reduced at once to the ``[Q, B]`` profile of nearest squared distances."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

__all__ = [
    "DEFAULT_BLOCK_ELEMENTS",
    "DEFAULT_QUERY_TILE",
    "distance_profile",
    "excluded",
    "pack_valid",
    "query_tiles",
    "reference_blocks",
    "sq_norms",
    "workspace",
]

# fp32 elements of the largest block (8 MiB): its GEMM output is still in cache when the min reads it.
DEFAULT_BLOCK_ELEMENTS = 1 << 21
DEFAULT_QUERY_TILE = 1024


def sq_norms(tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[B, N]`` fp32 squared norms of ``tokens [B, N, d]``, ``+inf`` where not ``valid``.

    A few volumes at a time through one fp32 buffer: an fp16 or memory-mapped bank is never copied whole.
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


def excluded(exclude: int | Sequence[int] | None) -> list[int]:
    """The excluded reference volumes, sorted: none, one volume, or several (one subject's scans)."""
    if exclude is None:
        return []
    return sorted({int(exclude)}) if isinstance(exclude, int) else sorted({int(e) for e in exclude})


def _group_ranges(b: int, exclude: int | Sequence[int] | None, group: int) -> Iterator[tuple[int, int]]:
    """Contiguous ranges of reference volumes, ``group`` at a time, skipping the volumes ``exclude``."""
    lo = 0
    for skip in [*excluded(exclude), b]:
        for start in range(lo, skip, group):
            yield start, min(start + group, skip)
        lo = skip + 1


def workspace(elements: int, device: torch.device) -> torch.Tensor:
    """A flat fp32 buffer reused by every block of a call (a fresh large CPU block costs its page faults)."""
    return torch.empty(elements, dtype=torch.float32, device=device)


def pack_valid(valid: torch.Tensor, norms: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(index [B, M], packed norms [B, M])``: each volume's valid token positions first (``M`` the largest
    valid count, padded with invalid ones); ``(None, norms)`` when every token is valid."""
    if bool(valid.all()):
        return None, norms
    m = int(valid.sum(dim=1).max())
    # A stable sort of the invalid flag puts valid tokens first and keeps their order.
    index = torch.argsort((~valid).to(torch.uint8), dim=1, stable=True)[:, :m]
    return index, norms.gather(1, index)


def reference_blocks(
    queries: torch.Tensor,
    tokens: torch.Tensor,
    ref_sq_norms: torch.Tensor,
    exclude: int | Sequence[int] | None,
    group: int,
    buffer: torch.Tensor | None = None,
    index: torch.Tensor | None = None,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``(start, stop, d2)`` per ``group`` of reference volumes but ``exclude``, ``d2 [G, Q, M] = |r|^2 - 2 q.r``.

    Args:
        queries: ``[Q, d]`` fp32.
        tokens: ``[B, N, d]`` references (any float dtype, cast to fp32 per block).
        ref_sq_norms: ``[B, M]`` fp32 squared norms in the order of ``index`` (``M = N`` without it).
        buffer: optional flat fp32 workspace; ``d2`` is a view of it when large enough.
        index: optional ``[B, M]`` token positions to read per volume (:func:`pack_valid`).
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
        if buffer is not None and buffer.numel() >= g * nq * n:
            out = buffer[: g * nq * n].view(g, nq, n)
        d2 = torch.baddbmm(norms, queries.expand(g, -1, -1), refs.transpose(1, 2), alpha=-2.0, out=out)
        yield start, stop, d2


def distance_profile(
    queries: torch.Tensor,
    tokens: torch.Tensor,
    ref_sq_norms: torch.Tensor,
    exclude: int | Sequence[int] | None,
    block_elements: int,
    buffer: torch.Tensor | None,
    index: torch.Tensor | None,
) -> torch.Tensor:
    """``[Q, B]`` squared distance (GEMM form less ``|q|^2``, which does not change the choice; not clamped;
    ``+inf`` for ``exclude``) of each query to its nearest token in every reference volume (Eq. 1), values
    only (``amin`` is much cheaper than ``min`` with indices on the CPU); arguments as in
    :func:`reference_blocks`, ``block_elements`` sets the group size."""
    b, nq = tokens.shape[0], queries.shape[0]
    group = max(1, block_elements // max(1, ref_sq_norms.shape[1] * nq))
    profile = torch.full((nq, b), float("inf"), dtype=torch.float32, device=queries.device)
    for start, stop, d2 in reference_blocks(queries, tokens, ref_sq_norms, exclude, group, buffer, index):
        profile[:, start:stop] = d2.amin(dim=-1).t()
    return profile


def query_tiles(index: torch.Tensor, tile: int) -> Iterator[torch.Tensor]:
    """``index`` split into near-equal tiles of at most ``tile`` (each tile re-reads the whole bank)."""
    count = index.numel()
    if count == 0:
        return
    tiles = -(-count // max(1, tile))
    size = -(-count // tiles)
    for start in range(0, count, size):
        yield index[start : start + size]
