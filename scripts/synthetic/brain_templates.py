"""Base anatomies of the synthetic brain cohorts and their output grid: the MNI152 tissue maps shipped in
the ``nilearn`` wheel, Colin27 from Debian's ``mricron-data`` (tissue fractions from its intensities), and
trilinear sampling of a template at world points (see :mod:`scripts.synthetic.brain`).

``nilearn`` is imported here only (lazily), never by the engine.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from scripts.synthetic.cohort_files import largest_component

__all__ = [
    "BASES",
    "BaseAnatomy",
    "COLIN27_PATH",
    "FOV_CENTER_MM",
    "NILEARN_HINT",
    "base_anatomy",
    "output_geometry",
    "raw_base",
    "sample_at",
    "world_grid",
]

COLIN27_PATH = Path("/usr/share/mricron/templates/ch2bet.nii.gz")
NILEARN_HINT = "pip install 'nilearn>=0.10'"
BASES = ("mni152", "colin27")
#: cube centre (MNI mm): the centre of the brain bounding box of both templates
FOV_CENTER_MM = (0.0, -17.0, 6.0)


# ----------------------------------------------------------------------------------------------
# geometry
# ----------------------------------------------------------------------------------------------


def _as_shape(shape) -> tuple[int, int, int]:
    if isinstance(shape, int | np.integer):
        return (int(shape),) * 3
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape must be an int or 3 ints >= 8, got {shape}")
    return shape


def output_geometry(shape=96, fov_mm: float = 192.0):
    """``(shape, spacing_mm, affine)`` of the shared output grid: a cube of ``fov_mm`` in MNI space."""
    shape = _as_shape(shape)
    spacing = np.array([fov_mm / n for n in shape], dtype=np.float64)
    lo = np.asarray(FOV_CENTER_MM, dtype=np.float64) - fov_mm / 2.0
    affine = np.eye(4)
    affine[:3, :3] = np.diag(spacing)
    affine[:3, 3] = lo + spacing / 2.0
    return shape, spacing, affine


def world_grid(shape, affine) -> torch.Tensor:
    """World coordinates (mm) of the voxel centres, ``[X, Y, Z, 3]`` float32."""
    axes = [
        torch.arange(n, dtype=torch.float32) * float(affine[i, i]) + float(affine[i, 3]) for i, n in enumerate(shape)
    ]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)


def sample_at(volume: torch.Tensor, points: torch.Tensor, inv_affine: np.ndarray) -> torch.Tensor:
    """Trilinear samples of ``volume [1, C, X, Y, Z]`` (voxel->world ``inv(inv_affine)``) at world
    ``points [..., 3]``; zero outside. Returns ``[C, ...]``."""
    size = volume.shape[2:]
    m = torch.as_tensor(inv_affine[:3, :3], dtype=torch.float32)
    b = torch.as_tensor(inv_affine[:3, 3], dtype=torch.float32)
    idx = points @ m.T + b
    scale = torch.tensor([2.0 / (s - 1) for s in size], dtype=torch.float32)
    grid = (idx * scale - 1.0).flip(-1)  # grid_sample wants (W, H, D) = (z, y, x) order
    out_shape = points.shape[:-1]
    grid = grid.reshape(1, 1, 1, -1, 3)
    out = F.grid_sample(volume, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out.reshape(volume.shape[1], *out_shape)


# ----------------------------------------------------------------------------------------------
# base anatomies
# ----------------------------------------------------------------------------------------------


@dataclass
class BaseAnatomy:
    name: str
    maps: torch.Tensor  # [1, 4, X, Y, Z]: gm, wm, csf, mask (fractions), anti-aliased
    inv_affine: np.ndarray  # world -> voxel of ``maps``
    vent_center: np.ndarray  # world mm
    vent_prec: np.ndarray  # precision matrix (mm^-2) of the ventricle-scaling envelope


def _require_nilearn():
    try:
        from nilearn import datasets  # lazily: only the generator needs nilearn
    except ImportError as err:  # pragma: no cover - exercised by monkeypatching in the tests
        raise ImportError(
            "The synthetic cohort generator needs the MNI152 templates shipped in the nilearn wheel, "
            f"but nilearn cannot be imported ({err}). Install it with: {NILEARN_HINT}"
        ) from err
    return datasets


def _load_mni152():
    datasets = _require_nilearn()
    mask_img = datasets.load_mni152_brain_mask(resolution=1)
    mask = (np.asarray(mask_img.dataobj) > 0.5).astype(np.float32)
    gm = np.asarray(datasets.load_mni152_gm_template(resolution=1).dataobj, dtype=np.float32) * mask
    wm = np.asarray(datasets.load_mni152_wm_template(resolution=1).dataobj, dtype=np.float32) * mask
    gm, wm = np.clip(gm, 0, 1), np.clip(wm, 0, 1)
    s = gm + wm
    over = s > 1
    gm[over] /= s[over]
    wm[over] /= s[over]
    csf = np.clip(mask - gm - wm, 0, 1)
    return np.stack([gm, wm, csf, mask]), np.asarray(mask_img.affine, dtype=np.float64)


def _kmeans_1d(values: np.ndarray, k: int = 3, iters: int = 50) -> np.ndarray:
    centers = np.percentile(values, np.linspace(15, 85, k))
    for _ in range(iters):
        lab = np.argmin(np.abs(values[:, None] - centers[None]), axis=1)
        new = np.array([values[lab == j].mean() if np.any(lab == j) else centers[j] for j in range(k)])
        if np.allclose(new, centers):
            break
        centers = new
    return np.sort(centers)


def _load_colin27():
    import nibabel as nib

    if not COLIN27_PATH.is_file():
        raise FileNotFoundError(
            f"base='colin27' needs the Colin27 template {COLIN27_PATH}, which is missing; install "
            "Debian's mricron-data package (`apt-get install mricron-data`) or use base='mni152'."
        )
    img = nib.load(str(COLIN27_PATH))
    t1 = np.asarray(img.dataobj, dtype=np.float32)
    mask = ndimage.binary_fill_holes(ndimage.binary_closing(t1 > 0, iterations=2)).astype(np.float32)
    vals = t1[mask > 0]
    rng = np.random.default_rng(0)
    c_csf, c_gm, c_wm = _kmeans_1d(rng.choice(vals, size=min(vals.size, 200_000), replace=False))
    # linear partial-volume model between neighbouring classes
    gm = np.where(t1 <= c_gm, (t1 - c_csf) / (c_gm - c_csf), (c_wm - t1) / (c_wm - c_gm))
    gm = np.clip(gm, 0, 1) * mask
    wm = np.clip((t1 - c_gm) / (c_wm - c_gm), 0, 1) * mask
    csf = np.clip(mask - gm - wm, 0, 1)
    return np.stack([gm, wm, csf, mask]).astype(np.float32), np.asarray(img.affine, dtype=np.float64)


def _ventricles(csf: np.ndarray, affine: np.ndarray):
    """Centre and envelope of the lateral ventricles: the largest CSF components near the centre."""
    centre_vox = np.linalg.solve(affine[:3, :3], np.asarray(FOV_CENTER_MM) + [0, 0, 10] - affine[:3, 3])
    grid = np.indices(csf.shape, dtype=np.float32)
    dist = np.sqrt(sum((grid[i] - centre_vox[i]) ** 2 * affine[i, i] ** 2 for i in range(3)))
    cand = (csf > 0.6) & (dist < 35)
    lab, n = ndimage.label(cand)
    if n == 0:
        return affine[:3, 3] + affine[:3, :3] @ centre_vox, np.eye(3) / 15.0**2
    sizes = ndimage.sum(cand, lab, index=np.arange(1, n + 1))
    keep = np.isin(lab, 1 + np.argsort(sizes)[::-1][:2])
    pts = np.argwhere(keep) @ affine[:3, :3].T + affine[:3, 3]
    cov = np.cov(pts.T) * 1.5 + np.eye(3) * 25.0
    return pts.mean(0), np.linalg.inv(cov)


@functools.lru_cache(maxsize=2)
def raw_base(name: str):
    """Tissue maps ``[4, X, Y, Z]`` (gm, wm, csf, mask) of a template cropped to the brain + 12 mm,
    their voxel->world affine and the ventricle envelope (centre, precision)."""
    if name == "mni152":
        maps, affine = _load_mni152()
    elif name == "colin27":
        maps, affine = _load_colin27()
    else:
        raise ValueError(f"unknown base {name!r}; choose one of {BASES + ('both',)}")
    # one brain: drop detached specks of the template's mask
    maps = maps * largest_component(maps[3] > 0.5)
    vent_center, vent_prec = _ventricles(maps[2], affine)
    idx = np.argwhere(maps[3] > 0)
    lo, hi = np.maximum(idx.min(0) - 12, 0), np.minimum(idx.max(0) + 13, maps.shape[1:])
    maps = np.ascontiguousarray(maps[:, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]])
    affine = affine.copy()
    affine[:3, 3] += affine[:3, :3] @ lo
    maps.setflags(write=False)
    return maps, affine, vent_center, vent_prec


@functools.lru_cache(maxsize=4)
def base_anatomy(name: str, spacing: tuple[float, float, float]) -> BaseAnatomy:
    """A template anti-aliased for sampling at the output ``spacing`` (mm)."""
    maps, affine, vent_center, vent_prec = raw_base(name)
    vox = np.abs(np.diag(affine)[:3])
    sigma = 0.42 * np.sqrt(np.maximum(np.asarray(spacing) ** 2 - vox**2, 0.0)) / vox
    if np.any(sigma > 0.05):
        maps = np.stack([ndimage.gaussian_filter(m, sigma) for m in maps])
    tensor = torch.from_numpy(np.array(maps, dtype=np.float32))[None]
    return BaseAnatomy(name, tensor, np.linalg.inv(affine), vent_center, vent_prec)
