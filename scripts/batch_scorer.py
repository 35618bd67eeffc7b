"""Token scores of a batch of volumes, one (axis, layer) at a time (paper Eq. 1-2, and Eq. 6 for F/MS).

:class:`BatchScorer` turns a batch of :class:`scripts.tokens.VolumeTokens` into per-volume score grids
with the exact scorers of :mod:`scripts.scoring`. It knows three shapes of reference set, chosen by
:mod:`scripts.references`: the other volumes of the batch (:meth:`BatchScorer.exact`), a reference
subset per query volume (:meth:`BatchScorer.subsets`) and an external reference bank
(:meth:`BatchScorer.against_bank`). Each (axis, layer) is scored independently and freed before the
next, so at most one key's batch is held besides the bank itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch
from scripts.mixed_precision import check_precision
from scripts.scoring import (
    DEFAULT_BLOCK_ELEMENTS,
    DEFAULT_QUERY_TILE,
    c2f_scores,
    mutual_similarity_scores,
    reference_scores,
    subset_scores,
)
from scripts.tokens import FINE_SUFFIX, TokenGrid, VolumeTokens, batch_of, check_same_grids, children_last

__all__ = ["BatchScorer", "TokenScores", "check_precision"]

#: per volume, ``{key: [M, P, P]}`` fp32 token scores (``{}`` for volumes that were not queried)
TokenScores = list[dict[str, torch.Tensor]]


class BatchScorer:
    """Scores a batch of token grids per (axis, layer).

    Args:
        variant: ``"C"`` (coarse tokens, Eq. 1-2) or ``"F"`` / ``"MS"`` (coarse and C2F fine scores, Eq. 6).
        rho: neighbour ratio of Eq. 2.
        L: coarse routes per (query coarse token, reference volume) of the C2F search.
        query_tile: scorer query tile (see :func:`scripts.scoring.mutual_similarity_scores`).
        block_elements: scorer block budget.
        score_device: device of the scoring step (default: where the tokens are).
        progress: show a progress bar over the (axis, layer) keys.
        precision: distance pass of the exact C scorer (``"fp32"``, ``"bf16"``, ``"tf32"`` or ``"auto"``,
            see :func:`scripts.scoring.mutual_similarity_scores`); the other scorers run in fp32.
    """

    def __init__(
        self,
        variant: str,
        rho: float,
        L: int,  # noqa: N803
        query_tile: int,
        block_elements: int,
        score_device: torch.device | None = None,
        progress: bool = False,
        precision: str = "fp32",
    ) -> None:
        if isinstance(L, bool) or int(L) != L or L < 1:
            raise ValueError(f"L (coarse routes per reference volume) must be an int >= 1, got {L}")
        self.variant, self.rho, self.L = variant, rho, int(L)
        self.query_tile, self.block_elements = query_tile, block_elements
        self.score_device, self.progress = score_device, progress
        self.precision = check_precision(precision)

    def budget(self, device: torch.device) -> tuple[int, int]:
        """``(query_tile, block_elements)`` on ``device``: as given on the CPU; on a GPU, the defaults
        grow with the free memory (blocks of up to 2^27 fp32 elements, 1/16 of what is free, and query
        tiles of whole volumes), since every block is a few kernel launches whatever its size."""
        tile, block = self.query_tile, self.block_elements
        if device.type != "cuda" or (tile, block) != (DEFAULT_QUERY_TILE, DEFAULT_BLOCK_ELEMENTS):
            return tile, block
        free, _ = torch.cuda.mem_get_info(device)
        block = max(block, min(1 << 27, free // (16 * 4)))
        return max(tile, 1 << 14), block

    def _key_batches(
        self, bank: Sequence[VolumeTokens], keys: Sequence[str], desc: str
    ) -> Iterator[tuple[str, tuple[int, int, int], torch.Tensor, torch.Tensor]]:
        """``(key, grid shape, tokens [B, N, d], valid [B, N])`` per key, on the scoring device."""
        iterator: Iterable[str] = keys
        if self.progress:
            from tqdm.auto import tqdm

            iterator = tqdm(keys, desc=desc, unit="grid")
        for key in iterator:
            device = self.score_device or bank[0].grids[key].tokens.device
            tokens, valid = (t.to(device) for t in batch_of(bank, key))
            yield key, bank[0].grids[key].shape, tokens, valid
            del tokens, valid  # a stacked copy goes before the next key's is made

    def exact(
        self,
        bank: Sequence[VolumeTokens],
        queries: Sequence[int] | None = None,
        subjects: Sequence[object] | None = None,
    ) -> TokenScores:
        """Every volume of ``queries`` (default: all) against all other volumes of ``bank``, except the
        other scans of its subject when ``subjects`` (one per volume) is given.

        For F/MS the result also holds ``key + "/fine"`` grids ``[M * h, P, P]`` of C2F fine scores,
        the coarse ones coming from the same coarse distance pass.
        """
        if len(bank) < 2:
            raise ValueError(f"CS3F scores volumes against each other: need at least 2 volumes, got {len(bank)}")
        keys = check_same_grids(bank)
        coarse_keys = [k for k in keys if not k.endswith(FINE_SUFFIX)]
        if self.variant != "C":
            missing = [k for k in coarse_keys if k + FINE_SUFFIX not in keys]
            if missing:
                raise ValueError(
                    f"variant {self.variant!r} needs fine token grids, missing {missing[0] + FINE_SUFFIX!r}: "
                    f"tokenize with this inferer (q_fine set)"
                )
        results: TokenScores = [{} for _ in bank]
        wanted = range(len(bank)) if queries is None else sorted({int(i) for i in queries})
        for key, shape, tokens, valid in self._key_batches(bank, coarse_keys, "scoring (axis/layer)"):
            try:
                if self.variant == "C":
                    tile, block = self.budget(tokens.device)
                    scores = mutual_similarity_scores(
                        tokens, valid, self.rho, tile, block, volumes=queries, groups=subjects, precision=self.precision
                    )
                else:
                    scores = self._c2f(bank, key, shape, tokens, valid, (queries, wanted, subjects), results)
            except ValueError as err:
                raise ValueError(f"{key}: {err}") from None
            for i in wanted:
                results[i][key] = scores[i].cpu().reshape(shape)
            del tokens, valid
        return results

    def _c2f(
        self,
        bank: Sequence[VolumeTokens],
        key: str,
        shape: tuple[int, int, int],
        tokens: torch.Tensor,
        valid: torch.Tensor,
        who: tuple[Sequence[int] | None, Iterable[int], Sequence[object] | None],
        results: TokenScores,
    ) -> torch.Tensor:
        """Coarse scores of ``key`` (returned) and its fine scores (written into ``results``);
        ``who`` is ``(queries, wanted, subjects)`` as in :meth:`exact`."""
        queries, wanted, subjects = who
        fine_shape = bank[0].grids[key + FINE_SUFFIX].shape
        h = fine_shape[0] // shape[0]
        fine, fine_valid = (
            torch.stack([children_last(getattr(vt.grids[key + FINE_SUFFIX], attr), h) for vt in bank]).to(tokens.device)
            for attr in ("tokens", "valid")
        )
        tile, block = self.budget(tokens.device)
        scores, fine_scores = c2f_scores(
            tokens, fine, valid, fine_valid, self.rho, self.L, tile, block, volumes=queries, groups=subjects
        )
        for i in wanted:  # [N_c, h] -> [M * h, P, P]
            grid = fine_scores[i].cpu().reshape(*shape, h).permute(0, 3, 1, 2)
            results[i][key + FINE_SUFFIX] = grid.reshape(fine_shape)
        return scores

    def subsets(self, bank: Sequence[VolumeTokens], subsets: Mapping[int, Sequence[int]]) -> TokenScores:
        """CS3F-C of each query volume against its own reference subset (one gather per query, no
        per-query batch; :func:`scripts.scoring.subset_scores`)."""
        keys = check_same_grids(bank)
        results: TokenScores = [{} for _ in bank]
        batches = self._key_batches(bank, keys, "scoring vs reference subsets (axis/layer)")
        for key, shape, tokens, valid in batches:
            try:
                scores = subset_scores(tokens, valid, subsets, self.rho, self.query_tile, self.block_elements)
            except ValueError as err:
                raise ValueError(f"{key}: {err}") from None
            for i in subsets:
                results[i][key] = scores[i].cpu().reshape(shape)
            del tokens, valid
        return results

    def against_bank(
        self,
        references: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
        bank: Sequence[VolumeTokens],
        wanted: Sequence[int],
        skips: Sequence[int | Sequence[int] | None],
    ) -> TokenScores:
        """Volumes ``wanted`` of ``bank`` against the reference bank's volumes only.

        Args:
            references: ``{key: (tokens [B_ref, N, d], valid [B_ref, N])}`` (e.g. memory-mapped fp16).
            bank: the new volumes' tokens.
            wanted: indices into ``bank`` to score.
            skips: per volume of ``bank``, the reference index that is that same scan (or the indices of
                every scan of its subject), or ``None``.
        """
        results: TokenScores = [{} for _ in bank]
        keys = list(bank[0].grids)
        if self.variant != "C":
            # C2F needs the fine tokens of every reference at once: score each new volume on the batch
            # of itself and the references (one copy of the bank's tokens in memory at a time).
            b_ref = next(iter(references.values()))[0].shape[0]
            for i in wanted:
                like = bank[i]
                skip = _skipped(skips[i])
                refs = [_reference_volume(references, keys, j, like) for j in range(b_ref) if j not in skip]
                results[i] = self.exact([like, *refs], [0])[0]
            return results
        batches = self._key_batches([bank[i] for i in wanted], keys, "scoring vs bank (axis/layer)")
        for key, shape, tokens, valid in batches:
            ref_tokens, ref_valid = references[key]
            try:
                scores = reference_scores(
                    tokens,
                    valid,
                    ref_tokens,
                    ref_valid,
                    self.rho,
                    [skips[i] for i in wanted],
                    self.query_tile,
                    self.block_elements,
                )
            except ValueError as err:
                raise ValueError(f"{key}: {err}") from None
            for row, i in enumerate(wanted):
                results[i][key] = scores[row].cpu().reshape(shape)
        return results


def _skipped(skip: int | Sequence[int] | None) -> set[int]:
    if skip is None:
        return set()
    return {int(skip)} if isinstance(skip, int) else {int(s) for s in skip}


def _reference_volume(
    references: Mapping[str, tuple[torch.Tensor, torch.Tensor]], keys: Sequence[str], j: int, like: VolumeTokens
) -> VolumeTokens:
    """Reference ``j`` of a bank as a :class:`VolumeTokens` on the grids of ``like`` (views, no copy)."""
    d = like.grids[keys[0]].tokens.shape[-1]
    grids = {
        k: TokenGrid(references[k][0][j].view(*like.grids[k].shape, d), references[k][1][j].view(like.grids[k].shape))
        for k in keys
    }
    return VolumeTokens(spatial_shape=like.spatial_shape, grids=grids)
