"""Synthetic chest-CT cohorts with left/right lung masks and exact lesion masks (lung demo and tests).

The lung experiment of the paper (Sec. 4.1 "Lung CT", 4.6) uses LIDC-IDRI and MSD Lung, which cannot
be downloaded here, so this module draws chest CTs procedurally, in the style of the brain generator
(:mod:`scripts.synthetic.brain`): one random stream per subject, ``np.random.default_rng([seed, index])``,
and the same atomic ``images/ labels/ masks/ cohort.csv`` cohort folder (:mod:`scripts.synthetic.cohort_files`).

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
from scripts.synthetic import cohort_files
from scripts.synthetic.cohort_files import (
    check_counts,
    cohort_counts,
    grow_region,
    largest_lesion_centre,
    preview_rows,
    read_cohort,
    save_figure,
    shuffled_abnormal,
    single_thread,
    smooth_noise,
    subject_row,
    write_cohort,
    write_subject_files,
)
from scripts.synthetic.lung_anatomy import (
    Anatomy,
    Grid,
    draw_anatomy,
    draw_tubes,
    grow_tree,
    lung_masks,
    make_grid,
    territory,
    to_body,
    to_world,
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


def _place_lesions(rng, lungs: dict, grid: Grid, lesion_volume, lesions_per_subject, max_fraction):
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


def _body_hu(an: Anatomy, grid: Grid, xb, yb, zb, rng_int, ribs: bool) -> tuple[np.ndarray, np.ndarray]:
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


def _tree_occupancy(an: Anatomy, grid: Grid, lungs: dict, rng_anat, vessel_gen: int, airway_gen: int):
    """Partial-volume occupancy ``(vessels, airway walls, airway lumens)`` of the vessel and airway
    trees of both lungs, the trachea and the main bronchi."""
    s, shape = an.s, grid.shape
    vessel_occ = np.zeros(shape, np.float32)
    wall_occ = np.zeros(shape, np.float32)
    lumen_occ = np.zeros(shape, np.float32)
    trachea_top = np.array([0.0, an.spine_c[1] + an.spine_r + 2.2 * an.trachea_r, an.z_hi + 5.0])
    carina_b = np.array([0.0, trachea_top[1], an.carina_z])
    carina = to_world(an, carina_b)[0]
    central = [(to_world(an, trachea_top)[0], carina, an.trachea_r, an.trachea_r)]
    for side, L in an.lungs.items():  # noqa: N806
        mask = lungs[side]
        if not mask.any():
            continue
        hilum_b = np.array([L["sign"] * (an.gap + 6 * s), L["yc"] + 0.1 * an.Bc, L["z0"] + 0.55 * L["H"]])
        hilum = to_world(an, hilum_b)[0]
        pts = territory(rng_anat, grid, mask)
        segs = grow_tree(rng_anat, hilum, pts, 6.0 * s, 0.35, vessel_gen)
        draw_tubes(grid, vessel_occ, segs)
        bronchus_end = to_world(an, hilum_b + np.array([0.0, 4 * s, 6 * s]))[0]
        central.append((carina, bronchus_end, 0.7 * an.trachea_r, 0.6 * an.trachea_r))
        asegs = grow_tree(rng_anat, bronchus_end, pts, 0.55 * an.trachea_r, 0.5, airway_gen)
        draw_tubes(grid, wall_occ, asegs, 1.35, 0.35)
        draw_tubes(grid, lumen_occ, asegs)
    draw_tubes(grid, wall_occ, central, 1.2, 0.5)
    draw_tubes(grid, lumen_occ, central)
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
    an = draw_anatomy(rng_anat, float(scale), shift_mm, rot_deg, origin_mm, min_gap=1.1 * float(spacing.max()))
    grid = make_grid(an, spacing, axcodes)
    x, y, z = grid.world([slice(None)] * 3)
    xb, yb, zb = to_body(an, x, y, z)  # xb, yb: [X, Y, 1]; zb: [1, 1, Z]
    shape = grid.shape
    hu, body = _body_hu(an, grid, xb, yb, zb, rng_int, ribs)

    # lungs: parenchyma denser posteriorly (gravity), with fine texture
    lungs = lung_masks(an, grid, xb, yb, zb, rng_anat)
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
    :func:`scripts.synthetic.cohort_files.write_cohort`: an existing non-empty ``out_dir`` is an error unless
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
    return cohort_files.ensure_cohort(out_dir, generate_cohort, **kwargs)


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
