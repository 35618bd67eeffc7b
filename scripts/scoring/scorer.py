"""The one entry point of scoring: a cohort's token grids against a reference plan (Eq. 1-2, Eq. 6), each
(axis, layer) scored and freed before the next."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from scripts.progress import Progress
from scripts.scoring.against import reference_scores, subset_scores
from scripts.scoring.blocks import DEFAULT_BLOCK_ELEMENTS, DEFAULT_QUERY_TILE, excluded
from scripts.scoring.c2f import c2f_scores
from scripts.scoring.exact import mutual_similarity_scores
from scripts.scoring.references import ReferencePlan
from scripts.tokens import FINE_SUFFIX, TokenGrid, VolumeTokens, batch_of, check_same_grids, children_last

__all__ = [
    "PRECISIONS",
    "BankTokens",
    "Scorer",
    "TokenScores",
    "check_bank_grids",
    "check_precision",
    "resolve_precision",
]

#: per volume, ``{key: [M, P, P]}`` fp32 token scores (``{}`` for volumes that were not queried)
TokenScores = list[dict[str, torch.Tensor]]
#: values of the ``score_precision`` key: the distance pass is fp32 on every device
PRECISIONS = ("auto", "fp32")
#: ``{key: (tokens [B_ref, N, d], valid [B_ref, N])}`` of a reference bank
BankTokens = Mapping[str, tuple[torch.Tensor, torch.Tensor]]


def check_precision(precision: str) -> str:
    """``precision`` normalised (one of :data:`PRECISIONS`), or ``ValueError``."""
    name = str(precision).strip().lower()
    if name not in PRECISIONS:
        raise ValueError(
            f"score_precision must be one of {', '.join(PRECISIONS)} (scores are computed in fp32), got {precision!r}"
        )
    return name


def resolve_precision(precision: str, device: torch.device | str) -> str:  # noqa: ARG001
    """The distance pass that ``precision`` means on ``device``: always ``"fp32"`` (after the check)."""
    check_precision(precision)
    return "fp32"


class Scorer:
    """Scores a cohort's token grids per (axis, layer) against a :class:`ReferencePlan`.

    Args:
        variant: ``"C"`` (coarse tokens, Eq. 1-2) or ``"F"`` / ``"MS"`` (coarse and C2F fine scores, Eq. 6).
        rho: neighbour ratio of Eq. 2.
        L: coarse routes per (query coarse token, reference volume) of the C2F search.
        query_tile: scorer query tile (see :func:`scripts.scoring.mutual_similarity_scores`).
        block_elements: scorer block budget.
        score_device: device of the scoring step (default: where the tokens are).
        progress: show progress: per (axis, layer), and per volume pair inside one for CS3F-C.
        precision: the ``score_precision`` key (:data:`PRECISIONS`), kept for the run record.
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

    def score(
        self, bank: Sequence[VolumeTokens], plan: ReferencePlan, reference_bank: BankTokens | None = None
    ) -> TokenScores:
        """Token scores of the plan's queries of ``bank`` against their references (``reference_bank``: the
        bank's tokens, for a plan with ``skips``).

        Returns:
            per volume, ``{key: [M, P, P]}`` fp32 token scores (0 for invalid tokens); for F/MS also
            ``{key + "/fine": [M * h, P, P]}`` C2F fine scores. Volumes not queried get ``{}``.
        """
        if plan.skips is not None:
            if reference_bank is None:
                raise ValueError("a reference-bank plan needs the bank's tokens (reference_bank)")
            check_bank_grids(reference_bank, bank)
            return self.against_bank(reference_bank, bank, plan.queries, plan.skips)
        if plan.subsets is not None:
            if self.variant == "C":
                return self.subsets(bank, plan.subsets)
            # F/MS: each query on the batch of itself and its references (the draw left out its subject).
            return self._score_batches(bank, [((i, *plan.subsets[i]), [0], None) for i in plan.queries], "volume")
        if plan.batches == (tuple(range(len(bank))),):
            return self.exact(bank, plan.queries, plan.subjects)
        jobs = [(m, plan.batch_queries(m), plan.batch_subjects(m)) for m in plan.batches]
        return self._score_batches(bank, jobs, "chunk")

    def budget(self, device: torch.device) -> tuple[int, int]:
        """``(query_tile, block_elements)`` on ``device``: as given, but the defaults grow with a GPU's free memory."""
        tile, block = self.query_tile, self.block_elements
        if device.type != "cuda" or (tile, block) != (DEFAULT_QUERY_TILE, DEFAULT_BLOCK_ELEMENTS):
            return tile, block
        free, _ = torch.cuda.mem_get_info(device)
        block = max(block, min(1 << 27, free // (16 * 4)))
        return max(tile, 1 << 14), block

    def _per_key(
        self,
        bank: Sequence[VolumeTokens],
        keys: Sequence[str],
        desc: str,
        score: Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor],
        rows: Iterable[tuple[int, int]],
        results: TokenScores,
        show: bool = True,
    ) -> TokenScores:
        """Key by key on the scoring device: ``results[i][key]`` = row ``r`` of ``score(key, tokens [B, N, d],
        valid [B, N])`` for each ``(r, i)`` of ``rows``; ``show``: one progress step per key."""
        rows = list(rows)
        with Progress(desc, len(keys), unit="grid", enabled=self.progress and show) as progress:
            for key in keys:
                shape = bank[0].grids[key].shape
                device = self.score_device or bank[0].grids[key].tokens.device
                tokens, valid = (t.to(device) for t in batch_of(bank, key))
                try:
                    scores = score(key, tokens, valid)
                except ValueError as err:
                    raise ValueError(f"{key}: {err}") from None
                for r, i in rows:
                    results[i][key] = scores[r].cpu().reshape(shape)
                del tokens, valid, scores  # a stacked copy goes before the next key's is made
                progress.update(detail=key)
        return results

    def exact(
        self,
        bank: Sequence[VolumeTokens],
        queries: Sequence[int] | None = None,
        subjects: Sequence[object] | None = None,
    ) -> TokenScores:
        """Every volume of ``queries`` (default: all) against all other volumes of ``bank`` but its subject's
        other scans; for F/MS also the ``key + "/fine"`` grids ``[M * h, P, P]`` of C2F fine scores."""
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

        def score(key: str, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
            if self.variant != "C":
                return self._c2f(bank, key, tokens, valid, (queries, wanted, subjects), results)
            tile, block = self.budget(tokens.device)
            stage = f"scoring {key} ({coarse_keys.index(key) + 1}/{len(coarse_keys)}): volume pair"
            with Progress(stage, 0, unit="pair", enabled=self.progress) as progress:
                return mutual_similarity_scores(
                    tokens, valid, self.rho, tile, block, queries, subjects, progress.update_to
                )

        rows = [(i, i) for i in wanted]
        return self._per_key(bank, coarse_keys, "scoring grids", score, rows, results, show=self.variant != "C")

    def _c2f(
        self,
        bank: Sequence[VolumeTokens],
        key: str,
        tokens: torch.Tensor,
        valid: torch.Tensor,
        who: tuple[Sequence[int] | None, Iterable[int], Sequence[object] | None],
        results: TokenScores,
    ) -> torch.Tensor:
        """Coarse scores of ``key`` (returned) and its fine scores (into ``results``); ``who`` as in :meth:`exact`."""
        queries, wanted, subjects = who
        shape = bank[0].grids[key].shape
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

    def _score_batches(
        self,
        bank: Sequence[VolumeTokens],
        jobs: Sequence[tuple[Sequence[int], list[int], list[object] | None]],
        what: str,
    ) -> TokenScores:
        """Score each job ``(members, local queries, subjects)`` as its own batch, under one progress bar."""
        results: TokenScores = [{} for _ in bank]
        progress, self.progress = self.progress, False
        try:
            with Progress(f"scoring {what}", len(jobs), unit=what, enabled=progress) as bar:
                for members, local, groups in jobs:
                    scored = self.exact([bank[j] for j in members], local, groups)
                    for j in local:  # a copy: a view would keep the job's whole score grid alive
                        results[members[j]] = {k: v.clone() for k, v in scored[j].items()}
                    bar.update()
        finally:
            self.progress = progress
        return results

    def subsets(self, bank: Sequence[VolumeTokens], subsets: Mapping[int, Sequence[int]]) -> TokenScores:
        """CS3F-C of each query volume against its own reference subset (:func:`scripts.scoring.subset_scores`)."""
        keys = check_same_grids(bank)

        def score(key: str, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
            return subset_scores(tokens, valid, subsets, self.rho, self.query_tile, self.block_elements)

        desc = "scoring grids against reference subsets"
        return self._per_key(bank, keys, desc, score, [(i, i) for i in subsets], [{} for _ in bank])

    def against_bank(
        self,
        references: BankTokens,
        bank: Sequence[VolumeTokens],
        wanted: Sequence[int],
        skips: Sequence[int | Sequence[int] | None],
    ) -> TokenScores:
        """Volumes ``wanted`` of ``bank`` against the reference bank's volumes only, each but its ``skips`` entry."""
        results: TokenScores = [{} for _ in bank]
        keys = list(bank[0].grids)
        if self.variant != "C":
            # C2F needs the fine tokens of every reference at once: score each new volume on the batch
            # of itself and the references (one copy of the bank's tokens in memory at a time).
            b_ref = next(iter(references.values()))[0].shape[0]
            for i in wanted:
                like = bank[i]
                skip = set(excluded(skips[i]))
                refs = [_reference_volume(references, keys, j, like) for j in range(b_ref) if j not in skip]
                results[i] = self.exact([like, *refs], [0])[0]
            return results

        def score(key: str, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
            ref_tokens, ref_valid = references[key]
            excludes = [skips[i] for i in wanted]
            return reference_scores(
                tokens, valid, ref_tokens, ref_valid, self.rho, excludes, self.query_tile, self.block_elements
            )

        desc = "scoring grids against the bank"
        return self._per_key([bank[i] for i in wanted], keys, desc, score, enumerate(wanted), results)


def check_bank_grids(references: BankTokens, bank: Sequence[VolumeTokens]) -> None:
    """Raise ``ValueError`` unless every grid of every new volume matches the reference bank's."""
    for key in bank[0].grids:
        if key not in references:
            fine = " (fine tokens: build the bank with variant F or MS)" if key.endswith(FINE_SUFFIX) else ""
            raise ValueError(f"the reference bank has no {key!r} tokens{fine}; it has {sorted(references)}")
        n_ref, d = references[key][0].shape[1:]
        for i, vt in enumerate(bank):
            grid = vt.grids.get(key)
            if grid is None or grid.valid.numel() != n_ref or grid.tokens.shape[-1] != d:
                got = "missing" if grid is None else f"{tuple(grid.shape)} x d={grid.tokens.shape[-1]}"
                raise ValueError(
                    f"volume {i}: {key} token grid {got} does not match the reference bank's "
                    f"{n_ref} tokens x d={d}: volumes must be on its grid"
                )


def _reference_volume(references: BankTokens, keys: Sequence[str], j: int, like: VolumeTokens) -> VolumeTokens:
    """Reference ``j`` of a bank as a :class:`VolumeTokens` on the grids of ``like`` (views, no copy)."""
    d = like.grids[keys[0]].tokens.shape[-1]
    grids = {
        k: TokenGrid(references[k][0][j].view(*like.grids[k].shape, d), references[k][1][j].view(like.grids[k].shape))
        for k in keys
    }
    return VolumeTokens(spatial_shape=like.spatial_shape, grids=grids)
