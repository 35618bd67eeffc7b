"""``CS3FInferer``: volumes -> volumetric tokens -> cross-subject scores -> voxel anomaly maps.

The inferer wires the pieces and owns no maths of its own: slicing, pooling, projection and token
validity are :mod:`scripts.transforms`, the scorer is :mod:`scripts.scoring`, the encoder is any
:class:`scripts.encoders.SliceEncoder`-like module (``[N, 3, R, R]`` in, list of ``[N, C, P, P]``
out, with ``input_size``, ``mean`` and ``std`` attributes).

It is usable in three steps, so that a cohort can be streamed (what the bundle workflow does)::

    bank = [inferer.tokenize(volume, encoder, mask) for volume, mask in loader]   # one at a time
    token_scores = inferer.score(bank)                                           # batch step
    for i in range(len(bank)):
        amap = inferer.voxel_map(token_scores[i], bank[i].spatial_shape, mask_i) # one at a time

or in one call on an in-memory batch: ``maps, scores = inferer(batch, encoder, masks)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from monai.inferers import Inferer
from monai.utils import convert_to_tensor

from scripts.scoring import DEFAULT_BLOCK_ELEMENTS, DEFAULT_QUERY_TILE, mutual_similarity_scores
from scripts.transforms import (
    AXES,
    DepthPool,
    MultiAxisSlice,
    RandomProjection,
    TokenValidity,
    axis_index,
    check_divisible,
    restore_axis,
)

__all__ = ["TokenGrid", "VolumeTokens", "CS3FInferer"]


@dataclass
class TokenGrid:
    """Tokens of one volume for one (axis, layer).

    Attributes:
        tokens: ``[M, P, P, d]`` projected tokens (storage dtype of the inferer).
        valid: ``[M, P, P]`` bool token validity (Remark 1).
    """

    tokens: torch.Tensor
    valid: torch.Tensor

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.valid.shape)  # type: ignore[return-value]


@dataclass
class VolumeTokens:
    """All token grids of one volume, keyed ``"{axis}/{layer}"`` (e.g. ``"axial/1"``)."""

    spatial_shape: tuple[int, int, int]
    grids: dict[str, TokenGrid] = field(default_factory=dict)

    def num_tokens(self) -> int:
        return sum(g.valid.numel() for g in self.grids.values())

    def nbytes(self) -> int:
        return sum(g.tokens.numel() * g.tokens.element_size() for g in self.grids.values())


def _as_volume(volume: torch.Tensor) -> torch.Tensor:
    volume = convert_to_tensor(volume, track_meta=False)
    if volume.ndim == 3:
        volume = volume.unsqueeze(0)
    if volume.ndim != 4 or volume.shape[0] != 1:
        raise ValueError(f"expected a single-channel volume [1, H, W, D], got shape {tuple(volume.shape)}")
    return volume


class CS3FInferer(Inferer):
    """Batch mutual-similarity anomaly scoring of 3D volumes with a frozen 2D encoder (CS3F-C).

    Args:
        axes: axes to slice along, any subset of ``("sagittal", "coronal", "axial")`` (or S, C, A).
        q: depth-pooling size per axis, ``(q_sagittal, q_coronal, q_axial)``, or one int for all.
        rho: neighbour ratio of Eq. 2, ``K = max(1, floor(rho * (B - 1)))``.
        d: random-projection dimension.
        delta: token validity threshold on the foreground fraction (used when masks are given).
        seed: seed of the projection matrices (one per axis x layer, shared by all volumes).
        slab_size: slices per encoder forward; rounded to a multiple of ``q`` so that every slab pools
            into whole tokens and its raw features can be dropped at once.
        token_dtype: storage dtype of tokens (``torch.float16`` halves the bank; scoring accumulates
            in fp32).
        score_device: device of the scoring step (default: where the tokens are).
        query_tile: scorer query tile (see :func:`scripts.scoring.mutual_similarity_scores`).
        block_elements: scorer block budget.
        progress: show tqdm progress bars.
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
    ) -> None:
        super().__init__()
        self.axes = [AXES[axis_index(a)] for a in axes]
        if not self.axes or len(set(self.axes)) != len(self.axes):
            raise ValueError(f"axes must be a non-empty subset of {AXES} without repeats, got {list(axes)}")
        q_all = [int(q)] * 3 if isinstance(q, int) else [int(v) for v in q]
        if len(q_all) != 3 or min(q_all) < 1:
            raise ValueError(
                f"q must be one positive int or one per axis (sagittal, coronal, axial), got {q}"
            )
        self.q = dict(zip(AXES, q_all, strict=True))
        self.rho = float(rho)
        self.d = int(d)
        self.delta = float(delta)
        self.seed = int(seed)
        self.slab_size = int(slab_size)
        self.token_dtype = getattr(torch, token_dtype) if isinstance(token_dtype, str) else token_dtype
        self.score_device = torch.device(score_device) if score_device is not None else None
        self.query_tile = int(query_tile)
        self.block_elements = int(block_elements)
        self.progress = progress
        self._projections: dict[tuple[str, int, int], RandomProjection] = {}

    # ------------------------------------------------------------------ tokenization
    def _projection(self, axis: str, layer: int, channels: int) -> RandomProjection:
        key = (axis, layer, channels)
        if key not in self._projections:
            self._projections[key] = RandomProjection(channels, self.d, self.seed, f"{axis}/{layer}")
        return self._projections[key]

    @torch.inference_mode()
    def tokenize(
        self, volume: torch.Tensor, encoder: Callable, mask: torch.Tensor | None = None
    ) -> VolumeTokens:
        """Tokens of one volume, streamed slab by slab (raw slice features never outlive a slab).

        Args:
            volume: ``[1, H, W, D]`` (or ``[H, W, D]``) intensities in ``[0, 1]``.
            encoder: frozen 2D encoder, ``[N, 3, R, R]`` -> list of ``[N, C_l, P_l, P_l]``.
            mask: optional foreground ``[1, H, W, D]``; tokens with foreground fraction ``<= delta``
                are invalid.

        Returns:
            :class:`VolumeTokens` with one :class:`TokenGrid` per axis x encoder layer.
        """
        volume = _as_volume(volume)
        params = list(encoder.parameters()) if isinstance(encoder, torch.nn.Module) else []
        device = params[0].device if params else volume.device
        slicer = MultiAxisSlice(
            self.axes,
            size=encoder.input_size,
            mean=getattr(encoder, "mean", MultiAxisSlice().mean.flatten().tolist()),
            std=getattr(encoder, "std", MultiAxisSlice().std.flatten().tolist()),
        )
        volume_dev = volume.to(device)
        out = VolumeTokens(spatial_shape=tuple(volume.shape[1:]))
        for axis in self.axes:
            q = self.q[axis]
            count = volume.shape[1 + axis_index(axis)]
            blocks = check_divisible(count, q, axis)
            pool = DepthPool(q, axis=axis)
            step = q * max(1, self.slab_size // q)
            grids: list[torch.Tensor] = []
            for start in range(0, count, step):
                features = encoder(slicer.slab(volume_dev, axis, start, min(start + step, count)))
                for layer, feat in enumerate(features):
                    tokens = self._projection(axis, layer, feat.shape[1])(pool(feat))  # [m, d, P, P]
                    tokens = tokens.permute(0, 2, 3, 1).to(self.token_dtype)
                    if start == 0:
                        grids.append(
                            torch.empty((blocks, *tokens.shape[1:]), dtype=self.token_dtype, device=device)
                        )
                    grids[layer][start // q : start // q + tokens.shape[0]] = tokens
                del features  # the raw features of this slab are gone before the next forward
            for layer, grid in enumerate(grids):
                if mask is not None:
                    valid = TokenValidity(axis, q, tuple(grid.shape[1:3]), self.delta)(_as_volume(mask))
                else:
                    valid = torch.ones(grid.shape[:3], dtype=torch.bool)
                out.grids[f"{axis}/{layer}"] = TokenGrid(grid, valid.to(device))
        return out

    # ------------------------------------------------------------------ scoring
    def score(self, bank: Sequence[VolumeTokens]) -> list[dict[str, torch.Tensor]]:
        """Cross-subject token scores for every volume, per axis x layer (Eq. 1-2).

        Args:
            bank: tokens of the ``B >= 2`` volumes of the batch.

        Returns:
            per volume, ``{key: [M, P, P]}`` fp32 token scores (0 for invalid tokens).
        """
        if len(bank) < 2:
            raise ValueError(
                f"CS3F scores volumes against each other: need at least 2 volumes, got {len(bank)}"
            )
        keys = list(bank[0].grids)
        for i, vt in enumerate(bank):
            if list(vt.grids) != keys:
                raise ValueError(f"volume {i} has token grids {list(vt.grids)}, volume 0 has {keys}")
            for key in keys:
                if vt.grids[key].shape != bank[0].grids[key].shape:
                    raise ValueError(
                        f"token grids do not agree for {key}: volume {i} has {vt.grids[key].shape}, "
                        f"volume 0 has {bank[0].grids[key].shape}; volumes must share the grid along each "
                        f"slicing axis (resample or pad them to one shape, e.g. MONAI ResizeWithPadOrCropd)"
                    )
        results: list[dict[str, torch.Tensor]] = [{} for _ in bank]
        iterator = keys
        if self.progress:
            from tqdm.auto import tqdm

            iterator = tqdm(keys, desc="scoring (axis/layer)", unit="grid")
        for key in iterator:
            shape = bank[0].grids[key].shape
            device = self.score_device or bank[0].grids[key].tokens.device
            tokens = torch.stack([vt.grids[key].tokens.reshape(-1, self.d) for vt in bank]).to(device)
            valid = torch.stack([vt.grids[key].valid.reshape(-1) for vt in bank]).to(device)
            try:
                scores = mutual_similarity_scores(
                    tokens, valid, self.rho, self.query_tile, self.block_elements
                )
            except ValueError as err:
                raise ValueError(f"{key}: {err}") from None
            for i, row in enumerate(scores.cpu()):
                results[i][key] = row.reshape(shape)
            del tokens, valid
        return results

    # ------------------------------------------------------------------ voxel maps
    def voxel_map(
        self,
        token_scores: dict[str, torch.Tensor],
        spatial_shape: Sequence[int],
        mask: torch.Tensor | None = None,
        axis_max: dict[str, float] | None = None,
    ) -> torch.Tensor:
        """Fuse token scores into a voxel anomaly map ``[1, H, W, D]`` (Sec. 3.3.4, Eq. 5).

        Each axis x layer grid is interpolated trilinearly to the volume grid; layers are averaged
        per axis, axes are averaged, and voxels outside ``mask`` are set to 0.

        Args:
            token_scores: ``{"{axis}/{layer}": [M, P, P]}`` of one volume.
            spatial_shape: ``(H, W, D)`` of the volume.
            mask: optional foreground ``[1, H, W, D]``.
            axis_max: if given, filled with the (masked) maximum of each axis map (a cheap breakdown
                of the subject score).
        """
        shape = tuple(int(s) for s in spatial_shape)
        per_axis: dict[str, list[torch.Tensor]] = {}
        for key, grid in token_scores.items():
            axis = key.split("/")[0]
            dim = axis_index(axis)
            target = (shape[dim], *[shape[k] for k in range(3) if k != dim])
            up = F.interpolate(grid[None, None].float(), size=target, mode="trilinear", align_corners=False)
            per_axis.setdefault(axis, []).append(restore_axis(up[0, 0], axis))
        if not per_axis:
            raise ValueError("no token scores to fuse")
        inside = (_as_volume(mask)[0] > 0) if mask is not None else None
        fused = torch.zeros(shape)
        for axis, maps in per_axis.items():
            axis_map = torch.stack(maps).mean(dim=0)
            if axis_max is not None:
                axis_max[axis] = float(
                    (axis_map * inside.to(axis_map.device) if inside is not None else axis_map).max()
                )
            fused += axis_map.cpu() / len(per_axis)
        if inside is not None:
            fused = fused * inside.cpu()
        return fused.unsqueeze(0)

    @staticmethod
    def subject_score(anomaly_map: torch.Tensor) -> float:
        """Subject-level anomaly score: the maximum voxel score (Sec. 3.3.4)."""
        return float(anomaly_map.max())

    # ------------------------------------------------------------------ one call
    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor | Sequence[torch.Tensor],
        network: Callable,
        masks: torch.Tensor | Sequence[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor | list[torch.Tensor], torch.Tensor]:
        """Score a batch in memory.

        Args:
            inputs: ``[B, 1, H, W, D]``, or a list of ``[1, H, W, D]`` volumes whose token grids agree.
            network: the frozen 2D slice encoder.
            masks: optional foreground masks, same layout as ``inputs``.

        Returns:
            ``(maps, scores)``: voxel maps ``[B, 1, H, W, D]`` (a list when the inputs were a list of
            different shapes) and subject scores ``[B]``.
        """
        volumes = list(inputs)
        mask_list = list(masks) if masks is not None else [None] * len(volumes)
        if len(mask_list) != len(volumes):
            raise ValueError(f"got {len(volumes)} volumes but {len(mask_list)} masks")
        iterator = zip(volumes, mask_list, strict=True)
        if self.progress:
            from tqdm.auto import tqdm

            iterator = tqdm(iterator, total=len(volumes), desc="tokenizing", unit="vol")
        bank = [self.tokenize(v, network, m) for v, m in iterator]
        token_scores = self.score(bank)
        maps = [
            self.voxel_map(ts, vt.spatial_shape, m)
            for ts, vt, m in zip(token_scores, bank, mask_list, strict=True)
        ]
        scores = torch.tensor([self.subject_score(m) for m in maps])
        if isinstance(inputs, torch.Tensor) or len({tuple(m.shape) for m in maps}) == 1:
            return torch.stack(maps), scores
        return maps, scores

    def describe(self) -> dict:
        """Parameters of this inferer (for run summaries and cache keys)."""
        return {
            "axes": self.axes,
            "q": [self.q[a] for a in AXES],
            "rho": self.rho,
            "d": self.d,
            "delta": self.delta,
            "seed": self.seed,
            "token_dtype": str(self.token_dtype).replace("torch.", ""),
            "k_rule": "max(1, floor(rho * (B - 1)))",
        }
