"""``CS3FInferer``: volumes -> volumetric tokens -> cross-subject scores -> voxel anomaly maps, streamed
(:meth:`~CS3FInferer.tokenize`, :meth:`~CS3FInferer.score`, :meth:`~CS3FInferer.voxel_map`) or in one call
on an in-memory batch: ``maps, scores = inferer(batch, encoder, masks)``."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from monai.inferers import Inferer
from scripts.anomaly_map import EDGES, SUBJECT_SCORES, VARIANTS, fuse_token_scores, smooth_map, subject_score
from scripts.errors import CS3FInputError, as_choice, as_float, as_int
from scripts.progress import Progress
from scripts.scoring import DEFAULT_BLOCK_ELEMENTS, DEFAULT_QUERY_TILE, DEFAULT_ROUTES, num_neighbours
from scripts.scoring.references import ReferenceSet, bank_plan, plan_references
from scripts.scoring.scorer import BankTokens, Scorer, TokenScores
from scripts.tokens import FINE_SUFFIX, BatchBuffer, TokenGrid, Tokenizer, VolumeTokens, canonical_axes, per_axis
from scripts.transforms.tokenization import AXES

__all__ = ["BatchBuffer", "TokenGrid", "VolumeTokens", "CS3FInferer", "VARIANTS", "FINE_SUFFIX", "TOKEN_DTYPES"]

TOKEN_DTYPES = ("float32", "float16", "bfloat16")


def _pooling(axes, q, variant, q_fine) -> tuple[list[str], dict[str, int], str, dict[str, int] | None]:  # noqa: ANN001
    """The slicing axes, ``q``, the variant and ``q_fine`` per axis (F/MS: ``q = h * q_fine``; C: ``None``), checked."""
    axes = canonical_axes(axes)
    q = dict(zip(AXES, per_axis(q, "q"), strict=True))
    variant = as_choice(variant, "variant", VARIANTS, upper=True)  # coarse, fine (C2F), multi-scale
    if variant == "C":
        return axes, q, variant, None
    if q_fine is None:
        raise ValueError(f"variant {variant!r} needs q_fine (e.g. [2, 2, 2]), got None")
    fine = dict(zip(AXES, per_axis(q_fine, "q_fine"), strict=True))
    for axis in axes:
        if q[axis] % fine[axis]:
            raise ValueError(
                f"coarse-to-fine needs q = h * q_fine on every axis: on the {axis} axis q_c={q[axis]} "
                f"is not a multiple of q_f={fine[axis]}"
            )
    return axes, q, variant, fine


def _map_options(edge: object, smooth_mm: object, subject_score: object) -> tuple[str, float, str]:
    smooth = as_float(smooth_mm, "smooth_mm", math.isfinite, "a number")
    smooth_map(torch.zeros(1, 1, 1, 1), smooth)  # checks its range
    return as_choice(edge, "edge", EDGES), smooth, as_choice(subject_score, "subject_score", SUBJECT_SCORES)


def _token_dtype(value: torch.dtype | str) -> torch.dtype:
    return getattr(torch, as_choice(value, "token_dtype", TOKEN_DTYPES)) if isinstance(value, str) else value


def _mm(volume: torch.Tensor) -> list[float] | None:
    return [float(s) for s in volume.pixdim] if hasattr(volume, "pixdim") else None


class CS3FInferer(Inferer):
    """Batch mutual-similarity anomaly scoring of 3D volumes with a frozen 2D encoder.

    Args:
        axes: axes to slice along, any subset of ``("sagittal", "coronal", "axial")`` (or S, C, A).
        q: (coarse) depth-pooling size per axis, ``(q_sagittal, q_coronal, q_axial)``, or one int.
        rho: neighbour ratio of Eq. 2, ``K = max(1, floor(rho * (B - 1)))``.
        d: random-projection dimension.
        delta: token validity threshold on the foreground fraction (used when masks are given).
        seed: seed of the projection matrices and of the ``random`` reference draw.
        slab_size: slices per encoder forward; rounded to a multiple of ``q``.
        token_dtype: storage dtype of tokens (scoring accumulates in fp32).
        score_device: device of the scoring step (default: where the tokens are).
        query_tile, block_elements: see :func:`scripts.scoring.mutual_similarity_scores`.
        progress: show progress bars.
        variant: ``"C"`` coarse map (CS3F-C), ``"F"`` fine C2F map (CS3F-F), ``"MS"`` their mean (Eq. 7).
        q_fine: fine depth-pooling size per axis (or one int) for F/MS; must divide ``q`` on every used axis.
        L: coarse routes per (query coarse token, reference volume) of the C2F search (Eq. 6).
        references: the reference set: ``"all"`` (the paper), ``"chunks:N"``, ``"random:N"`` or ``"bank:DIR"``.
        edge: ``"zero"`` (the paper) or ``"normalized"`` (see :mod:`scripts.anomaly_map`).
        smooth_mm: sigma (mm) of a Gaussian on each map inside its mask; 0: off (the paper).
        subject_score: ``"max"`` (the paper) or ``"robust_z"`` (:func:`scripts.anomaly_map.subject_score`).
        score_precision: ``"fp32"`` or ``"auto"``: scores are fp32 on every device; the value is recorded.
        depth_phases: coarse tokens pooled at this many slice offsets, maps averaged (1: the paper; C only).

    Raises:
        CS3FInputError: a bad argument or combination, before any work.
    """

    def __init__(
        self,
        axes: Sequence[str | int] = AXES,
        q: int | Sequence[int] = (14, 14, 14),
        rho: float = 0.1,
        d: int = 128,
        delta: float = 0.0,
        seed: int = 0,
        slab_size: int = 32,
        token_dtype: torch.dtype | str = torch.float32,
        score_device: str | torch.device | None = None,
        query_tile: int = DEFAULT_QUERY_TILE,
        block_elements: int = DEFAULT_BLOCK_ELEMENTS,
        progress: bool = False,
        variant: str = "C",
        q_fine: int | Sequence[int] | None = None,
        L: int = DEFAULT_ROUTES,  # noqa: N803
        references: ReferenceSet | str | Mapping | None = None,
        edge: str = "zero",
        smooth_mm: float = 0.0,
        subject_score: str = "max",
        score_precision: str = "fp32",
        depth_phases: int = 1,
    ) -> None:
        super().__init__()
        try:
            self.axes, self.q, self.variant, self.q_fine = _pooling(axes, q, variant, q_fine)
            self.references = ReferenceSet.parse(references)
            self.edge, self.smooth_mm, self.subject_statistic = _map_options(edge, smooth_mm, subject_score)
            self.rho = as_float(rho, "rho", math.isfinite, "a number")
            num_neighbours(2, self.rho)  # the range of rho is the rule of Eq. 2's K
            self.d, self.delta = as_int(d, "d", 1), as_float(delta, "delta", lambda x: 0 <= x < 1, "a number in [0, 1)")
            self.seed, self.token_dtype = as_int(seed, "seed"), _token_dtype(token_dtype)
            token_args = (self.d, self.delta, self.seed, as_int(slab_size, "slab_size", 1), self.token_dtype)
            phases = as_int(depth_phases, "depth_phases")
            self.tokenizer = Tokenizer(self.axes, self.q, self.q_fine, *token_args, phases)
            device = torch.device(score_device) if score_device is not None else None
            self.scorer = Scorer(
                self.variant, self.rho, L, int(query_tile), int(block_elements), device, progress, score_precision
            )
        except CS3FInputError:
            raise
        except ValueError as err:
            raise CS3FInputError(str(err)) from None

    @property
    def L(self) -> int:  # noqa: N802
        return self.scorer.L

    @property
    def progress(self) -> bool:
        return self.scorer.progress

    @progress.setter
    def progress(self, value: bool) -> None:
        self.scorer.progress = value

    def tokenize(self, volume: torch.Tensor, encoder: Callable, mask: torch.Tensor | None = None) -> VolumeTokens:
        """Tokens of one volume ``[1, H, W, D]`` in ``[0, 1]`` (see :class:`scripts.tokens.Tokenizer`)."""
        return self.tokenizer(volume, encoder, mask)

    def score(
        self,
        bank: Sequence[VolumeTokens],
        queries: Sequence[int] | None = None,
        names: Sequence[str] | None = None,
        subjects: Sequence[object] | None = None,
        reference_bank: BankTokens | None = None,
        exclude: Sequence[int | Sequence[int] | None] | None = None,
    ) -> TokenScores:
        """Cross-subject token scores (Eq. 1-2; Eq. 6 for F/MS), see :meth:`scripts.scoring.scorer.Scorer.score`.

        Args:
            bank: tokens of the volumes of the batch (``B >= 2``; ``>= 1`` against a reference bank).
            queries: score only these volumes (indices into ``bank``); ``None``: all.
            names: volume names that seed the ``random:N`` draw; ``None``: the positions.
            subjects: the subject of each volume; scans of one subject are never references for each other.
            reference_bank: ``{key: (tokens [B_ref, N, d], valid [B_ref, N])}``: score against it only.
            exclude: with ``reference_bank``: per volume, the bank index (or indices) of itself or its subject.
        """
        if reference_bank is not None:
            plan = bank_plan(len(bank), queries, exclude)
        else:
            plan = plan_references(self.references, len(bank), self.seed, queries, names, subjects)
        return self.scorer.score(bank, plan, reference_bank)

    def voxel_map(
        self,
        token_scores: dict[str, torch.Tensor],
        spatial_shape: Sequence[int],
        mask: torch.Tensor | None = None,
        axis_max: dict[str, float] | None = None,
        variant: str | None = None,
        validity: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Voxel anomaly map ``[1, H, W, D]`` of one volume (:func:`scripts.anomaly_map.fuse_token_scores`)."""
        variant, phases = self.variant if variant is None else variant, self.tokenizer.depth_phases
        validity = validity if self.edge == "normalized" else None
        return fuse_token_scores(token_scores, spatial_shape, variant, mask, axis_max, validity, phases)

    def finish_map(
        self, anomaly_map: torch.Tensor, mask: torch.Tensor | None = None, spacing: Sequence[float] | None = None
    ) -> tuple[torch.Tensor, float]:
        """``(map, subject score)`` from a fused voxel map ``[1, H, W, D]``: smoothing, then the score."""
        amap = smooth_map(anomaly_map, self.smooth_mm, mask, spacing)
        return amap, subject_score(amap, mask, self.subject_statistic)

    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor | Sequence[torch.Tensor],
        network: Callable,
        masks: torch.Tensor | Sequence[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor | list[torch.Tensor], torch.Tensor]:
        """``(maps [B, 1, H, W, D] (a list for inputs of different shapes), subject scores [B])`` of ``inputs``
        ``[B, 1, H, W, D]`` (or a list of volumes whose token grids agree) and optional ``masks`` alike."""
        volumes = list(inputs)
        mask_list = list(masks) if masks is not None else [None] * len(volumes)
        if len(mask_list) != len(volumes):
            raise ValueError(f"got {len(volumes)} volumes but {len(mask_list)} masks")
        bank = []
        with Progress("encoding volume", len(volumes), unit="vol", enabled=self.progress) as progress:
            for v, m in zip(volumes, mask_list, strict=True):
                bank.append(self.tokenize(v, network, m))
                progress.update()
        token_scores = self.score(bank)
        finished = [
            self.finish_map(self.voxel_map(ts, vt.spatial_shape, m, validity=vt.validity()), m, _mm(v))
            for ts, vt, v, m in zip(token_scores, bank, volumes, mask_list, strict=True)
        ]
        maps, scores = [amap for amap, _ in finished], torch.tensor([score for _, score in finished])
        if isinstance(inputs, torch.Tensor) or len({tuple(m.shape) for m in maps}) == 1:
            return torch.stack(maps), scores
        return maps, scores

    def describe(self) -> dict:
        """Parameters of this inferer (for run records and cache keys)."""
        return {
            "axes": self.axes,
            "q": [self.q[a] for a in AXES],
            "rho": self.rho,
            "d": self.d,
            "delta": self.delta,
            "seed": self.seed,
            "token_dtype": str(self.token_dtype).replace("torch.", ""),
            "k_rule": "max(1, floor(rho * (B - 1)))",
            "variant": self.variant,
            "q_fine": [self.q_fine[a] for a in AXES] if self.q_fine is not None else None,
            "L": self.L,
            # only when not the paper's (depth_phases shapes tokens, the others scores only)
            **({"depth_phases": self.tokenizer.depth_phases} if self.tokenizer.depth_phases > 1 else {}),
            **({"references": str(self.references)} if self.references.mode != "all" else {}),
            **({"edge": self.edge} if self.edge != "zero" else {}),
            **({"smooth_mm": self.smooth_mm} if self.smooth_mm else {}),
            **({"subject_score": self.subject_statistic} if self.subject_statistic != "max" else {}),
            **({"score_precision": self.scorer.precision} if self.scorer.precision != "fp32" else {}),
        }
