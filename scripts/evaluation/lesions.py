"""Lesions as the paper counts them (Sec. 4.5): 18-connected components, size classes by volume, and the
per-component statistics the lesion-level metrics need (voxels, centroid, peak and mean score)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = [
    "LARGE_MIN_MM3",
    "MIN_DIAMETER_MM",
    "SIZE_CLASSES",
    "SMALL_MAX_MM3",
    "STRUCTURE_18",
    "affine_of",
    "as_volume_array",
    "components",
    "equivalent_diameter",
    "size_class",
    "to_world",
]

STRUCTURE_18 = ndimage.generate_binary_structure(3, 2)  # faces + edges: 18-connectivity
MIN_DIAMETER_MM = 3.0
SMALL_MAX_MM3 = 100.0
LARGE_MIN_MM3 = 1000.0
#: lesion size classes (Sec. 4.5), in increasing size; :func:`size_class` gives a lesion's
SIZE_CLASSES: tuple[str, str, str] = ("small", "medium", "large")


def size_class(volume_mm3: float) -> str:
    """Size class of a lesion: small < 100 <= medium <= 1000 < large (mm^3)."""
    if volume_mm3 < SMALL_MAX_MM3:
        return "small"
    return "large" if volume_mm3 > LARGE_MIN_MM3 else "medium"


def equivalent_diameter(volume_mm3):
    """Diameter (mm) of the sphere with the given volume (mm^3): (6 V / pi)^(1/3)."""
    return np.cbrt(6.0 * np.asarray(volume_mm3, dtype=np.float64) / np.pi)


def as_volume_array(x, dtype=None) -> np.ndarray | None:
    if x is None:
        return None
    if hasattr(x, "detach"):  # torch.Tensor / MetaTensor
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim == 4 and x.shape[0] == 1:  # [1, H, W, D] channel-first
        x = x[0]
    if x.ndim != 3:
        raise ValueError(f"expected a [H, W, D] (or [1, H, W, D]) array, got shape {x.shape}")
    return x.astype(dtype, copy=False) if dtype is not None else x


def affine_of(x):
    aff = getattr(x, "affine", None)
    if aff is None:
        return None
    if hasattr(aff, "detach"):
        aff = aff.detach().cpu().numpy()
    aff = np.asarray(aff, dtype=np.float64)
    return aff[0] if aff.ndim == 3 else aff


def to_world(affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    ijk = np.atleast_2d(np.asarray(ijk, dtype=np.float64))
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def components(binary: np.ndarray, score: np.ndarray, valid: np.ndarray | None = None) -> dict:
    """18-connected components of ``binary`` and per-component statistics, vectorised over the labelled
    voxels only (scipy's labelled max/argmax sort the whole volume). ``valid``: voxels whose score counts
    for the peak/mean (others are ignored; a component with no valid voxel has peak -inf)."""
    cc, n = ndimage.label(binary, structure=STRUCTURE_18)
    idx = np.flatnonzero(cc)  # labelled voxels, raster order
    lab = cc.ravel()[idx]
    n_vox = np.bincount(lab, minlength=n + 1)[1:]
    ijk = np.unravel_index(idx, cc.shape)
    centroid = (
        np.stack([np.bincount(lab, weights=c, minlength=n + 1)[1:] for c in ijk], 1) / np.maximum(n_vox, 1)[:, None]
    )
    vals = score.ravel()[idx].astype(np.float64)
    ok = np.ones(idx.shape, bool) if valid is None else valid.ravel()[idx]
    vals_ok = np.where(ok, vals, -np.inf)
    order = np.lexsort((vals_ok, lab))  # by label, then score: the last of each label is its peak
    last = order[np.cumsum(n_vox) - 1] if n else np.zeros(0, np.intp)
    n_ok = np.bincount(lab, weights=ok, minlength=n + 1)[1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.bincount(lab, weights=np.where(ok, vals, 0.0), minlength=n + 1)[1:] / n_ok
    return {
        "cc": cc,
        "n": n,
        "n_voxels": n_vox,
        "centroid": centroid,
        "peak": vals_ok[last],
        "peak_voxel": np.stack(np.unravel_index(idx[last], cc.shape), 1),
        "mean": mean,
        "flat": idx,
        "labels": lab,
    }
