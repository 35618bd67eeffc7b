"""Per-subject random draws of the synthetic brain cohorts: lesion plans, the anatomy warp (affine
residual, smooth displacement, ventricles, mass effect) as one pull-back map, and lesion rasterisation
(see :mod:`scripts.synthetic.brain`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from scripts.synthetic.brain_templates import FOV_CENTER_MM, BaseAnatomy, output_geometry, sample_at, world_grid
from scripts.synthetic.cohort_files import grow_region

__all__ = [
    "LesionSpec",
    "Warp",
    "choose_centers",
    "draw_lesions",
    "draw_warp",
    "lesion_defaults",
    "lesion_plan",
    "pullback",
    "rasterize",
    "subject_rngs",
]

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


def subject_rngs(seed: int, index: int):
    """Independent anatomy, lesion and intensity streams of one subject."""
    return np.random.default_rng([seed, index]).spawn(3)


def draw_lesions(
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
        # edema is fluid bound in tissue: bright in T2w and FLAIR, darker in T1w
        ed_c = float(rng.uniform(0.2, 0.45)) if contrast != "t1" else -float(rng.uniform(0.08, 0.2))
        nec = float(rng.uniform(0.2, 0.5)) if (necrosis and vol * core > 1500 and rng.random() < 0.6) else 0.0
        me = float(mass_effect * rng.uniform(0.5, 1.0))
        rep = float(rng.uniform(0.6, 1.0))
        specs.append(LesionSpec(vol, c, ax, rot, irr, core, ed_c, nec, me, rep, voxels=max(1, round(vol / voxel_mm3))))
    specs.sort(key=lambda s: -s.volume_mm3)  # place the large ones first
    return specs


def lesion_defaults(**kw):
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
    _, rng_les, _ = subject_rngs(seed, index)
    return draw_lesions(rng_les, contrast=contrast, spacing=spacing, **lesion_defaults(**lesion_kw))


# ----------------------------------------------------------------------------------------------
# anatomy warp
# ----------------------------------------------------------------------------------------------


@dataclass
class Warp:
    center: np.ndarray
    matrix: np.ndarray
    shift: np.ndarray
    disp: torch.Tensor  # [1, 3, g, g, g] coarse displacement field (mm) over the output cube
    disp_inv_affine: np.ndarray
    vent_k: float
    atrophy: float


def draw_warp(
    rng, geom, *, affine_scale, affine_rot_deg, affine_shift_mm, deform_mm, deform_smooth_mm, ventricle, atrophy
) -> Warp:
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
    return Warp(
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
        taper = torch.clamp(torch.movedim(sample_at(depth[0], points, depth[1]), 0, -1) / 10.0, 0.0, 1.0)
    for les in lesions:
        r = (3 * les.volume_mm3 / (4 * math.pi)) ** (1 / 3)
        c = torch.as_tensor(affine[:3, :3] @ les.center + affine[:3, 3], dtype=torch.float32)
        d = points - c
        g = torch.exp(-(d**2).sum(-1, keepdim=True) / (2 * (1.2 * r) ** 2))
        points = c + d * (1.0 - les.mass_effect * g * taper)
    return points


def _apply_warp(points: torch.Tensor, warp: Warp, base: BaseAnatomy) -> torch.Tensor:
    """Output-space world points -> template world points."""
    u = sample_at(warp.disp, points, warp.disp_inv_affine)  # [3, ...]
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


def pullback(
    shape, affine, warp: Warp, base: BaseAnatomy, lesions=(), stride: int = 1, depth=None
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
    return world_grid(shape, affine) + torch.movedim(disp[0], 0, -1)


# ----------------------------------------------------------------------------------------------
# lesions
# ----------------------------------------------------------------------------------------------


def choose_centers(lesions, mask: np.ndarray, tissue: np.ndarray, csf: np.ndarray, spacing, rng) -> np.ndarray:
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


def rasterize(lesions, mask: np.ndarray, csf: np.ndarray, spacing, rng):
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
