"""Synthetic, registered brain-MRI cohorts with exact lesion masks (demo, test and benchmark data).

CS3F scores each volume against the other volumes of a batch, so it needs a *cohort*: many
registered subjects of the same anatomy, some with lesions. No multi-subject brain MRI set can be
downloaded here, so this module turns real templates into such cohorts:

* ``mni152``: the MNI152 2009 T1 template's grey/white-matter probability maps and brain mask,
  shipped inside the ``nilearn`` wheel (1 mm). CSF = mask - GM - WM.
* ``colin27``: the skull-stripped Colin27 T1 (``ch2bet.nii.gz`` from Debian's ``mricron-data``).
  No tissue segmentation ships with it, so GM/WM/CSF fractions are derived from its intensities:
  the three class means come from a 1-D k-means on the brain voxels and every voxel is given the
  linear partial-volume mixture of the two neighbouring classes that reproduces its intensity.
* ``both``: alternate the two anatomies (within the normal and within the abnormal group).

Per subject (``np.random.default_rng([seed, index])``, spawned into an anatomy, a lesion and an
intensity stream):

1. anatomy: a small affine residual (a few % scale, a few degrees, a couple of mm) and a smooth
   random displacement field (a few mm, Gaussian-smoothed over ~16 mm, Jacobian checked > 0),
   plus ventricle enlargement/shrinkage (a local radial scaling about the ventricles) and cortical
   atrophy (GM turned into CSF next to CSF); everything is one pull-back map from the output grid
   to the template, applied by trilinear sampling (``torch.nn.functional.grid_sample``) of
   anti-aliased tissue maps, directly on the output grid;
2. lesions (abnormal subjects): 1-3 per subject with log-uniform volumes (mm^3, so that the
   small < 100, medium 100-1000 and large > 1000 mm^3 classes of Sec. 4.5 all occur), grown from
   a centre inside the brain by a priority flood of an ellipsoidal envelope plus smooth noise
   (irregular, 6-connected, exactly ``round(volume / voxel volume)`` voxels, one voxel apart from
   the other lesions so that connected components are lesions); optional mass effect (a radial
   push of the surrounding tissue), edema rim and necrotic core (all inside the label, which is
   the binary union, as BraTS labels > 0);
3. intensities: tissue means per subject (T1w: WM > GM > CSF; T2w: CSF > GM > WM), within-tissue
   texture, lesions (the core replaces 60-100 % of the underlying tissue by lesion tissue whose
   mean is hyper- or hypo-intense by a contrast drawn from ``lesion_contrast`` relative to the
   tissue it replaces, with some heterogeneity; edema modulates the tissue; necrosis is fluid), a smooth
   multiplicative bias field, Rician noise and a little blur; skull-stripped (background exactly
   0) and normalised to [0, 1] by a robust min-max (minimum = the background, maximum = the 99.5th
   percentile of the normal brain voxels, clipped above; a stand-in for the fixed-reference
   histogram standardisation + min-max of Sec. 4.1 that a bright lesion cannot rescale).

The output grid is a cube of ``fov_mm`` (default 192 mm) around the brain in MNI space, resampled
to ``shape`` (96^3 -> 2 mm voxels; 224^3 -> the paper's grid): all subjects share one NIfTI
affine with the true voxel spacing, so lesion volumes in mm^3 are right.

``nilearn`` is imported here only (lazily), never by the engine.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from scripts.synthetic import common
from scripts.synthetic.common import (
    check_counts,
    cohort_counts,
    grow_region,
    largest_component,
    largest_lesion_centre,
    preview_rows,
    read_cohort,
    save_figure,
    shuffled_abnormal,
    single_thread,
    smooth_field,
    smooth_noise,
    subject_row,
    write_cohort,
    write_subject_files,
)

__all__ = [
    "BASES",
    "COLIN27_PATH",
    "TISSUE_MEANS",
    "LesionSpec",
    "Subject",
    "cohort_layout",
    "ensure_cohort",
    "generate_cohort",
    "generate_subject",
    "lesion_plan",
    "mean_pairwise_dice",
    "output_geometry",
    "save_preview",
    "summarize_cohort",
]

COLIN27_PATH = Path("/usr/share/mricron/templates/ch2bet.nii.gz")
NILEARN_HINT = "pip install 'nilearn>=0.10'"
BASES = ("mni152", "colin27")
#: cube centre (MNI mm): the centre of the brain bounding box of both templates
FOV_CENTER_MM = (0.0, -17.0, 6.0)
#: NIfTI qform/sform code of the written cohort: 4 = MNI152 (the subjects are registered)
MNI_XFORM = 4
#: ``np.random.default_rng([seed, COHORT_STREAM])`` shuffles which subjects are abnormal
COHORT_STREAM = 2**31 - 1


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


def _world_grid(shape, affine) -> torch.Tensor:
    """World coordinates (mm) of the voxel centres, ``[X, Y, Z, 3]`` float32."""
    axes = [
        torch.arange(n, dtype=torch.float32) * float(affine[i, i]) + float(affine[i, 3]) for i, n in enumerate(shape)
    ]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)


def _sample(volume: torch.Tensor, points: torch.Tensor, inv_affine: np.ndarray) -> torch.Tensor:
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
class _Base:
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
def _raw_base(name: str):
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
def _base(name: str, spacing: tuple[float, float, float]) -> _Base:
    """A template anti-aliased for sampling at the output ``spacing`` (mm)."""
    maps, affine, vent_center, vent_prec = _raw_base(name)
    vox = np.abs(np.diag(affine)[:3])
    sigma = 0.42 * np.sqrt(np.maximum(np.asarray(spacing) ** 2 - vox**2, 0.0)) / vox
    if np.any(sigma > 0.05):
        maps = np.stack([ndimage.gaussian_filter(m, sigma) for m in maps])
    tensor = torch.from_numpy(np.array(maps, dtype=np.float32))[None]
    return _Base(name, tensor, np.linalg.inv(affine), vent_center, vent_prec)


# ----------------------------------------------------------------------------------------------
# per-subject random draws
# ----------------------------------------------------------------------------------------------


@dataclass
class LesionSpec:
    volume_mm3: float  # target volume
    contrast: float  # signed relative contrast of the core (+ hyper, - hypo)
    axes: tuple[float, float, float]  # relative semi-axes of the envelope (product 1)
    rotation: np.ndarray  # 3x3
    irregularity: float  # weight of the smooth noise in the growth field
    core_fraction: float  # 1.0 = no edema rim; otherwise edema = the outer part of the label
    edema_contrast: float
    necrosis_fraction: float  # fraction of the core that is necrotic (0 = none)
    mass_effect: float  # radial push strength (0..~0.4)
    replacement: float  # how much of the underlying tissue the core replaces (0..1)
    voxels: int = 0  # planned voxel count at the output spacing
    center: np.ndarray | None = field(default=None, repr=False)


def _rotation(rng, max_deg: float) -> np.ndarray:
    a, b, c = np.deg2rad(rng.uniform(-max_deg, max_deg, size=3))
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _subject_rngs(seed: int, index: int):
    """Independent anatomy, lesion and intensity streams of one subject."""
    return np.random.default_rng([seed, index]).spawn(3)


def _draw_lesions(
    rng,
    *,
    contrast: str,
    spacing,
    lesion_volume,
    lesion_contrast,
    lesions_per_subject,
    p_hyper,
    edema,
    necrosis,
    mass_effect,
) -> list[LesionSpec]:
    lo_n, hi_n = lesions_per_subject
    n = int(rng.integers(lo_n, hi_n + 1))
    v_lo, v_hi = (float(v) for v in lesion_volume)
    c_lo, c_hi = (float(c) for c in lesion_contrast)
    voxel_mm3 = float(np.prod(spacing))
    specs = []
    for _ in range(n):
        vol = float(np.exp(rng.uniform(np.log(v_lo), np.log(v_hi))))
        sign = 1.0 if rng.random() < p_hyper else -1.0
        c = sign * float(rng.uniform(c_lo, c_hi))
        ax = rng.uniform([1.0, 0.55, 0.45], [1.0, 1.0, 1.0])
        ax = tuple(float(a) for a in ax / np.prod(ax) ** (1 / 3))
        rot = _rotation(rng, 180.0)
        irr = float(rng.uniform(0.25, 0.8))
        has_edema = edema and vol > 300 and rng.random() < 0.6
        core = float(rng.uniform(0.3, 0.65)) if has_edema else 1.0
        # edema is fluid: bright in T2w, darker in T1w
        ed_c = float(rng.uniform(0.2, 0.45)) if contrast == "t2" else -float(rng.uniform(0.08, 0.2))
        nec = float(rng.uniform(0.2, 0.5)) if (necrosis and vol * core > 1500 and rng.random() < 0.6) else 0.0
        me = float(mass_effect * rng.uniform(0.5, 1.0))
        rep = float(rng.uniform(0.6, 1.0))
        specs.append(LesionSpec(vol, c, ax, rot, irr, core, ed_c, nec, me, rep, voxels=max(1, round(vol / voxel_mm3))))
    specs.sort(key=lambda s: -s.volume_mm3)  # place the large ones first
    return specs


def _defaults(**kw):
    d = dict(
        lesion_volume=(20.0, 20000.0),
        lesion_contrast=(0.05, 0.6),
        lesions_per_subject=(1, 3),
        p_hyper=0.5,
        edema=True,
        necrosis=True,
        mass_effect=0.3,
    )
    d.update({k: v for k, v in kw.items() if v is not None})
    return d


def lesion_plan(
    seed: int, index: int, *, shape=96, fov_mm: float = 192.0, contrast: str = "t1", **lesion_kw
) -> list[LesionSpec]:
    """The lesions an abnormal subject ``index`` of a cohort with ``seed`` gets (the same draws the
    generator uses; placement needs the anatomy, the volumes do not)."""
    _, spacing, _ = output_geometry(shape, fov_mm)
    _, rng_les, _ = _subject_rngs(seed, index)
    return _draw_lesions(rng_les, contrast=contrast, spacing=spacing, **_defaults(**lesion_kw))


# ----------------------------------------------------------------------------------------------
# anatomy warp
# ----------------------------------------------------------------------------------------------


@dataclass
class _Warp:
    center: np.ndarray
    matrix: np.ndarray
    shift: np.ndarray
    disp: torch.Tensor  # [1, 3, g, g, g] coarse displacement field (mm) over the output cube
    disp_inv_affine: np.ndarray
    vent_k: float
    atrophy: float


def _draw_warp(
    rng, geom, *, affine_scale, affine_rot_deg, affine_shift_mm, deform_mm, deform_smooth_mm, ventricle, atrophy
) -> _Warp:
    shape, spacing, affine = geom
    fov = np.asarray(shape) * spacing
    scale = (1.0 + rng.uniform(-affine_scale, affine_scale)) * (1.0 + rng.uniform(-0.4, 0.4, 3) * affine_scale)
    shear = np.eye(3) + np.triu(rng.uniform(-0.02, 0.02, (3, 3)), 1)
    matrix = _rotation(rng, affine_rot_deg) @ np.diag(scale) @ shear
    shift = rng.uniform(-affine_shift_mm, affine_shift_mm, 3)
    # smooth random displacement on a coarse grid (half the smoothing length apart)
    step = deform_smooth_mm / 2.0
    g = np.ceil(fov / step).astype(int) + 3
    noise = rng.standard_normal((3, *g))
    field_ = np.stack([ndimage.gaussian_filter(c, 2.0, mode="wrap") for c in noise])
    norm = np.sqrt((field_**2).sum(0)).max()
    amp = deform_mm * rng.uniform(0.6, 1.0)
    field_ *= amp / max(norm, 1e-8)
    # invertibility: det(I + grad u) > 0 everywhere (holds easily for a few mm over ~16 mm)
    for _ in range(10):
        jac = np.stack([np.stack(np.gradient(field_[i], step), 0) for i in range(3)])  # [3, 3, ...]
        det = np.linalg.det(np.moveaxis(jac, (0, 1), (-2, -1)) + np.eye(3))
        if det.min() > 0.5:
            break
        field_ *= 0.5
    lo = affine[:3, 3] - spacing / 2 - step
    d_aff = np.diag([step, step, step, 1.0])
    d_aff[:3, 3] = lo
    return _Warp(
        center=np.asarray(FOV_CENTER_MM),
        matrix=matrix,
        shift=shift,
        disp=torch.from_numpy(field_.astype(np.float32))[None],
        disp_inv_affine=np.linalg.inv(d_aff),
        vent_k=float(rng.uniform(-0.4 * ventricle, ventricle)),
        atrophy=float(rng.uniform(0.0, atrophy)),
    )


def _mass_effect(points: torch.Tensor, lesions, affine: np.ndarray, depth=None) -> torch.Tensor:
    """Pull-back of a radial push of the tissue away from each lesion centre (Gaussian profile of
    width 1.2 r). ``depth = (edt [1, 1, ...] in mm, its world->voxel affine)``: the push tapers to
    zero over the outer 10 mm of the brain, so the tissue is compressed against the brain edge
    instead of moving it (the skull does not give way)."""
    lesions = [les for les in lesions if les.mass_effect > 0 and les.center is not None]
    if not lesions:
        return points
    taper = 1.0
    if depth is not None:
        taper = torch.clamp(torch.movedim(_sample(depth[0], points, depth[1]), 0, -1) / 10.0, 0.0, 1.0)
    for les in lesions:
        r = (3 * les.volume_mm3 / (4 * math.pi)) ** (1 / 3)
        c = torch.as_tensor(affine[:3, :3] @ les.center + affine[:3, 3], dtype=torch.float32)
        d = points - c
        g = torch.exp(-(d**2).sum(-1, keepdim=True) / (2 * (1.2 * r) ** 2))
        points = c + d * (1.0 - les.mass_effect * g * taper)
    return points


def _apply_warp(points: torch.Tensor, warp: _Warp, base: _Base) -> torch.Tensor:
    """Output-space world points -> template world points."""
    u = _sample(warp.disp, points, warp.disp_inv_affine)  # [3, ...]
    c = torch.as_tensor(warp.center, dtype=torch.float32)
    m = torch.as_tensor(warp.matrix, dtype=torch.float32)
    t = torch.as_tensor(warp.shift, dtype=torch.float32)
    y = (points - c) @ m.T + c + t + torch.movedim(u, 0, -1)
    if warp.vent_k != 0.0:
        v = torch.as_tensor(base.vent_center, dtype=torch.float32)
        p = torch.as_tensor(base.vent_prec, dtype=torch.float32)
        d = y - v
        g = torch.exp(-0.5 * ((d @ p) * d).sum(-1, keepdim=True))
        y = v + d * (1.0 - warp.vent_k * g)
    return y


def _pullback(
    shape, affine, warp: _Warp, base: _Base, lesions=(), stride: int = 1, depth=None
) -> torch.Tensor | tuple[torch.Tensor, float]:
    """Template-world points ``[X, Y, Z, 3]`` for the output voxels: mass effect, then the subject
    warp. ``stride > 1``: only every ``stride``-th voxel (exact). ``stride == 1``: all parts are
    smooth, so the map is evaluated on about every second voxel and the displacement is interpolated
    trilinearly to the full grid (exact at the coarse nodes, which include both edges); returns the
    points and the smallest Jacobian determinant of the whole map on the coarse grid."""
    if stride > 1:
        idx = [np.arange(0, n, stride) for n in shape]
    else:
        idx = [np.linspace(0, n - 1, (n + 1) // 2 + 1) for n in shape]
    axes = [torch.as_tensor(c * affine[i, i] + affine[i, 3], dtype=torch.float32) for i, c in enumerate(idx)]
    pts = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
    out = _apply_warp(_mass_effect(pts, lesions, affine, depth), warp, base)
    if stride > 1:
        return out
    return _upsample_map(out, pts, shape, affine), _min_jacobian(out, pts)


def _min_jacobian(out: torch.Tensor, pts: torch.Tensor) -> float:
    """Smallest Jacobian determinant of a sampled map ``pts -> out`` (both ``[X, Y, Z, 3]`` on a
    rectilinear grid): > 0 means the map is locally invertible (no folding)."""
    y = out.numpy().astype(np.float64)
    axes = [pts[:, 0, 0, 0].numpy(), pts[0, :, 0, 1].numpy(), pts[0, 0, :, 2].numpy()]
    jac = np.stack([np.stack(np.gradient(y[..., k], *axes), -1) for k in range(3)], -2)
    return float(np.linalg.det(jac).min())


def _upsample_map(out: torch.Tensor, pts: torch.Tensor, shape, affine) -> torch.Tensor:
    disp = torch.movedim(out - pts, -1, 0)[None]
    disp = F.interpolate(disp, size=shape, mode="trilinear", align_corners=True)
    return _world_grid(shape, affine) + torch.movedim(disp[0], 0, -1)


# ----------------------------------------------------------------------------------------------
# lesions
# ----------------------------------------------------------------------------------------------


def _choose_centers(lesions, mask: np.ndarray, tissue: np.ndarray, csf: np.ndarray, spacing, rng) -> np.ndarray:
    """Pick lesion centres inside the brain: in tissue, away from the brain edge, from CSF pools
    (ventricles, large sulci) and from each other; constraints are relaxed step by step if needed.
    Returns the depth map (distance to the brain edge, mm)."""
    edt = ndimage.distance_transform_edt(mask, sampling=spacing)
    edt_csf = ndimage.distance_transform_edt(mask & (csf < 0.6), sampling=spacing)
    placed: list[tuple[np.ndarray, float]] = []
    for les in lesions:
        r = (3 * les.volume_mm3 / (4 * math.pi)) ** (1 / 3)
        for relax in (1.0, 0.6, 0.3, 0.0):
            depth = min(relax * (0.8 * r + 3.0), 0.8 * edt.max())
            cand = np.argwhere((edt >= depth) & (edt_csf >= relax * min(0.5 * r, 8.0)) & (tissue > 0.5))
            if len(cand) == 0:
                continue
            pts = cand * spacing
            ok = np.ones(len(cand), bool)
            for c, rr in placed:
                ok &= np.linalg.norm(pts - c, axis=1) >= relax * (r + rr) + 2 * spacing.max()
            if ok.any():
                choice = cand[rng.choice(np.flatnonzero(ok))]
                break
        else:
            choice = np.argwhere(mask)[rng.integers(int(mask.sum()))]
        les.center = choice.astype(np.float64)  # voxel index for now
        placed.append((choice * spacing, r))
    return edt


def _rasterize(lesions, mask: np.ndarray, csf: np.ndarray, spacing, rng):
    """Grow every lesion inside ``mask`` (avoiding CSF: never where the CSF fraction is >= 0.6, and
    penalised in the growth field elsewhere). Returns the label, per lesion the flat indices of its
    core, edema rim and necrosis plus the core heterogeneity, and the voxel count per lesion.
    Lesions stay one voxel apart, so 18/26-connected components of the label are the lesions."""
    shape = mask.shape
    label = np.zeros(shape, bool)
    parts, counts = [], []
    for les in lesions:
        seed = np.asarray(les.center, dtype=int)
        r = (3 * les.volume_mm3 / (4 * math.pi)) ** (1 / 3)
        half = np.ceil(2.5 * r * max(les.axes) / spacing).astype(int) + 2
        lo = np.maximum(seed - half, 0)
        hi = np.minimum(seed + half + 1, shape)
        sl = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        axes = [(np.arange(a, b) - s) * sp for a, b, s, sp in zip(lo, hi, seed, spacing, strict=True)]
        local = np.stack(np.meshgrid(*axes, indexing="ij"), -1) @ les.rotation  # envelope frame
        rho2 = ((local / (r * np.asarray(les.axes))) ** 2).sum(-1)
        box = rho2.shape
        noise = ndimage.gaussian_filter(rng.standard_normal(box), np.maximum(0.35 * r / spacing, 0.5))
        f = 1.0 - rho2 + les.irregularity * noise / (noise.std() + 1e-8) - 0.6 * csf[sl]
        busy = ndimage.binary_dilation(label[sl], structure=np.ones((3, 3, 3), bool))
        allowed = mask[sl] & (csf[sl] < 0.6) & ~busy
        start = tuple(seed - lo)
        if not allowed[start]:  # the centre was chosen on a coarser grid: take the best allowed voxel
            if not allowed.any():
                counts.append(0)
                continue
            start = np.unravel_index(int(np.argmax(np.where(allowed, f, -np.inf))), box)
        order = grow_region(f, allowed, start, les.voxels)
        counts.append(int(order.size))
        if order.size == 0:
            continue
        het = ndimage.gaussian_filter(rng.standard_normal(box), 0.8)
        het = (het / (het.std() + 1e-8)).ravel()
        n_core = max(1, round(les.core_fraction * order.size))
        n_nec = round(les.necrosis_fraction * n_core)
        full = np.ravel_multi_index(tuple(np.add(np.unravel_index(order, box), lo[:, None])), shape)
        label.flat[full] = True
        parts.append((les, full[:n_core], full[n_core:], full[:n_nec], het[order[:n_core]]))
    return label, parts, counts


# ----------------------------------------------------------------------------------------------
# one subject
# ----------------------------------------------------------------------------------------------

TISSUE_MEANS = {  # (low, high) of per-subject tissue means, relative units
    "t1": {"gm": (0.58, 0.70), "wm": (0.95, 1.05), "csf": (0.18, 0.30)},
    "t2": {"gm": (0.52, 0.62), "wm": (0.36, 0.46), "csf": (0.95, 1.05)},
}


@dataclass
class Subject:
    image: np.ndarray  # float32 [0, 1], background 0
    label: np.ndarray  # uint8
    mask: np.ndarray  # uint8
    tissues: np.ndarray  # float32 [3, ...] gm, wm, csf fractions (after warp and atrophy)
    lesion_volumes_mm3: list[float]
    base: str
    min_jacobian: float  # of the whole output->template map (> 0: invertible, no folding)


def _subject_anatomy(geom, warp: _Warp, b: _Base, lesions: list[LesionSpec], rng_les):
    """Warp the template onto the output grid (lesion centres first: their mass effect is part of
    the warp). Returns the sampled maps ``[4, ...]``, the brain mask, the tissue fractions
    ``(gm, wm, csf)`` after cortical atrophy and the smallest Jacobian determinant of the map."""
    shape, spacing, affine = geom
    depth = None
    if lesions:
        # centres are chosen on every second voxel (cheap): tissue, away from the edge and each other
        pre = _sample(b.maps, _pullback(shape, affine, warp, b, stride=2), b.inv_affine).numpy()
        edt = _choose_centers(lesions, pre[3] > 0.5, pre[0] + pre[1], pre[2], spacing * 2, rng_les)
        affine2 = affine.copy()
        affine2[:3, :3] *= 2
        depth = (torch.from_numpy(edt.astype(np.float32))[None, None], np.linalg.inv(affine2))
        for les in lesions:
            les.center = les.center * 2
    points, min_jacobian = _pullback(shape, affine, warp, b, lesions, depth=depth)
    maps = _sample(b.maps, points, b.inv_affine).numpy()
    mask = largest_component(maps[3] > 0.5)
    gm, wm, csf = (np.where(mask, m, 0.0).astype(np.float32) for m in maps[:3])
    # cortical atrophy: GM next to CSF becomes CSF
    if warp.atrophy > 0:
        near_csf = np.clip(ndimage.gaussian_filter(csf, 1.0) * 2.5, 0, 1)
        t = warp.atrophy * gm * near_csf
        gm, csf = gm - t, csf + t
    # background inside the mask (rare partial voxels at the edge) counts as CSF
    csf = np.where(mask, np.maximum(csf, 1.0 - gm - wm), 0.0).astype(np.float32)
    return maps, mask, (gm, wm, csf), min_jacobian


def _tissue_image(rng_int, contrast: str, shape, gm, wm, csf) -> tuple[np.ndarray, dict[str, float]]:
    """Partial-volume mixture of per-subject tissue means with within-tissue texture."""
    means = {k: float(rng_int.uniform(*v)) for k, v in TISSUE_MEANS[contrast].items()}
    tex = 0.035
    img = (
        gm * means["gm"] * (1 + tex * smooth_noise(rng_int, shape, 0.8))
        + wm * means["wm"] * (1 + tex * smooth_noise(rng_int, shape, 0.8))
        + csf * means["csf"] * (1 + 1.5 * tex * smooth_noise(rng_int, shape, 0.8))
    )
    return img, means


def _paint_lesions(img, lesions, mask, csf_raw, spacing, means, rng_les, rng_int):
    """Grow the lesions (:func:`_rasterize`) and paint them into ``img``; returns the image, the
    label and the lesion volumes (mm^3).

    Core: replaces the tissue (weight ``replacement``) by lesion tissue whose mean differs from the
    mean of the tissue it replaces by ``contrast``; rim: edema modulates the tissue (it follows the
    anatomy); necrosis: fluid. Edges are softened, the label stays binary.
    """
    shape = mask.shape
    label, parts, counts = _rasterize(lesions, mask, np.where(mask, csf_raw, 1.0), spacing, rng_les)
    volumes = [c * float(np.prod(spacing)) for c in counts if c > 0]
    weight, target, rim, necro = (np.zeros(shape, np.float32) for _ in range(4))
    for les, core_idx, rim_idx, nec_idx, het in parts:
        ref = float(img.flat[core_idx].mean())
        weight.flat[core_idx] = les.replacement
        target.flat[core_idx] = les.replacement * ref * (1.0 + les.contrast) * (1.0 + 0.08 * het)
        rim.flat[rim_idx] = les.edema_contrast
        necro.flat[nec_idx] = 1.0
    weight, target, rim, necro = (ndimage.gaussian_filter(a, 0.6) for a in (weight, target, rim, necro))
    img = (img * (1.0 - weight) + target) * (1.0 + rim)
    fluid = means["csf"] * rng_int.uniform(0.9, 1.15)
    img = img * (1.0 - necro) + necro * fluid
    return img, label, volumes


def _acquire(img, mask, label, means, rng_int, bias: float, noise: float, blur: float) -> np.ndarray:
    """Bias field, Rician noise and blur; then skull-strip and normalise to [0, 1].

    Min-max with the (skull-stripped) background as the minimum and a robust maximum: the 99.5th
    percentile of the normal brain voxels, so that a bright lesion does not rescale the brain.
    """
    shape = mask.shape
    amplitude = bias * rng_int.uniform(0.5, 1.0)  # drawn before the field: the stream's order is fixed
    img = img * np.exp(smooth_field(rng_int, shape, 4) * amplitude)
    sig = noise * rng_int.uniform(0.6, 1.0) * max(means.values())
    n1 = rng_int.standard_normal(shape, dtype=np.float32)
    n2 = rng_int.standard_normal(shape, dtype=np.float32)
    img = np.sqrt((img + sig * n1) ** 2 + (sig * n2) ** 2)
    img = ndimage.gaussian_filter(img, blur * rng_int.uniform(0.7, 1.0)) if blur > 0 else img
    ref = img[mask & ~label] if (mask & ~label).any() else img[mask]
    img = np.clip(img / max(float(np.percentile(ref, 99.5)), 1e-6), 0.0, 1.0)
    img[~mask] = 0.0
    return img


@single_thread()
def generate_subject(
    index: int,
    *,
    abnormal: bool,
    seed: int = 0,
    shape=96,
    contrast: str = "t1",
    base: str = "mni152",
    fov_mm: float = 192.0,
    affine_scale: float = 0.05,
    affine_rot_deg: float = 3.0,
    affine_shift_mm: float = 2.0,
    deform_mm: float = 5.0,
    deform_smooth_mm: float = 16.0,
    ventricle: float = 0.25,
    atrophy: float = 0.3,
    bias: float = 0.12,
    noise: float = 0.025,
    blur: float = 0.5,
    **lesion_kw,
) -> Subject:
    """Synthesise one registered subject (see the module docstring). Deterministic for
    ``(seed, index)``; ``abnormal`` adds the lesions of ``lesion_plan(seed, index, ...)``."""
    if contrast not in TISSUE_MEANS:
        raise ValueError(f"contrast must be 't1' or 't2', got {contrast!r}")
    if base not in BASES:
        raise ValueError(f"a subject's base is one of {BASES} ('both' is a cohort option), got {base!r}")
    geom = output_geometry(shape, fov_mm)
    shape, spacing, _ = geom
    b = _base(base, tuple(float(s) for s in spacing))
    rng_anat, rng_les, rng_int = _subject_rngs(seed, index)
    warp = _draw_warp(
        rng_anat,
        geom,
        affine_scale=affine_scale,
        affine_rot_deg=affine_rot_deg,
        affine_shift_mm=affine_shift_mm,
        deform_mm=deform_mm,
        deform_smooth_mm=deform_smooth_mm,
        ventricle=ventricle,
        atrophy=atrophy,
    )
    lesions: list[LesionSpec] = []
    if abnormal:
        lesions = _draw_lesions(rng_les, contrast=contrast, spacing=spacing, **_defaults(**lesion_kw))
    maps, mask, (gm, wm, csf), min_jacobian = _subject_anatomy(geom, warp, b, lesions, rng_les)
    img, means = _tissue_image(rng_int, contrast, shape, gm, wm, csf)
    label = np.zeros(shape, bool)
    volumes: list[float] = []
    if lesions:
        img, label, volumes = _paint_lesions(img, lesions, mask, maps[2], spacing, means, rng_les, rng_int)
    img = _acquire(img, mask, label, means, rng_int, bias, noise, blur)
    label &= mask
    return Subject(
        image=img.astype(np.float32),
        label=label.astype(np.uint8),
        mask=mask.astype(np.uint8),
        tissues=np.stack([gm, wm, csf]).astype(np.float32),
        lesion_volumes_mm3=volumes,
        base=base,
        min_jacobian=min_jacobian,
    )


# ----------------------------------------------------------------------------------------------
# cohort
# ----------------------------------------------------------------------------------------------


def mean_pairwise_dice(masks) -> float:
    """Mean Dice over all pairs of binary masks (a list of equally shaped arrays)."""
    if len(masks) < 2:
        return float("nan")
    m = torch.from_numpy(np.stack([np.asarray(x, dtype=bool).ravel() for x in masks]).astype(np.float32))
    inter = m @ m.T
    sizes = m.sum(1)
    dice = 2 * inter / (sizes[:, None] + sizes[None, :]).clamp_min(1)
    iu = torch.triu_indices(len(masks), len(masks), 1)
    return float(dice[iu[0], iu[1]].mean())


def cohort_layout(n_normal: int, n_abnormal: int, seed: int, base: str) -> tuple[np.ndarray, list[str]]:
    """Which subject indices of a cohort are abnormal (shuffled, so the order carries no signal) and
    the base anatomy of each (``base="both"`` alternates within the normal and the abnormal group)."""
    if base not in BASES + ("both",):
        raise ValueError(f"base must be one of {BASES + ('both',)}, got {base!r}")
    abnormal = shuffled_abnormal(n_normal, n_abnormal, seed, COHORT_STREAM)
    bases, counter = [], {False: 0, True: 0}
    for a in abnormal:
        bases.append(BASES[counter[bool(a)] % 2] if base == "both" else base)
        counter[bool(a)] += 1
    return abnormal, bases


def _write_subject(job) -> dict:
    """Generate subject ``i`` and write its three files into ``tmp``; returns its cohort.csv row."""
    i, is_abn, base, tmp, affine, kw = job
    s = generate_subject(i, abnormal=is_abn, base=base, **kw)
    name = write_subject_files(tmp, i, affine, s.image, s.label, s.mask, MNI_XFORM)
    return subject_row(name, is_abn, s.lesion_volumes_mm3, contrast=kw["contrast"], base=base)


def _describe(row: dict) -> str:
    return f"{row['base']:8s}"


def generate_cohort(
    out_dir,
    n_normal: int = 20,
    n_abnormal: int = 12,
    shape=96,
    contrast: str = "t1",
    seed: int = 0,
    base: str = "mni152",
    *,
    fov_mm: float = 192.0,
    lesion_volume=(20.0, 20000.0),
    lesion_contrast=(0.05, 0.6),
    lesions_per_subject=(1, 3),
    p_hyper: float = 0.5,
    edema: bool = True,
    necrosis: bool = True,
    mass_effect: float = 0.3,
    overwrite: bool = False,
    verbose: bool = False,
    workers: int = 1,
    **anatomy_kw,
) -> Path:
    """Write a synthetic registered cohort to ``out_dir`` and return its path.

    Layout: ``images/sub-XXXX.nii.gz`` (float32, [0, 1], background 0), ``labels/`` (uint8, all
    zero for normals), ``masks/`` (uint8 brain masks) and ``cohort.csv`` with columns
    ``image,label,mask,abnormal,n_lesions,lesion_volumes_mm3,contrast,base`` (relative paths,
    volumes ``;``-separated). All subjects share one affine (``output_geometry(shape, fov_mm)``).

    ``lesion_volume``: (min, max) mm^3, log-uniform; ``lesion_contrast``: (min, max) relative
    contrast magnitude of the lesion core, hyper-intense with probability ``p_hyper``;
    ``lesions_per_subject``: inclusive (min, max); ``edema`` / ``necrosis``: allow an edema rim /
    necrotic core on medium-large lesions; ``mass_effect``: push strength (0 disables).
    ``anatomy_kw`` go to ``generate_subject`` (``affine_scale``, ``affine_rot_deg``,
    ``affine_shift_mm``, ``deform_mm``, ``deform_smooth_mm``, ``ventricle``, ``atrophy``, ``bias``,
    ``noise``, ``blur``). Written atomically by :func:`scripts.synthetic.common.write_cohort`: an
    existing non-empty ``out_dir`` is an error unless ``overwrite``. ``workers > 1`` generates
    subjects in that many processes (same result: every subject has its own random stream), worth it
    for 224^3 grids.
    """
    contrast = str(contrast).lower()
    if contrast not in TISSUE_MEANS:
        raise ValueError(f"contrast must be 't1' or 't2', got {contrast!r}")
    check_counts(n_normal, n_abnormal)
    shape, _, affine = output_geometry(shape, fov_mm)
    abnormal, bases = cohort_layout(n_normal, n_abnormal, seed, base)
    kw = dict(seed=seed, shape=shape, contrast=contrast, fov_mm=fov_mm, **anatomy_kw)
    kw.update(
        lesion_volume=tuple(lesion_volume),
        lesion_contrast=tuple(lesion_contrast),
        lesions_per_subject=tuple(lesions_per_subject),
        p_hyper=p_hyper,
        edema=edema,
        necrosis=necrosis,
        mass_effect=mass_effect,
    )

    def make_jobs(tmp: Path) -> list:
        pairs = zip(abnormal, bases, strict=True)
        return [(i, bool(is_abn), b, tmp, affine, kw) for i, (is_abn, b) in enumerate(pairs)]

    return write_cohort(
        out_dir, make_jobs, _write_subject, _describe, workers=workers, overwrite=overwrite, verbose=verbose
    )


def ensure_cohort(out_dir, **kwargs) -> Path:
    """``out_dir`` if it already holds a cohort, else ``generate_cohort(out_dir, **kwargs)``."""
    return common.ensure_cohort(out_dir, generate_cohort, **kwargs)


def summarize_cohort(cohort_dir) -> dict:
    """Counts, lesion size classes (Sec. 4.5), mean pairwise brain-mask Dice and the voxel spacing
    of a written cohort."""
    import nibabel as nib

    cohort_dir = Path(cohort_dir)
    rows = read_cohort(cohort_dir)
    first = nib.load(str(cohort_dir / rows[0]["mask"]))
    masks = [np.asarray(nib.load(str(cohort_dir / r["mask"])).dataobj) > 0 for r in rows]
    return {
        **cohort_counts(rows),
        "mask_dice": mean_pairwise_dice(masks),
        "shape": tuple(int(n) for n in first.shape),
        "spacing_mm": tuple(float(z) for z in first.header.get_zooms()[:3]),
    }


def save_preview(cohort_dir, png, n_each: int = 3) -> Path:
    """Mid-slice montage of ``n_each`` normal and abnormal subjects of a written cohort (three
    orthogonal slices; through the largest lesion for abnormal subjects), lesion contours in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nibabel as nib

    cohort_dir = Path(cohort_dir)
    pick = preview_rows(read_cohort(cohort_dir), n_each)
    fig, axes = plt.subplots(len(pick), 3, figsize=(7.5, 2.6 * len(pick)), squeeze=False)
    for row, ax in zip(pick, axes, strict=True):
        img = np.asarray(nib.load(str(cohort_dir / row["image"])).dataobj)
        lab = np.asarray(nib.load(str(cohort_dir / row["label"])).dataobj) > 0
        centre = largest_lesion_centre(lab)
        views = [
            (img[centre[0]], lab[centre[0]]),
            (img[:, centre[1]], lab[:, centre[1]]),
            (img[:, :, centre[2]], lab[:, :, centre[2]]),
        ]
        for a, (im, lb), title in zip(ax, views, ("sagittal", "coronal", "axial"), strict=True):
            a.imshow(im.T, cmap="gray", origin="lower", vmin=0, vmax=1, interpolation="nearest")
            if lb.any():
                a.contour(lb.T.astype(float), levels=[0.5], colors="r", linewidths=0.8, origin="lower")
            a.set_xticks([])
            a.set_yticks([])
            a.set_title(f"{Path(row['image']).name[:8]} {title}", fontsize=7)
        kind = f"abnormal ({row['n_lesions']} lesions)" if row["abnormal"] == "1" else "normal"
        ax[0].set_ylabel(f"{kind}\n{row['base']} {row['contrast']}", fontsize=7)
    return save_figure(fig, png)
