"""Synthetic chest-CT cohorts with left/right lung masks and exact lesion masks (lung demo and tests).

The lung experiment of the paper (Sec. 4.1 "Lung CT", 4.6) uses LIDC-IDRI and MSD Lung, which cannot
be downloaded here, so this module draws chest CTs procedurally, in the style of the brain generator
(:mod:`scripts.synthetic.brain`): one random stream per subject, ``np.random.default_rng([seed, index])``,
and the same atomic ``images/ labels/ masks/ cohort.csv`` cohort folder (:mod:`scripts.synthetic.common`).

Each subject is drawn in a body frame (mm; x = the subject's right, y = anterior, z = superior, i.e.
RAS) and rendered directly on its own output grid:

* **body**: an elliptic cross-section (width and depth drawn per subject) with subcutaneous fat
  (about -100 HU), a muscular chest wall (about +40 HU), ribs (bands of bone, +400...+800 HU, on a
  ring inside the wall, sloping down anteriorly; ``ribs=False`` drops them), a vertebral body with its
  canal, the sternum, a heart and descending aorta in the mediastinum, upper abdomen below the
  diaphragm; air (-1000 HU) outside the body;
* **lungs**: two lungs of independently drawn height, base level and diaphragm dome; cross-sections
  fill the thoracic cavity lateral to the mediastinum and taper to the apex; cardiac impression,
  paravertebral gutter and a smooth random deformation of the surface; a gap of at least two voxels
  (``>= 4`` mm at 1 mm) between them, so a binary mask splits into two components;
* **parenchyma**: about -850 HU (subject mean -880...-820) with fine texture and a gravity gradient
  (denser posteriorly);
* **vessels**: one pulmonary vessel tree per lung from its hilum, grown by recursive territory
  splitting (every branch aims at the centroid of the lung points it supplies; radii follow Murray's
  law ``r^3 = r1^3 + r2^3`` and taper along each branch), rendered with partial-volume edges, bright
  (+30...+120 HU);
* **airways**: trachea, main bronchi and an airway tree per lung (dark lumen, soft-tissue wall);
* **lesions** (abnormal subjects): 1-3 solid nodules/masses (``lesion_hu``, default -100...+100 HU,
  with heterogeneity) of log-uniform volume (``lesion_volume`` mm^3, so the small < 100, medium
  100-1000 and large > 1000 mm^3 classes all occur), grown inside a lung as irregular connected blobs of
  exactly ``round(volume / voxel volume)`` voxels (one voxel apart from each other, so connected
  components are lesions), capped at ``max_lesion_fraction`` of the lung; they replace parenchyma,
  vessels and airways;
* **acquisition**: a little blur (PSF), correlated Gaussian noise (10-25 HU), int16 HU.

Subjects are *not* registered: body size, lung shapes, position in the field of view (shift, a few
degrees of rotation about the body axis), field of view and affine origin vary. Voxels are
non-isotropic by default (1.5 x 1.5 x 2.5 mm) and stored in ``axcodes`` orientation (default LPS, the
usual orientation of CT converted from DICOM), so the bundle's reorientation and 1 mm resampling are
exercised. Lung masks use the lungmask convention, 1 = right lung and 2 = left lung
(``mask_format="binary"`` writes 0/1 masks instead).

``scale`` shrinks the whole anatomy (lesions keep their absolute volumes): ``scale=1.0`` is adult size
(lungs of about 120 x 190 x 230 mm, which fit the paper's 160 x 238 x 336 crops at 1 mm); the default
0.4 keeps the demo fast (see ``docs/lung_ct.md`` for the crop sizes that go with each scale).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
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
    "LEFT_LABEL",
    "MASK_FORMATS",
    "RIGHT_LABEL",
    "LungSubject",
    "cohort_layout",
    "ensure_cohort",
    "generate_cohort",
    "generate_subject",
    "save_preview",
    "summarize_cohort",
]

#: lung mask labels (lungmask convention)
RIGHT_LABEL, LEFT_LABEL = 1, 2
AIR_HU = -1000.0
MASK_FORMATS = ("labels", "binary")
#: NIfTI qform/sform code of the written cohort: 1 = scanner anatomical (CT is not registered)
SCANNER_XFORM = 1
#: ``np.random.default_rng([seed, COHORT_STREAM])`` shuffles which subjects are abnormal
COHORT_STREAM = 2**31 - 2


# ----------------------------------------------------------------------------------------------
# grid
# ----------------------------------------------------------------------------------------------


def _axis_signs(axcodes: str) -> np.ndarray:
    """Signs of the diagonal affine of a grid stored in ``axcodes`` (e.g. ``"LPS"`` -> (-1, -1, 1))."""
    codes = str(axcodes).upper()
    if len(codes) != 3 or any(c not in "RLAPSI" for c in codes):
        raise ValueError(f"axcodes must be three letters of R/L, A/P, S/I in that order, got {axcodes!r}")
    signs = []
    for c, (pos, neg) in zip(codes, ("RL", "AP", "SI"), strict=True):
        if c not in (pos, neg):
            raise ValueError(f"axcodes must keep the axis order x, y, z (e.g. 'RAS', 'LPS'), got {axcodes!r}")
        signs.append(1.0 if c == pos else -1.0)
    return np.asarray(signs)


@dataclass
class _Grid:
    shape: tuple[int, int, int]
    spacing: np.ndarray  # mm
    affine: np.ndarray  # voxel -> world (RAS mm), diagonal
    axes: list[np.ndarray]  # world coordinate of the voxel centres along each array axis

    def index_range(self, lo_world: np.ndarray, hi_world: np.ndarray) -> list[slice]:
        """Array slices covering the world box ``[lo, hi]``."""
        out = []
        for i in range(3):
            a = (lo_world[i] - self.affine[i, 3]) / self.affine[i, i]
            b = (hi_world[i] - self.affine[i, 3]) / self.affine[i, i]
            a, b = min(a, b), max(a, b)
            out.append(slice(max(int(math.floor(a)), 0), min(int(math.ceil(b)) + 1, self.shape[i])))
        return out

    def world(self, sl: list[slice]) -> list[np.ndarray]:
        """World coordinates of the voxels of a box, as three broadcastable arrays."""
        x, y, z = (self.axes[i][sl[i]] for i in range(3))
        return [x[:, None, None], y[None, :, None], z[None, None, :]]


# ----------------------------------------------------------------------------------------------
# per-subject anatomy draws
# ----------------------------------------------------------------------------------------------


@dataclass
class _Anatomy:
    s: float  # scale
    A: float  # body semi-axes (mm): width, depth
    B: float
    fat: float  # fat layer thickness
    wall: float  # muscle wall thickness
    rib: float  # rib ring thickness
    Ac: float  # thoracic cavity semi-axes
    Bc: float
    mw: float  # mediastinum half-width
    gap: float  # minimum half-gap between the lungs (mm)
    heart_c: np.ndarray
    heart_r: np.ndarray
    spine_c: np.ndarray  # (x, y) of the vertebral body
    spine_r: float
    aorta_c: np.ndarray
    aorta_r: float
    lungs: dict  # side -> dict(z0, H, dome, xc, yc)
    z_lo: float  # field of view in the body frame (z)
    z_hi: float
    theta: float  # rotation about z (rad), body -> world
    shift: np.ndarray  # body origin in world mm
    margins: np.ndarray  # extra field of view (mm) on each side, x and y
    rib_period: float
    rib_phase: float
    rib_slope: float
    trachea_r: float
    carina_z: float


def _draw_anatomy(rng, s: float, shift_mm: float, rot_deg: float, origin_mm: float, min_gap: float) -> _Anatomy:
    A = 160.0 * s * rng.uniform(0.92, 1.08)  # noqa: N806
    B = 112.0 * s * rng.uniform(0.9, 1.1)  # noqa: N806
    fat = rng.uniform(5.0, 20.0) * s
    wall = rng.uniform(8.0, 14.0) * s
    rib = 6.0 * s
    inset = fat + wall + rib + 2.0 * s
    Ac, Bc = A - inset, B - inset  # noqa: N806
    mw = rng.uniform(10.0, 18.0) * s
    gap = max(mw, min_gap)
    spine_r = 16.0 * s * rng.uniform(0.9, 1.1)
    spine_c = np.array([0.0, -Bc + 0.6 * spine_r])
    lungs = {}
    for side, sign in (("right", 1.0), ("left", -1.0)):
        H = 230.0 * s * rng.uniform(0.85, 1.12)  # noqa: N806
        # the liver lifts the right lung's base
        z0 = rng.uniform(5.0, 18.0) * s if side == "right" else rng.uniform(-4.0, 4.0) * s
        lungs[side] = dict(
            sign=sign,
            z0=z0,
            H=H,
            dome=rng.uniform(0.08, 0.2),
            xc=sign * (gap + 0.5 * (Ac - gap)) * rng.uniform(0.92, 1.05),
            yc=-0.1 * Bc + rng.uniform(-0.05, 0.05) * Bc,
        )
    heart_r = np.array([50.0, 42.0, 45.0]) * s * rng.uniform(0.85, 1.15, 3)
    heart_c = np.array(
        [-rng.uniform(8.0, 22.0) * s, 0.35 * Bc, min(lungs["left"]["z0"], lungs["right"]["z0"]) + 0.3 * heart_r[2]]
    )
    aorta_r = rng.uniform(9.0, 13.0) * s
    aorta_c = np.array([-(spine_r * 0.8 + aorta_r * 0.5), spine_c[1] + spine_r + aorta_r * 0.6])
    z_top = max(lung["z0"] + lung["H"] for lung in lungs.values())
    z_bot = min(lung["z0"] for lung in lungs.values())
    z_lo = z_bot - rng.uniform(20.0, 40.0) * s
    z_hi = z_top + rng.uniform(10.0, 30.0) * s
    return _Anatomy(
        s=s,
        A=A,
        B=B,
        fat=fat,
        wall=wall,
        rib=rib,
        Ac=Ac,
        Bc=Bc,
        mw=mw,
        gap=gap,
        heart_c=heart_c,
        heart_r=heart_r,
        spine_c=spine_c,
        spine_r=spine_r,
        aorta_c=aorta_c,
        aorta_r=aorta_r,
        lungs=lungs,
        z_lo=z_lo,
        z_hi=z_hi,
        theta=math.radians(rng.uniform(-rot_deg, rot_deg)),
        shift=rng.uniform(-shift_mm, shift_mm, 3) * s + rng.uniform(-origin_mm, origin_mm, 3),
        margins=rng.uniform(8.0, 25.0, 4) * s,
        rib_period=rng.uniform(22.0, 28.0) * s,
        rib_phase=rng.uniform(0.0, 1.0),
        rib_slope=rng.uniform(0.25, 0.45),
        trachea_r=rng.uniform(7.0, 10.0) * s,
        carina_z=0.5
        * (lungs["left"]["z0"] + lungs["left"]["H"] * 0.62 + lungs["right"]["z0"] + lungs["right"]["H"] * 0.62),
    )


def _make_grid(an: _Anatomy, spacing, axcodes: str) -> _Grid:
    """The subject's output grid: the body's bounding box (rotated) plus margins, in ``axcodes``."""
    spacing = np.asarray(spacing, dtype=np.float64)
    signs = _axis_signs(axcodes)
    c, s_ = math.cos(an.theta), math.sin(an.theta)
    ext_x = abs(c) * an.A + abs(s_) * an.B
    ext_y = abs(s_) * an.A + abs(c) * an.B
    lo = np.array([-ext_x - an.margins[0], -ext_y - an.margins[1], an.z_lo]) + an.shift
    hi = np.array([ext_x + an.margins[2], ext_y + an.margins[3], an.z_hi]) + an.shift
    shape = tuple(int(math.ceil((b - a) / sp)) + 1 for a, b, sp in zip(lo, hi, spacing, strict=True))
    affine = np.eye(4)
    affine[:3, :3] = np.diag(signs * spacing)
    # the first voxel sits at the low corner for '+' axes, at the high corner for '-' axes
    affine[:3, 3] = np.where(signs > 0, lo, lo + (np.asarray(shape) - 1) * spacing)
    axes = [affine[i, 3] + affine[i, i] * np.arange(shape[i]) for i in range(3)]
    return _Grid(shape, spacing, affine, axes)


def _to_body(an: _Anatomy, x, y, z):
    """World -> body frame (rotation about z by -theta around ``shift``)."""
    c, s_ = math.cos(an.theta), math.sin(an.theta)
    dx, dy = x - an.shift[0], y - an.shift[1]
    return c * dx + s_ * dy, -s_ * dx + c * dy, z - an.shift[2]


def _to_world(an: _Anatomy, p: np.ndarray) -> np.ndarray:
    c, s_ = math.cos(an.theta), math.sin(an.theta)
    p = np.atleast_2d(p)
    x = c * p[:, 0] - s_ * p[:, 1] + an.shift[0]
    y = s_ * p[:, 0] + c * p[:, 1] + an.shift[1]
    return np.stack([x, y, p[:, 2] + an.shift[2]], 1)


# ----------------------------------------------------------------------------------------------
# lungs
# ----------------------------------------------------------------------------------------------


def _lung_masks(an: _Anatomy, grid: _Grid, xb, yb, zb, rng) -> dict[str, np.ndarray]:
    """Boolean masks of both lungs on the output grid."""
    warp = 0.08 * smooth_field(rng, grid.shape, 6)
    out = {}
    for side, L in an.lungs.items():  # noqa: N806
        h = (zb - L["z0"]) / L["H"]  # [1, 1, K] (broadcast)
        g = np.sqrt(np.clip(1.0 - np.clip(h, 0.0, 1.0) ** 2.2, 1e-4, 1.0))
        # shrink the cross-section towards the lung's axis with height (apex)
        xs = L["xc"] + (xb - L["xc"]) / g
        ys = L["yc"] + (yb - L["yc"]) / g
        cavity = (xs / an.Ac) ** 2 + (ys / an.Bc) ** 2 <= 1.0 + warp
        # concave medial surface: the mediastinum bulges laterally in its middle third
        bulge = an.mw * 0.9 * np.clip(1.0 - ((ys - 0.15 * an.Bc) / (0.65 * an.Bc)) ** 2, 0.0, 1.0)
        medial = L["sign"] * xs >= an.gap + bulge
        half = 0.5 * (an.Ac - an.gap)
        rho2 = ((xb - L["xc"]) / half) ** 2 + ((yb - L["yc"]) / an.Bc) ** 2
        dome = L["dome"] * np.clip(1.0 - rho2, 0.0, 1.0)
        vertical = (h >= dome + 0.02 * warp) & (h <= 1.0)
        heart = (
            ((np.stack([xb, yb], 0) - an.heart_c[:2, None, None, None]) / (an.heart_r[:2, None, None, None] + 4 * an.s))
            ** 2
        ).sum(0) + ((zb - an.heart_c[2]) / (an.heart_r[2] + 4 * an.s)) ** 2 <= 1.0
        spine = (xb - an.spine_c[0]) ** 2 + (yb - an.spine_c[1]) ** 2 <= (an.spine_r + 10 * an.s) ** 2
        lung = cavity & medial & vertical & ~heart & ~spine
        out[side] = largest_component(lung)
    # keep the lungs at least one voxel apart (they are separated by construction; this is a guard)
    touch = ndimage.binary_dilation(out["right"], np.ones((3, 3, 3), bool)) & out["left"]
    out["left"] &= ~touch
    return out


# ----------------------------------------------------------------------------------------------
# trees (vessels, airways)
# ----------------------------------------------------------------------------------------------


def _grow_tree(rng, root: np.ndarray, points: np.ndarray, r0: float, min_r: float, max_gen: int, min_points: int = 6):
    """Segments ``(p0, p1, r0, r1)`` (world mm) of a tree from ``root`` supplying ``points``.

    Recursive territory splitting: a branch runs from its start towards the centroid of its territory
    (45-70 % of the way; to the centroid for terminal branches), tapering by 10 %; its territory is then
    split in two along its principal axis (at a random quantile) and each half gets a child whose radius
    follows Murray's law with the territory size, ``r_child = r_end * (n_child / n) ** (1/3)``.
    """
    segments = []
    stack = [(np.asarray(root, float), points, float(r0), 0)]
    while stack:
        start, pts, r, gen = stack.pop()
        target = pts.mean(0)
        terminal = gen >= max_gen or len(pts) < 2 * min_points or r < min_r
        frac = 1.0 if terminal else rng.uniform(0.45, 0.7)
        end = start + (target - start) * frac
        r_end = r * 0.9
        segments.append((start, end, r, r_end))
        if terminal:
            continue
        centred = pts - target
        axis = np.linalg.svd(centred[: min(len(centred), 400)], full_matrices=False)[2][0]
        proj = centred @ axis
        cut = np.quantile(proj, rng.uniform(0.35, 0.65))
        for part in (pts[proj <= cut], pts[proj > cut]):
            if len(part) >= min_points:
                stack.append((end, part, r_end * (len(part) / len(pts)) ** (1 / 3), gen + 1))
    return segments


def _draw_tubes(grid: _Grid, occ: np.ndarray, segments, scale_r: float = 1.0, add_r: float = 0.0) -> None:
    """Partial-volume occupancy of tapered tubes (max into ``occ``), radius ``r * scale_r + add_r``."""
    w = float(grid.spacing.mean())
    for p0, p1, ra, rb in segments:
        ra, rb = ra * scale_r + add_r, rb * scale_r + add_r
        pad = max(ra, rb) + w
        sl = grid.index_range(np.minimum(p0, p1) - pad, np.maximum(p0, p1) + pad)
        if any(s.stop <= s.start for s in sl):
            continue
        x, y, z = grid.world(sl)
        d = p1 - p0
        length2 = float(d @ d) + 1e-9
        t = np.clip(((x - p0[0]) * d[0] + (y - p0[1]) * d[1] + (z - p0[2]) * d[2]) / length2, 0.0, 1.0)
        dist = np.sqrt((x - p0[0] - t * d[0]) ** 2 + (y - p0[1] - t * d[1]) ** 2 + (z - p0[2] - t * d[2]) ** 2)
        r = ra + (rb - ra) * t
        o = np.clip(0.5 + (r - dist) / w, 0.0, 1.0).astype(np.float32)
        np.maximum(occ[tuple(sl)], o, out=occ[tuple(sl)])


def _territory(rng, grid: _Grid, mask: np.ndarray, n: int = 2500) -> np.ndarray:
    idx = np.argwhere(mask)
    pick = idx[rng.choice(len(idx), size=min(n, len(idx)), replace=False)]
    jitter = rng.uniform(-0.5, 0.5, pick.shape)
    return (pick + jitter) @ np.diag(np.diag(grid.affine)[:3]).T + grid.affine[:3, 3]


# ----------------------------------------------------------------------------------------------
# one subject
# ----------------------------------------------------------------------------------------------


@dataclass
class LungSubject:
    image: np.ndarray  # int16 HU
    mask: np.ndarray  # uint8, 1 = right lung, 2 = left lung
    label: np.ndarray  # uint8 lesion mask
    affine: np.ndarray  # voxel -> world (RAS mm)
    lesion_volumes_mm3: list[float]
    lesion_hu: list[float]
    lung_volumes_ml: dict[str, float]


def _place_lesions(rng, lungs: dict, grid: _Grid, lesion_volume, lesions_per_subject, max_fraction):
    """Grow the lesions of an abnormal subject; returns the label, per-lesion flat indices and volumes."""
    voxel_mm3 = float(np.prod(grid.spacing))
    lo_n, hi_n = lesions_per_subject
    n = int(rng.integers(lo_n, hi_n + 1))
    v_lo, v_hi = (float(v) for v in lesion_volume)
    sides = list(lungs)
    lung_vox = np.array([lungs[k].sum() for k in sides], float)
    edts = {}
    label = np.zeros(grid.shape, bool)
    out = []
    for _ in range(n):
        side = sides[int(rng.choice(len(sides), p=lung_vox / lung_vox.sum()))]
        mask = lungs[side]
        vol = float(np.exp(rng.uniform(np.log(v_lo), np.log(v_hi))))
        vol = min(vol, max_fraction * mask.sum() * voxel_mm3)
        nvox = max(1, round(vol / voxel_mm3))
        r = (3 * nvox * voxel_mm3 / (4 * math.pi)) ** (1 / 3)
        if side not in edts:
            edts[side] = ndimage.distance_transform_edt(mask, sampling=grid.spacing)
        edt = edts[side]
        free = mask & ~ndimage.binary_dilation(label, np.ones((3, 3, 3), bool), iterations=2)
        juxtapleural = rng.random() < 0.25
        depth = 0.3 * r if juxtapleural else min(0.9 * r + 1.0, 0.8 * float(edt.max()))
        cand = np.argwhere(free & (edt >= depth))
        if len(cand) == 0:
            cand = np.argwhere(free)
        if len(cand) == 0:
            continue
        seed = cand[rng.integers(len(cand))]
        half = np.ceil(2.5 * r / grid.spacing).astype(int) + 2
        lo = np.maximum(seed - half, 0)
        hi = np.minimum(seed + half + 1, grid.shape)
        sl = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        axes = [(np.arange(a, b) - c) * sp for a, b, c, sp in zip(lo, hi, seed, grid.spacing, strict=True)]
        ax = rng.uniform([1.0, 0.6, 0.5], [1.0, 1.0, 1.0])
        ax = ax / np.prod(ax) ** (1 / 3)
        rot = np.linalg.qr(rng.standard_normal((3, 3)))[0]
        local = np.stack(np.meshgrid(*axes, indexing="ij"), -1) @ rot
        rho2 = ((local / (r * ax)) ** 2).sum(-1)
        noise = ndimage.gaussian_filter(rng.standard_normal(rho2.shape), np.maximum(0.35 * r / grid.spacing, 0.5))
        field_ = 1.0 - rho2 + rng.uniform(0.2, 0.7) * noise / (noise.std() + 1e-8)
        allowed = free[sl]
        order = grow_region(field_, allowed, tuple(seed - lo), nvox)
        if order.size == 0:
            continue
        full = np.ravel_multi_index(tuple(np.add(np.unravel_index(order, rho2.shape), lo[:, None])), grid.shape)
        label.flat[full] = True
        out.append((full, order.size * voxel_mm3))
    return label, out


def _body_hu(an: _Anatomy, grid: _Grid, xb, yb, zb, rng_int, ribs: bool) -> tuple[np.ndarray, np.ndarray]:
    """HU of the body, outside in (fat, muscle wall, ribs, cavity, sternum, spine, aorta, heart; air
    outside), and the body mask ``[X, Y, Z]``."""
    s, shape = an.s, grid.shape
    ell = (xb / an.A) ** 2 + (yb / (an.B * np.where(yb < 0, 0.92, 1.0))) ** 2  # [X, Y, 1]
    depth = (1.0 - np.sqrt(ell)) * min(an.A, an.B)  # approximate depth below the skin (mm)
    body = np.broadcast_to(ell <= 1.0, shape)
    hu = np.full(shape, AIR_HU, np.float32)
    fat_hu, muscle_hu, soft_hu = rng_int.uniform(-115, -85), rng_int.uniform(35, 55), rng_int.uniform(30, 50)
    hu[body] = fat_hu
    muscle = np.broadcast_to(depth > an.fat, shape)
    hu[muscle] = muscle_hu
    if ribs:
        ring = (depth > an.fat + an.wall) & (depth <= an.fat + an.wall + an.rib)
        phase = (zb + an.rib_slope * yb) / an.rib_period + an.rib_phase
        band = (phase - np.floor(phase)) < 0.4
        bone = ring & band & (np.abs(xb) > 0.25 * an.A)
        hu[bone] = rng_int.uniform(450, 800)
    cavity = np.broadcast_to(depth > an.fat + an.wall + an.rib, shape)
    hu[cavity] = soft_hu
    # sternum, spine (vertebral body + canal), aorta, heart
    hu[
        np.broadcast_to(
            (np.abs(xb) < 12 * s) & (depth > an.fat) & (depth < an.fat + an.wall + an.rib) & (yb > 0), shape
        )
    ] = 600.0
    r_sp = np.sqrt((xb - an.spine_c[0]) ** 2 + (yb - an.spine_c[1]) ** 2)
    hu[np.broadcast_to(r_sp <= an.spine_r, shape)] = rng_int.uniform(250, 350)
    hu[np.broadcast_to((r_sp <= an.spine_r) & (r_sp > 0.8 * an.spine_r), shape)] = 700.0
    canal = np.sqrt((xb - an.spine_c[0]) ** 2 + (yb - an.spine_c[1] + 1.4 * an.spine_r) ** 2) <= 0.45 * an.spine_r
    hu[np.broadcast_to(canal, shape)] = 20.0
    aorta = (xb - an.aorta_c[0]) ** 2 + (yb - an.aorta_c[1]) ** 2 <= an.aorta_r**2
    hu[np.broadcast_to(aorta, shape) & (zb < an.carina_z + 20 * s)] = rng_int.uniform(35, 60)
    heart = (
        ((xb - an.heart_c[0]) / an.heart_r[0]) ** 2
        + ((yb - an.heart_c[1]) / an.heart_r[1]) ** 2
        + ((zb - an.heart_c[2]) / an.heart_r[2]) ** 2
    ) <= 1.0
    hu[heart] = rng_int.uniform(35, 50)
    return hu, body


def _tree_occupancy(an: _Anatomy, grid: _Grid, lungs: dict, rng_anat, vessel_gen: int, airway_gen: int):
    """Partial-volume occupancy ``(vessels, airway walls, airway lumens)`` of the vessel and airway
    trees of both lungs, the trachea and the main bronchi."""
    s, shape = an.s, grid.shape
    vessel_occ = np.zeros(shape, np.float32)
    wall_occ = np.zeros(shape, np.float32)
    lumen_occ = np.zeros(shape, np.float32)
    trachea_top = np.array([0.0, an.spine_c[1] + an.spine_r + 2.2 * an.trachea_r, an.z_hi + 5.0])
    carina_b = np.array([0.0, trachea_top[1], an.carina_z])
    carina = _to_world(an, carina_b)[0]
    central = [(_to_world(an, trachea_top)[0], carina, an.trachea_r, an.trachea_r)]
    for side, L in an.lungs.items():  # noqa: N806
        mask = lungs[side]
        if not mask.any():
            continue
        hilum_b = np.array([L["sign"] * (an.gap + 6 * s), L["yc"] + 0.1 * an.Bc, L["z0"] + 0.55 * L["H"]])
        hilum = _to_world(an, hilum_b)[0]
        pts = _territory(rng_anat, grid, mask)
        segs = _grow_tree(rng_anat, hilum, pts, 6.0 * s, 0.35, vessel_gen)
        _draw_tubes(grid, vessel_occ, segs)
        bronchus_end = _to_world(an, hilum_b + np.array([0.0, 4 * s, 6 * s]))[0]
        central.append((carina, bronchus_end, 0.7 * an.trachea_r, 0.6 * an.trachea_r))
        asegs = _grow_tree(rng_anat, bronchus_end, pts, 0.55 * an.trachea_r, 0.5, airway_gen)
        _draw_tubes(grid, wall_occ, asegs, 1.35, 0.35)
        _draw_tubes(grid, lumen_occ, asegs)
    _draw_tubes(grid, wall_occ, central, 1.2, 0.5)
    _draw_tubes(grid, lumen_occ, central)
    return vessel_occ, wall_occ, lumen_occ


def _paint_lesions(hu: np.ndarray, label: np.ndarray, grown: list, lesion_hu, rng_les) -> list[float]:
    """Lesion tissue (a mean per lesion plus heterogeneity) replaces everything inside ``label``, in
    place in ``hu``; the edge is softened by blurring the label (weight) and the lesion value
    (normalised convolution). Returns the lesion means (HU)."""
    shape = hu.shape
    value = np.zeros(shape, np.float32)
    het = smooth_noise(rng_les, shape, 1.0)
    means = []
    for full, _ in grown:
        mean = float(rng_les.uniform(*lesion_hu))
        value.flat[full] = mean + 15.0 * het.flat[full]
        means.append(mean)
    weight = ndimage.gaussian_filter(label.astype(np.float32), 0.5)
    soft = weight > 1e-3
    value = ndimage.gaussian_filter(value, 0.5)[soft] / weight[soft]
    hu[soft] = hu[soft] * (1 - weight[soft]) + value * weight[soft]
    return means


@single_thread()
def generate_subject(
    index: int,
    *,
    abnormal: bool,
    seed: int = 0,
    scale: float = 0.4,
    spacing=(1.5, 1.5, 2.5),
    axcodes: str = "LPS",
    lesion_volume=(20.0, 20000.0),
    lesions_per_subject=(1, 3),
    lesion_hu=(-100.0, 100.0),
    max_lesion_fraction: float = 0.15,
    vessel_generations: int = 7,
    airway_generations: int = 4,
    noise_hu=(10.0, 25.0),
    ribs: bool = True,
    shift_mm: float = 10.0,
    rot_deg: float = 4.0,
    origin_mm: float = 40.0,
) -> LungSubject:
    """Synthesise one chest CT (see the module docstring). Deterministic for ``(seed, index)``."""
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    spacing = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,)).copy()
    rng_anat, rng_les, rng_int = np.random.default_rng([seed, index]).spawn(3)
    an = _draw_anatomy(rng_anat, float(scale), shift_mm, rot_deg, origin_mm, min_gap=1.1 * float(spacing.max()))
    grid = _make_grid(an, spacing, axcodes)
    x, y, z = grid.world([slice(None)] * 3)
    xb, yb, zb = _to_body(an, x, y, z)  # xb, yb: [X, Y, 1]; zb: [1, 1, Z]
    shape = grid.shape
    hu, body = _body_hu(an, grid, xb, yb, zb, rng_int, ribs)

    # lungs: parenchyma denser posteriorly (gravity), with fine texture
    lungs = _lung_masks(an, grid, xb, yb, zb, rng_anat)
    both = lungs["right"] | lungs["left"]
    par_mean = rng_int.uniform(-880, -820)
    gravity = np.clip((-yb / an.Bc), -1.0, 1.0) * rng_int.uniform(20, 45)
    par = par_mean + gravity + rng_int.uniform(15, 30) * smooth_noise(rng_int, shape, 0.8)
    hu = np.where(both, par, hu).astype(np.float32)

    # vessels (inside the lungs), airway walls, air in the lumens (inside the body)
    vessel_occ, wall_occ, lumen_occ = _tree_occupancy(an, grid, lungs, rng_anat, vessel_generations, airway_generations)
    vessel_hu = rng_int.uniform(30, 120)
    v = np.where(both, vessel_occ, 0.0)
    hu = hu * (1 - v) + vessel_hu * v
    wall_hu = rng_int.uniform(-50, 30)
    hu = hu * (1 - wall_occ) + wall_hu * wall_occ
    lumen_in = np.where(body, lumen_occ, 0.0)
    hu = hu * (1 - lumen_in) + (AIR_HU + 20) * lumen_in

    label = np.zeros(shape, bool)
    volumes: list[float] = []
    lesion_means: list[float] = []
    if abnormal:
        label, grown = _place_lesions(rng_les, lungs, grid, lesion_volume, lesions_per_subject, max_lesion_fraction)
        volumes = [vol for _, vol in grown]
        lesion_means = _paint_lesions(hu, label, grown, lesion_hu, rng_les)

    # acquisition: PSF blur, correlated noise, int16
    hu = ndimage.gaussian_filter(hu, 0.6)
    sigma = rng_int.uniform(*noise_hu)
    hu = hu + sigma * smooth_noise(rng_int, shape, 0.7)
    image = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    mask = np.zeros(shape, np.uint8)
    mask[lungs["right"]] = RIGHT_LABEL
    mask[lungs["left"]] = LEFT_LABEL
    voxel_ml = float(np.prod(grid.spacing)) / 1000.0
    return LungSubject(
        image=image,
        mask=mask,
        label=label.astype(np.uint8),
        affine=grid.affine,
        lesion_volumes_mm3=volumes,
        lesion_hu=lesion_means,
        lung_volumes_ml={k: float(m.sum()) * voxel_ml for k, m in lungs.items()},
    )


# ----------------------------------------------------------------------------------------------
# cohort
# ----------------------------------------------------------------------------------------------


def cohort_layout(n_normal: int, n_abnormal: int, seed: int) -> np.ndarray:
    """Which subject indices of a cohort are abnormal (shuffled, so the order carries no signal)."""
    return shuffled_abnormal(n_normal, n_abnormal, seed, COHORT_STREAM)


def _write_subject(job) -> dict:
    """Generate subject ``i`` and write its three files into ``tmp``; returns its cohort.csv row."""
    i, is_abn, tmp, mask_format, kw = job
    s = generate_subject(i, abnormal=is_abn, **kw)
    mask = (s.mask > 0).astype(np.uint8) if mask_format == "binary" else s.mask
    name = write_subject_files(tmp, i, s.affine, s.image, s.label, mask, SCANNER_XFORM)
    return subject_row(
        name,
        is_abn,
        s.lesion_volumes_mm3,
        lesion_hu=";".join(f"{v:.0f}" for v in s.lesion_hu),
        right_lung_ml=f"{s.lung_volumes_ml['right']:.1f}",
        left_lung_ml=f"{s.lung_volumes_ml['left']:.1f}",
        shape="x".join(str(n) for n in s.image.shape),
        mask_format=mask_format,
    )


def _describe(row: dict) -> str:
    return f"{row['shape']:>11s}  lungs R/L {row['right_lung_ml']}/{row['left_lung_ml']} ml"


def generate_cohort(
    out_dir,
    n_normal: int = 20,
    n_abnormal: int = 12,
    seed: int = 0,
    scale: float = 0.4,
    spacing=(1.5, 1.5, 2.5),
    *,
    mask_format: str = "labels",
    overwrite: bool = False,
    verbose: bool = False,
    workers: int = 1,
    **subject_kw,
) -> Path:
    """Write a synthetic chest-CT cohort to ``out_dir`` and return its path.

    Layout (as the brain cohort): ``images/sub-XXXX.nii.gz`` (int16 HU), ``labels/`` (uint8 lesion
    masks, all zero for normals), ``masks/`` (uint8 lung masks: 1 = right, 2 = left, or 0/1 with
    ``mask_format="binary"``) and ``cohort.csv`` with columns ``image,label,mask,abnormal,n_lesions,
    lesion_volumes_mm3,lesion_hu,right_lung_ml,left_lung_ml,shape,mask_format`` (relative paths, values
    ``;``-separated). Every subject has its own grid and affine (not registered).

    ``scale``: anatomy size (1.0 = adult); ``spacing``: voxel size (mm, x y z); ``subject_kw`` go to
    :func:`generate_subject` (``axcodes``, ``lesion_volume``, ``lesions_per_subject``, ``lesion_hu``,
    ``max_lesion_fraction``, ``vessel_generations``, ``airway_generations``, ``noise_hu``, ``ribs``,
    ``shift_mm``, ``rot_deg``, ``origin_mm``). Written atomically by
    :func:`scripts.synthetic.common.write_cohort`: an existing non-empty ``out_dir`` is an error unless
    ``overwrite``. ``workers > 1`` generates subjects in that many processes (same result).
    """
    if mask_format not in MASK_FORMATS:
        raise ValueError(f"mask_format must be one of {MASK_FORMATS}, got {mask_format!r}")
    check_counts(n_normal, n_abnormal)
    abnormal = cohort_layout(n_normal, n_abnormal, seed)
    kw = dict(seed=seed, scale=float(scale), spacing=tuple(np.broadcast_to(np.asarray(spacing, float), (3,))))
    kw.update(subject_kw)
    return write_cohort(
        out_dir,
        lambda tmp: [(i, bool(a), tmp, mask_format, kw) for i, a in enumerate(abnormal)],
        _write_subject,
        _describe,
        workers=workers,
        overwrite=overwrite,
        verbose=verbose,
    )


def ensure_cohort(out_dir, **kwargs) -> Path:
    """``out_dir`` if it holds a cohort (``cohort.csv``), else ``generate_cohort(out_dir, **kwargs)``."""
    return common.ensure_cohort(out_dir, generate_cohort, **kwargs)


def summarize_cohort(cohort_dir) -> dict:
    """Counts, lesion size classes (Sec. 4.5), lung volumes, grid shapes and spacing of a written cohort."""
    import nibabel as nib

    cohort_dir = Path(cohort_dir)
    rows = read_cohort(cohort_dir)
    first = nib.load(str(cohort_dir / rows[0]["image"]))
    lungs = [float(r[k]) for r in rows for k in ("right_lung_ml", "left_lung_ml")]
    return {
        **cohort_counts(rows),
        "lung_ml": (min(lungs), max(lungs)),
        "shapes": sorted({r["shape"] for r in rows}),
        "spacing_mm": tuple(float(z) for z in first.header.get_zooms()[:3]),
        "orientation": "".join(nib.aff2axcodes(first.affine)),
    }


def save_preview(cohort_dir, png, n_each: int = 3) -> Path:
    """Three orthogonal slices (lung window, RAS display) of ``n_each`` normal and abnormal subjects,
    through the largest lesion for abnormal ones; lung contours in blue, lesion contours in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nibabel as nib

    cohort_dir = Path(cohort_dir)
    pick = preview_rows(read_cohort(cohort_dir), n_each)
    fig, axes = plt.subplots(len(pick), 3, figsize=(9, 2.8 * len(pick)), squeeze=False)
    for row, ax in zip(pick, axes, strict=True):
        imgs = [nib.as_closest_canonical(nib.load(str(cohort_dir / row[k]))) for k in ("image", "mask", "label")]
        img, lung, lab = (np.asarray(i.dataobj) for i in imgs)
        zooms = imgs[0].header.get_zooms()[:3]
        centre = largest_lesion_centre(lab)
        views = [
            (img[centre[0]], lung[centre[0]], lab[centre[0]], zooms[2] / zooms[1]),
            (img[:, centre[1]], lung[:, centre[1]], lab[:, centre[1]], zooms[2] / zooms[0]),
            (img[:, :, centre[2]], lung[:, :, centre[2]], lab[:, :, centre[2]], zooms[1] / zooms[0]),
        ]
        for a, (im, lg, lb, aspect), title in zip(ax, views, ("sagittal", "coronal", "axial"), strict=True):
            a.imshow(im.T, cmap="gray", origin="lower", vmin=-1100, vmax=300, aspect=aspect, interpolation="nearest")
            for value, colour in ((RIGHT_LABEL, "c"), (LEFT_LABEL, "b")):
                if (lg == value).any():
                    a.contour((lg == value).T.astype(float), levels=[0.5], colors=colour, linewidths=0.6)
            if lb.any():
                a.contour((lb > 0).T.astype(float), levels=[0.5], colors="r", linewidths=0.8)
            a.set_xticks([])
            a.set_yticks([])
            a.set_title(f"{Path(row['image']).name[:8]} {title}", fontsize=7)
        kind = f"abnormal ({row['n_lesions']} lesions)" if row["abnormal"] == "1" else "normal"
        ax[0].set_ylabel(kind, fontsize=7)
    return save_figure(fig, png)
