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

Modules: templates and output grid in ``brain_templates.py``, lesion plans, warps and lesion shapes in
``brain_lesions.py``, one subject and the cohort here. ``nilearn`` is imported (lazily) by the templates
only, never by the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from scripts.synthetic import cohort_files
from scripts.synthetic.brain_lesions import (
    LesionSpec,
    Warp,
    choose_centers,
    draw_lesions,
    draw_warp,
    lesion_defaults,
    lesion_plan,
    pullback,
    rasterize,
    subject_rngs,
)
from scripts.synthetic.brain_templates import BASES, COLIN27_PATH, BaseAnatomy, base_anatomy, output_geometry, sample_at
from scripts.synthetic.cohort_files import (
    check_counts,
    cohort_counts,
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

#: NIfTI qform/sform code of the written cohort: 4 = MNI152 (the subjects are registered)
MNI_XFORM = 4
#: ``np.random.default_rng([seed, COHORT_STREAM])`` shuffles which subjects are abnormal
COHORT_STREAM = 2**31 - 1

# ----------------------------------------------------------------------------------------------
# one subject
# ----------------------------------------------------------------------------------------------

TISSUE_MEANS = {  # (low, high) of per-subject tissue means, relative units
    "t1": {"gm": (0.58, 0.70), "wm": (0.95, 1.05), "csf": (0.18, 0.30)},
    "t2": {"gm": (0.52, 0.62), "wm": (0.36, 0.46), "csf": (0.95, 1.05)},
    # FLAIR-like: T2 weighting with the fluid signal nulled (dark CSF, grey matter above white matter)
    "flair": {"gm": (0.70, 0.80), "wm": (0.55, 0.65), "csf": (0.08, 0.15)},
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


def _subject_anatomy(geom, warp: Warp, b: BaseAnatomy, lesions: list[LesionSpec], rng_les):
    """Warp the template onto the output grid (lesion centres first: their mass effect is part of
    the warp). Returns the sampled maps ``[4, ...]``, the brain mask, the tissue fractions
    ``(gm, wm, csf)`` after cortical atrophy and the smallest Jacobian determinant of the map."""
    shape, spacing, affine = geom
    depth = None
    if lesions:
        # centres are chosen on every second voxel (cheap): tissue, away from the edge and each other
        pre = sample_at(b.maps, pullback(shape, affine, warp, b, stride=2), b.inv_affine).numpy()
        edt = choose_centers(lesions, pre[3] > 0.5, pre[0] + pre[1], pre[2], spacing * 2, rng_les)
        affine2 = affine.copy()
        affine2[:3, :3] *= 2
        depth = (torch.from_numpy(edt.astype(np.float32))[None, None], np.linalg.inv(affine2))
        for les in lesions:
            les.center = les.center * 2
    points, min_jacobian = pullback(shape, affine, warp, b, lesions, depth=depth)
    maps = sample_at(b.maps, points, b.inv_affine).numpy()
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
    """Grow the lesions (:func:`rasterize`) and paint them into ``img``; returns the image, the
    label and the lesion volumes (mm^3).

    Core: replaces the tissue (weight ``replacement``) by lesion tissue whose mean differs from the
    mean of the tissue it replaces by ``contrast``; rim: edema modulates the tissue (it follows the
    anatomy); necrosis: fluid. Edges are softened, the label stays binary.
    """
    shape = mask.shape
    label, parts, counts = rasterize(lesions, mask, np.where(mask, csf_raw, 1.0), spacing, rng_les)
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
        raise ValueError(f"contrast must be one of {tuple(TISSUE_MEANS)}, got {contrast!r}")
    if base not in BASES:
        raise ValueError(f"a subject's base is one of {BASES} ('both' is a cohort option), got {base!r}")
    geom = output_geometry(shape, fov_mm)
    shape, spacing, _ = geom
    b = base_anatomy(base, tuple(float(s) for s in spacing))
    rng_anat, rng_les, rng_int = subject_rngs(seed, index)
    warp = draw_warp(
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
        lesions = draw_lesions(rng_les, contrast=contrast, spacing=spacing, **lesion_defaults(**lesion_kw))
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
    ``noise``, ``blur``). Written atomically by :func:`scripts.synthetic.cohort_files.write_cohort`: an
    existing non-empty ``out_dir`` is an error unless ``overwrite``. ``workers > 1`` generates
    subjects in that many processes (same result: every subject has its own random stream), worth it
    for 224^3 grids.
    """
    contrast = str(contrast).lower()
    if contrast not in TISSUE_MEANS:
        raise ValueError(f"contrast must be one of {tuple(TISSUE_MEANS)}, got {contrast!r}")
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
    return cohort_files.ensure_cohort(out_dir, generate_cohort, **kwargs)


def summarize_cohort(cohort_dir) -> dict:
    """Counts, lesion size classes (Sec. 4.5), mean pairwise brain-mask Dice (NaN where the subjects' grids
    differ, as in a native-space cohort) and the first subject's voxel spacing of a written cohort."""
    import nibabel as nib

    cohort_dir = Path(cohort_dir)
    rows = read_cohort(cohort_dir)
    key = "mask" if "mask" in rows[0] else "brain_mask"  # native-space cohorts: masks are not inputs
    first = nib.load(str(cohort_dir / rows[0][key]))
    masks = [np.asarray(nib.load(str(cohort_dir / r[key])).dataobj) > 0 for r in rows]
    same_grid = len({m.shape for m in masks}) == 1
    return {
        **cohort_counts(rows),
        "mask_dice": mean_pairwise_dice(masks) if same_grid else float("nan"),
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
