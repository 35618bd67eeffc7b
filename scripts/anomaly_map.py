"""Token scores -> voxel anomaly map and subject score (paper Sec. 3.3.4, Eq. 5 and 7): each (axis, layer)
grid interpolated trilinearly to the volume, layers then axes averaged per scale; C takes the coarse map,
F the fine one, MS their mean (Eq. 7); 0 outside the mask. Options beyond the paper: docs/design.md."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers.convutils import gaussian_1d
from scripts.tokens import FINE_SUFFIX, as_volume, phase_shifts
from scripts.transforms.tokenization import axis_index, restore_axis

__all__ = [
    "EDGES",
    "SCALES",
    "SUBJECT_SCORES",
    "VARIANTS",
    "fuse_token_scores",
    "gaussian_filter",
    "smooth_map",
    "subject_score",
]

EDGES = ("zero", "normalized")  # invalid tokens enter the interpolation as zeros (the paper) or not at all
SCALES = {"C": ("coarse",), "F": ("fine",), "MS": ("coarse", "fine")}
VARIANTS = tuple(SCALES)
SUBJECT_SCORES = ("max", "robust_z")
MAD_TO_SD = 1.4826  # 1.4826 x MAD estimates the standard deviation of normal values


def _upsample(grid: torch.Tensor, target: tuple[int, ...], valid: torch.Tensor | None) -> torch.Tensor:
    """Trilinear upsampling of one score grid; with ``valid``, normalised by the upsampled validity."""
    up = F.interpolate(grid[None, None].float(), size=target, mode="trilinear", align_corners=False)
    if valid is None:
        return up
    weight = F.interpolate(valid[None, None].float(), size=target, mode="trilinear", align_corners=False)
    # Invalid tokens score 0, so the upsampled scores already are the upsampled score x validity.
    return torch.where(weight > 1e-6, up / weight.clamp_min(1e-6), torch.zeros_like(up))


def _grid_map(grid: torch.Tensor, target: tuple[int, ...], valid: torch.Tensor | None, phases: int) -> torch.Tensor:
    """``[T, h, w]`` mean of the maps of a grid's ``phases`` blocks, each moved back to the slices it pooled."""
    rows = grid.shape[0] // phases
    maps = []
    for j, shift in enumerate(phase_shifts(target[0] // rows, phases)):
        block = slice(j * rows, (j + 1) * rows)
        up = _upsample(grid[block], target, None if valid is None else valid[block])[0, 0]
        maps.append(torch.roll(up, shift, dims=0) if shift else up)
    return torch.stack(maps).mean(dim=0) if phases > 1 else maps[0]


def _axis_maps(
    token_scores: dict[str, torch.Tensor],
    shape: tuple[int, ...],
    scales: Sequence[str],
    validity: dict[str, torch.Tensor] | None = None,
    phases: int = 1,
) -> dict[str, dict[str, list[torch.Tensor]]]:
    """``{axis: {scale: [voxel map [H, W, D] per layer]}}`` of the grids of the wanted scales."""
    per_axis: dict[str, dict[str, list[torch.Tensor]]] = {}
    for key, grid in token_scores.items():
        scale = "fine" if key.endswith(FINE_SUFFIX) else "coarse"
        if scale not in scales:
            continue
        axis = key.split("/")[0]
        dim = axis_index(axis)
        target = (shape[dim], *[shape[k] for k in range(3) if k != dim])
        valid = None if validity is None else validity[key]
        up = _grid_map(grid, target, valid, phases if scale == "coarse" else 1)
        per_axis.setdefault(axis, {}).setdefault(scale, []).append(restore_axis(up, axis))
    return per_axis


def fuse_token_scores(
    token_scores: dict[str, torch.Tensor],
    spatial_shape: Sequence[int],
    variant: str = "C",
    mask: torch.Tensor | None = None,
    axis_max: dict[str, float] | None = None,
    validity: dict[str, torch.Tensor] | None = None,
    phases: int = 1,
) -> torch.Tensor:
    """The voxel anomaly map ``[1, H, W, D]`` of one volume.

    Args:
        token_scores: ``{"{axis}/{layer}": [M, P, P]}`` (and ``"{axis}/{layer}/fine"`` grids for F/MS).
        mask: optional foreground ``[1, H, W, D]``; the map is 0 outside it.
        axis_max: if given, filled with the (masked) maximum of each axis map.
        validity: the validity grids of the same keys for ``edge="normalized"``; ``None``: the paper's zeros.
        phases: pooling phases of the coarse grids (``Tokenizer(depth_phases=...)``).
    """
    variant = str(variant).upper()
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    scales = SCALES[variant]
    shape = tuple(int(s) for s in spatial_shape)
    per_axis = _axis_maps(token_scores, shape, scales, validity, phases)
    if not per_axis:
        hint = " (it needs '{axis}/{layer}/fine' scores: score with q_fine set)" if variant != "C" else ""
        raise ValueError(f"no token scores to fuse for variant {variant!r}{hint}")
    for axis, by_scale in per_axis.items():
        if len(by_scale) != len(scales):
            raise ValueError(f"variant {variant!r} fuses {scales} scores but the {axis} axis has only {list(by_scale)}")
    inside = (as_volume(mask)[0] > 0) if mask is not None else None
    fused = torch.zeros(shape)
    for axis, by_scale in per_axis.items():
        axis_map = torch.stack([torch.stack(maps).mean(dim=0) for maps in by_scale.values()]).mean(dim=0)
        if axis_max is not None:
            masked = axis_map * inside.to(axis_map.device) if inside is not None else axis_map
            axis_max[axis] = float(masked.max())
        fused += axis_map.cpu() / len(per_axis)
    if inside is not None:
        fused = fused * inside.cpu()
    return fused.unsqueeze(0)


def smooth_map(
    anomaly_map: torch.Tensor, sigma_mm: float, mask: torch.Tensor | None = None, spacing: Sequence[float] | None = None
) -> torch.Tensor:
    """Gaussian smoothing (``sigma_mm``; 0: off) of a voxel map ``[1, H, W, D]`` inside ``mask`` (normalised
    convolution, 0 outside); ``spacing`` (mm) defaults to a MetaTensor's ``pixdim``, else 1 mm."""
    if not float(sigma_mm) >= 0.0:
        raise ValueError(f"smooth_mm must be a number >= 0, got {sigma_mm!r}")
    if float(sigma_mm) == 0.0:
        return anomaly_map
    if spacing is None:
        spacing = [float(s) for s in getattr(anomaly_map, "pixdim", (1.0, 1.0, 1.0))]
    sigmas = [float(sigma_mm) / float(s) for s in spacing]
    amap = as_volume(anomaly_map).float()
    if mask is None:
        return gaussian_filter(amap, sigmas)
    inside = (as_volume(mask) > 0).to(amap.device, torch.float32)
    # one pass over the masked map and the mask, whose ratio is the normalised smoothing
    numerator, weight = gaussian_filter(torch.cat([amap * inside, inside]), sigmas)
    smoothed = numerator / weight.clamp_min(1e-6)
    return torch.where(inside[0] > 0, smoothed, torch.zeros_like(smoothed)).unsqueeze(0)


def gaussian_filter(volume: torch.Tensor, sigmas: Sequence[float]) -> torch.Tensor:
    """MONAI's ``GaussianSmooth`` (zero padding) of ``volume [C, H, W, D]`` with ``sigmas`` (voxels) per axis,
    by banded matrices (equal up to float32 rounding)."""
    out = volume.float()
    for axis, sigma in enumerate(sigmas, start=1):
        matrix = _gaussian_matrix(out.shape[axis], float(sigma), out.device)
        out = torch.movedim(torch.movedim(out, axis, -1) @ matrix.T, -1, axis)
    return out.contiguous()


def _gaussian_matrix(n: int, sigma: float, device: torch.device) -> torch.Tensor:
    """``[n, n]`` matrix ``M`` with ``M[i, j] = kernel[j - i + r]`` for ``|j - i| <= r`` (the kernel's radius)."""
    kernel = gaussian_1d(torch.tensor(sigma), truncated=4.0, approx="erf").to(device, torch.float32)
    radius = (kernel.numel() - 1) // 2
    index = torch.arange(n, device=device)
    offset = index[None, :] - index[:, None]
    band = offset.abs() <= radius
    matrix = torch.zeros(n, n, device=device)
    matrix[band] = kernel[(offset + radius)[band]]
    return matrix


def subject_score(anomaly_map: torch.Tensor, mask: torch.Tensor | None = None, statistic: str = "max") -> float:
    """Subject-level score of ``anomaly_map [1, H, W, D]``: ``"max"`` (the paper, Sec. 3.3.4) or ``"robust_z"``,
    ``(max - median) / (1.4826 MAD)`` over the ``mask``'s voxels (``max - median`` where the MAD is 0)."""
    if statistic not in SUBJECT_SCORES:
        raise ValueError(f"subject_score must be one of {SUBJECT_SCORES}, got {statistic!r}")
    amap = as_volume(anomaly_map).float()
    values = amap.reshape(-1) if mask is None else amap[as_volume(mask).to(amap.device) > 0]
    if statistic == "max" or values.numel() == 0:
        return float(amap.max())
    median = values.median()  # the lower median for an even count: a value of the map, no averaging
    spread = MAD_TO_SD * float((values - median).abs().median())
    return float(values.max() - median) / (spread if spread > 0 else 1.0)
