"""Anatomy of the synthetic chest CTs: the scanner grid, per-subject body and lung shapes, the lung masks
and the vessel and airway trees grown into them (see :mod:`scripts.synthetic.lung`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scripts.synthetic.cohort_files import largest_component, smooth_field

__all__ = [
    "Anatomy",
    "Grid",
    "draw_anatomy",
    "draw_tubes",
    "grow_tree",
    "lung_masks",
    "make_grid",
    "territory",
    "to_body",
    "to_world",
]

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
class Grid:
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
class Anatomy:
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


def draw_anatomy(rng, s: float, shift_mm: float, rot_deg: float, origin_mm: float, min_gap: float) -> Anatomy:
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
    return Anatomy(
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


def make_grid(an: Anatomy, spacing, axcodes: str) -> Grid:
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
    return Grid(shape, spacing, affine, axes)


def to_body(an: Anatomy, x, y, z):
    """World -> body frame (rotation about z by -theta around ``shift``)."""
    c, s_ = math.cos(an.theta), math.sin(an.theta)
    dx, dy = x - an.shift[0], y - an.shift[1]
    return c * dx + s_ * dy, -s_ * dx + c * dy, z - an.shift[2]


def to_world(an: Anatomy, p: np.ndarray) -> np.ndarray:
    c, s_ = math.cos(an.theta), math.sin(an.theta)
    p = np.atleast_2d(p)
    x = c * p[:, 0] - s_ * p[:, 1] + an.shift[0]
    y = s_ * p[:, 0] + c * p[:, 1] + an.shift[1]
    return np.stack([x, y, p[:, 2] + an.shift[2]], 1)


# ----------------------------------------------------------------------------------------------
# lungs
# ----------------------------------------------------------------------------------------------


def lung_masks(an: Anatomy, grid: Grid, xb, yb, zb, rng) -> dict[str, np.ndarray]:
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


def grow_tree(rng, root: np.ndarray, points: np.ndarray, r0: float, min_r: float, max_gen: int, min_points: int = 6):
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


def draw_tubes(grid: Grid, occ: np.ndarray, segments, scale_r: float = 1.0, add_r: float = 0.0) -> None:
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


def territory(rng, grid: Grid, mask: np.ndarray, n: int = 2500) -> np.ndarray:
    idx = np.argwhere(mask)
    pick = idx[rng.choice(len(idx), size=min(n, len(idx)), replace=False)]
    jitter = rng.uniform(-0.5, 0.5, pick.shape)
    return (pick + jitter) @ np.diag(np.diag(grid.affine)[:3]).T + grid.affine[:3, 3]
