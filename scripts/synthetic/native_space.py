"""Native-space brain cohorts: a registered synthetic cohort moved by known random transforms onto other
voxel grids, the way scans come off different scanners (registration demo, tests and benchmark).

Per subject (``np.random.default_rng([seed, NATIVE_STREAM, index])``):

* a motion ``A`` (registered world -> native world, about the demo grid's centre): rotations uniform in
  ``+-max_rot_deg`` about each axis, translations uniform in ``+-max_shift_mm``, a scale per axis
  uniform in ``scale`` (0.9-1.1);
* a native grid: ``spacing`` (default 1.2 x 1.2 x 2.0 mm, anisotropic), stored in ``axcodes``
  orientation (default LPS, as CT/MR converted from DICOM), whose field of view is the moved head's
  bounding box plus a random margin of ``margin_mm`` (so each subject has its own field of view);
* optionally (``skull=True``) a synthetic scalp and skull around the brain before the move: 2 mm of CSF,
  5 mm of dark bone and 5 mm of bright scalp fat, with texture; the background stays 0.

Images are resampled trilinearly, labels and brain masks nearest-neighbour. The cohort is
``images/ labels/ masks/ transforms/ cohort.csv``: ``cohort.csv`` lists ``image``, ``label``,
``brain_mask`` (the true brain mask on the native grid, *not* a ``mask`` column: the point of the
cohort is to run without masks), ``transform`` (``transforms/<name>.json``) and the registered cohort's
columns. Each JSON records ``motion`` (``A``), the subject's own anatomical affine ``subject_affine``
(registered world -> template world, the affine part of the synthetic warp: what an affine registration
to the template also undoes) and ``template_to_native`` = ``A @ inv(subject_affine)``, the affine an
ideal affine registration of the native image to the template finds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from scipy import ndimage
from scripts.synthetic.brain_lesions import draw_warp, subject_rngs
from scripts.synthetic.brain_templates import output_geometry
from scripts.synthetic.cohort_files import read_cohort, save_nifti, write_cohort

__all__ = ["NATIVE_STREAM", "move_cohort", "random_motion", "subject_affine"]

#: ``np.random.default_rng([seed, NATIVE_STREAM, index])`` draws a subject's motion and grid
NATIVE_STREAM = 7919
#: NIfTI qform/sform code of the native files: 1 = scanner
SCANNER_XFORM = 1


def random_motion(rng: np.random.Generator, centre, max_rot_deg: float, max_shift_mm: float, scale) -> np.ndarray:
    """A random affine ``[4, 4]`` (rotation, translation, per-axis scale) about ``centre`` (mm)."""
    a, b, c = np.deg2rad(rng.uniform(-max_rot_deg, max_rot_deg, 3))
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    matrix = rz @ ry @ rx @ np.diag(rng.uniform(scale[0], scale[1], 3))
    out = np.eye(4)
    out[:3, :3] = matrix
    out[:3, 3] = np.asarray(centre) - matrix @ np.asarray(centre) + rng.uniform(-max_shift_mm, max_shift_mm, 3)
    return out


def subject_affine(index: int, seed: int = 0, shape=96, fov_mm: float = 192.0, **anatomy_kw) -> np.ndarray:
    """The affine part ``[4, 4]`` (registered world -> template world) of subject ``index``'s synthetic warp
    (:func:`scripts.synthetic.brain_lesions.draw_warp` with the generator's defaults and ``anatomy_kw``)."""
    import inspect

    from scripts.synthetic.brain import generate_subject  # the defaults live there

    defaults = {
        k: p.default
        for k, p in inspect.signature(generate_subject).parameters.items()
        if k
        in (
            "affine_scale",
            "affine_rot_deg",
            "affine_shift_mm",
            "deform_mm",
            "deform_smooth_mm",
            "ventricle",
            "atrophy",
        )
    }
    defaults.update({k: v for k, v in anatomy_kw.items() if k in defaults})
    rng_anat, _, _ = subject_rngs(seed, index)
    warp = draw_warp(rng_anat, output_geometry(shape, fov_mm), **defaults)
    out = np.eye(4)
    out[:3, :3] = warp.matrix
    out[:3, 3] = warp.center + warp.shift - warp.matrix @ warp.center
    return out


def _skull(image: np.ndarray, mask: np.ndarray, spacing, rng: np.random.Generator) -> np.ndarray:
    """``image`` with a CSF rim, a skull and a scalp drawn around the brain ``mask`` (by distance in mm)."""
    dist = ndimage.distance_transform_edt(~mask, sampling=spacing)
    texture = 1.0 + 0.08 * ndimage.gaussian_filter(rng.standard_normal(mask.shape).astype(np.float32), 1.0) * 3
    out = image.copy()
    for lo, hi, value in ((0.0, 2.0, 0.2), (2.0, 7.0, 0.06), (7.0, 12.0, 0.75)):
        shell = (dist > lo) & (dist <= hi) & ~mask
        out[shell] = value * texture[shell]
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _axcodes_affine(affine: np.ndarray, shape, axcodes: str) -> tuple[np.ndarray, list[bool]]:
    """The affine of the same grid stored with the axes flipped to ``axcodes`` (only L/R, P/A, I/S flips
    of a RAS grid), and which axes are flipped."""
    flips = [code not in "RAS"[i] for i, code in enumerate(axcodes.upper())]
    out = affine.copy()
    for i, flip in enumerate(flips):
        if flip:
            out[:3, 3] += affine[:3, i] * (shape[i] - 1)
            out[:3, i] = -affine[:3, i]
    return out, flips


def _native_grid(rng, mask: np.ndarray, affine: np.ndarray, motion: np.ndarray, spacing, margin_mm, axcodes):
    """``(shape, affine)`` of a native grid holding the moved head (its bounding box + a random margin)."""
    idx = np.argwhere(mask)
    lo_hi = np.stack([idx.min(0), idx.max(0)])
    corners = np.array([[lo_hi[a, 0], lo_hi[b, 1], lo_hi[c, 2]] for a in (0, 1) for b in (0, 1) for c in (0, 1)], float)
    world = (motion @ affine @ np.c_[corners, np.ones(8)].T).T[:, :3]
    margin = rng.uniform(margin_mm[0], margin_mm[1], (2, 3))
    lo, hi = world.min(0) - margin[0], world.max(0) + margin[1]
    spacing = np.asarray(spacing, float)
    shape = tuple(int(n) for n in np.ceil((hi - lo) / spacing) + 1)
    grid = np.diag([*spacing, 1.0])
    grid[:3, 3] = lo
    grid, _ = _axcodes_affine(grid, shape, axcodes)
    return shape, grid


def _move_subject(job) -> dict:
    """Move one registered subject onto its native grid; write its files; returns its cohort.csv row."""
    row, src, tmp, index, opts = job
    import nibabel as nib

    name = Path(row["image"]).name
    stem = name.replace(".nii.gz", "")
    rng = np.random.default_rng([opts["seed"], NATIVE_STREAM, index])
    loaded = {k: nib.load(str(src / row[k])) for k in ("image", "label", "mask")}
    affine = loaded["image"].affine
    arrays = {k: np.asarray(v.dataobj) for k, v in loaded.items()}
    mask = arrays["mask"] > 0
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    image = arrays["image"].astype(np.float32)
    if opts["skull"]:
        image = _skull(image, mask, spacing, rng)
    head = image > 0
    centre = affine[:3, :3] @ ((np.asarray(mask.shape) - 1) / 2.0) + affine[:3, 3]
    motion = random_motion(rng, centre, opts["max_rot_deg"], opts["max_shift_mm"], opts["scale"])
    shape, grid = _native_grid(rng, head, affine, motion, opts["spacing"], opts["margin_mm"], opts["axcodes"])
    # native voxel -> registered voxel
    pull = np.linalg.inv(affine) @ np.linalg.inv(motion) @ grid
    out = {}
    for key, array, order in (("image", image, 1), ("label", arrays["label"], 0), ("mask", arrays["mask"], 0)):
        moved = ndimage.affine_transform(array, pull[:3, :3], pull[:3, 3], output_shape=shape, order=order)
        out[key] = moved.astype(np.float32 if key == "image" else np.uint8)
        folder = {"image": "images", "label": "labels", "mask": "masks"}[key]
        save_nifti(out[key], grid, tmp / folder / name, SCANNER_XFORM)
    anatomy = subject_affine(index, **opts["generator"])
    truth = {
        "motion": motion.tolist(),
        "subject_affine": anatomy.tolist(),
        "template_to_native": (motion @ np.linalg.inv(anatomy)).tolist(),
        "registered_image": str(src / row["image"]),
        "native_shape": list(shape),
        "native_affine": grid.tolist(),
    }
    (tmp / "transforms").mkdir(exist_ok=True)
    (tmp / "transforms" / f"{stem}.json").write_text(json.dumps(truth, indent=1))
    rest = {k: v for k, v in row.items() if k not in ("image", "label", "mask")}
    rest["abnormal"] = int(rest["abnormal"])
    return {
        "image": f"images/{name}",
        "label": f"labels/{name}",
        "brain_mask": f"masks/{name}",
        "transform": f"transforms/{stem}.json",
        **rest,
    }


def move_cohort(
    registered_dir: str | Path,
    out_dir: str | Path,
    seed: int = 0,
    *,
    max_rot_deg: float = 15.0,
    max_shift_mm: float = 20.0,
    scale=(0.9, 1.1),
    spacing=(1.2, 1.2, 2.0),
    margin_mm=(10.0, 30.0),
    axcodes: str = "LPS",
    skull: bool = False,
    generator: dict | None = None,
    overwrite: bool = False,
    verbose: bool = False,
) -> Path:
    """Write the native-space version of the registered cohort ``registered_dir`` to ``out_dir``.

    ``generator``: the arguments the registered cohort was generated with (``seed``, ``shape``,
    ``fov_mm`` and anatomy options), from which each subject's own anatomical affine is recomputed.
    See the module docstring for the rest.
    """
    src = Path(registered_dir)
    rows = read_cohort(src)
    opts = dict(
        seed=int(seed),
        max_rot_deg=float(max_rot_deg),
        max_shift_mm=float(max_shift_mm),
        scale=tuple(float(s) for s in scale),
        spacing=tuple(float(s) for s in spacing),
        margin_mm=tuple(float(m) for m in margin_mm),
        axcodes=str(axcodes),
        skull=bool(skull),
        generator=dict(generator or {"seed": int(seed)}),
    )

    def make_jobs(tmp: Path) -> list:
        return [(row, src, tmp, int(Path(row["image"]).name[4:8]) - 1, opts) for row in rows]

    def describe(row: dict) -> str:
        return "native"

    return write_cohort(out_dir, make_jobs, _move_subject, describe, overwrite=overwrite, verbose=verbose)
