"""Templates (:func:`load_template`), SimpleITK affine registration (:func:`estimate_affine`) and its quality
(:func:`registration_quality`) behind :mod:`scripts.transforms.registration`. SimpleITK's physical space
is the NIfTI world (RAS mm) of both images.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from scripts.errors import CS3FInputError

__all__ = [
    "MNI152_GRID",
    "REGISTER_CHOICES",
    "Template",
    "estimate_affine",
    "foreground",
    "load_template",
    "registration_quality",
    "resample_to",
]

REGISTER_CHOICES = ("none", "mni152", "template:PATH[,MASK]")
#: the ``mni152`` template grid: (shape, spacing mm, centre in MNI mm), the synthetic demo's grid
MNI152_GRID = ((96, 96, 96), 2.0, (0.0, -17.0, 6.0))


@dataclass(frozen=True)
class Template:
    """A template: image and brain mask ``[X, Y, Z]`` on one grid, voxel -> world ``affine`` [4, 4]."""

    name: str
    image: np.ndarray
    mask: np.ndarray
    affine: np.ndarray

    @property
    def spacing(self) -> float:
        return float(np.linalg.norm(self.affine[:3, :3], axis=0).min())

    def region(self, margin_mm: float) -> np.ndarray:
        """The mask dilated by ``margin_mm`` (at least one voxel): where the metric is evaluated."""
        return ndimage.binary_dilation(self.mask, iterations=max(1, round(margin_mm / self.spacing)))

    def digest(self) -> str:
        h = hashlib.sha256()
        for array in (self.image.astype(np.float32), self.mask.astype(np.uint8), self.affine.astype(np.float64)):
            h.update(repr(array.shape).encode() + np.ascontiguousarray(array).tobytes())
        return h.hexdigest()


def resample_to(data: np.ndarray, affine: np.ndarray, shape, out_affine: np.ndarray, order: int) -> np.ndarray:
    """``data`` (voxel -> world ``affine``) sampled on the grid ``(shape, out_affine)``; 0 outside."""
    matrix = np.linalg.inv(affine) @ out_affine
    return ndimage.affine_transform(data, matrix[:3, :3], matrix[:3, 3], output_shape=shape, order=order)


def _grid_affine(shape, spacing: float, centre) -> np.ndarray:
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = np.asarray(centre) - spacing * (np.asarray(shape) - 1) / 2.0
    return affine


@functools.lru_cache(maxsize=4)
def load_template(spec: str) -> Template | None:
    """The template of a ``register`` value (``None`` for ``"none"``); :class:`CS3FInputError` if bad."""
    import nibabel as nib

    spec = str(spec).strip()
    if spec.lower() == "none":
        return None
    if spec.lower() == "mni152":
        try:
            from nilearn import datasets
        except ImportError as err:
            raise CS3FInputError(f"register mni152 needs nilearn (pip install nilearn): {err}") from None
        image_nii = datasets.load_mni152_template(resolution=1)
        mask_nii = datasets.load_mni152_brain_mask(resolution=1)
        shape, spacing, centre = MNI152_GRID
        affine = _grid_affine(shape, spacing, centre)
        # anti-aliased from 1 mm to 2 mm, then trilinear
        image = ndimage.gaussian_filter(np.asarray(image_nii.dataobj, np.float32), 0.7)
        image = resample_to(image, image_nii.affine, shape, affine, 1)
        mask = resample_to(np.asarray(mask_nii.dataobj, np.float32), mask_nii.affine, shape, affine, 1) > 0.5
        return Template("mni152", image.astype(np.float32), mask, affine)
    if not spec.startswith("template:") or len(spec) == len("template:"):
        raise CS3FInputError(f"register must be one of {list(REGISTER_CHOICES)}, got {spec!r}")
    paths = spec[len("template:") :].split(",")
    if len(paths) > 2:
        raise CS3FInputError(f"register template:PATH[,MASK] takes at most two files, got {spec!r}")
    try:
        image_nii = nib.as_closest_canonical(nib.load(paths[0]))
        image = np.asarray(image_nii.dataobj, np.float32).squeeze()
        if len(paths) == 2:
            mask_nii = nib.as_closest_canonical(nib.load(paths[1]))
            mask_data = np.asarray(mask_nii.dataobj, np.float32).squeeze()
            mask = resample_to(mask_data, mask_nii.affine, image.shape, image_nii.affine, 0) > 0
        else:
            mask = image > 0
    except Exception as err:  # nibabel raises several types
        raise CS3FInputError(f"cannot read register template {spec!r}: {' '.join(str(err).split())}") from None
    if image.ndim != 3 or not mask.any():
        raise CS3FInputError(f"register template {spec!r} must be one 3D image with a non-empty mask")
    return Template(Path(paths[0]).name, image, mask, np.asarray(image_nii.affine, np.float64))


def _sitk():
    try:
        import SimpleITK as sitk  # noqa: N813 - the library's own spelling
    except ImportError as err:
        raise CS3FInputError(f"registration needs SimpleITK (pip install SimpleITK==2.5.7): {err}") from None
    # ITK's own filters on one thread: their multi-threaded sums change in the last bits from run to run
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    return sitk


def _to_sitk(array: np.ndarray, affine: np.ndarray, pixel=None):
    """A SimpleITK image of ``array [X, Y, Z]`` whose physical space is the NIfTI world (RAS mm)."""
    sitk = _sitk()
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array, (2, 1, 0))))
    if pixel is not None:
        image = sitk.Cast(image, pixel)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(v) for v in affine[:3, 3]])
    image.SetDirection([float(v) for v in (affine[:3, :3] / spacing).ravel()])
    return image


def _matrix(transform) -> np.ndarray:
    """4 x 4 matrix of a SimpleITK matrix-offset transform (``x -> A (x - c) + c + t``)."""
    a = np.asarray(transform.GetMatrix(), np.float64).reshape(3, 3)
    c = np.asarray(transform.GetCenter(), np.float64)
    t = np.asarray(transform.GetTranslation(), np.float64)
    out = np.eye(4)
    out[:3, :3], out[:3, 3] = a, c + t - a @ c
    return out


def _method(sitk, shrink, sigmas_mm, iterations: int, sampling: float, seed: int, threads: int):
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(sampling, seed + 1)  # SimpleITK's seed 0 is the wall clock
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(
        2.0, 1e-3, iterations, relaxationFactor=0.6, gradientMagnitudeTolerance=1e-6
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(list(shrink))
    reg.SetSmoothingSigmasPerLevel(list(sigmas_mm))
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetNumberOfThreads(int(threads))
    return reg


def _coarsen(sitk, image, spacing: float):
    """``image`` anti-aliased and resampled to voxels of about ``spacing`` mm where its own are finer."""
    own = np.asarray(image.GetSpacing())
    if np.all(own >= 0.75 * spacing):
        return image
    new = np.maximum(own, spacing)
    sigma = [float(max(0.5 * np.sqrt(max(n * n - o * o, 0.0)), 0.01)) for n, o in zip(new, own, strict=True)]
    smooth = sitk.SmoothingRecursiveGaussian(image, sigma) if max(sigma) > 0 else image
    size = [int(np.ceil(n * o / w)) for n, o, w in zip(image.GetSize(), own, new, strict=True)]
    spacing_new = [float(v) for v in new]
    resample = (sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), spacing_new, image.GetDirection(), 0.0)
    return sitk.Resample(smooth, size, *resample, sitk.sitkFloat32)


def estimate_affine(
    image: np.ndarray,
    affine: np.ndarray,
    template: Template,
    iterations: int = 100,
    sampling: float = 0.2,
    seed: int = 0,
    mask_margin_mm: float = 6.0,
    threads: int = 1,
) -> tuple[np.ndarray, float]:
    """The affine ``T`` [4, 4] (template world -> image world) maximising Mattes mutual information, and the
    final metric: rigid (from the centres of mass) at 8 and 4 mm, then full affine at 8, 4 and 2 mm; the
    metric is sampled (``sampling``, seeded) inside the template mask dilated by ``mask_margin_mm``. Only one
    ``threads`` gives the same result from run to run.
    """
    sitk = _sitk()
    fixed = _to_sitk(template.image.astype(np.float32), template.affine, sitk.sitkFloat32)
    moving = _to_sitk(np.asarray(image, np.float32), affine, sitk.sitkFloat32)
    spacing = template.spacing
    moving = _coarsen(sitk, moving, spacing)
    fixed_mask = _to_sitk(template.region(mask_margin_mm).astype(np.uint8), template.affine, sitk.sitkUInt8)
    rigid = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS
    )
    levels = [s for s in (4, 2, 1) if s * spacing <= 8.0] or [1]
    reg = _method(sitk, levels[:2], [2.0 * s * spacing / 2 for s in levels[:2]], iterations, sampling, seed, threads)
    reg.SetMetricFixedMask(fixed_mask)
    reg.SetInitialTransform(rigid, inPlace=True)
    reg.Execute(fixed, moving)
    full = sitk.AffineTransform(3)
    full.SetCenter(rigid.GetCenter())
    full.SetMatrix(rigid.GetMatrix())
    full.SetTranslation(rigid.GetTranslation())
    reg = _method(sitk, levels, [s * spacing / 2 for s in levels[:-1]] + [0.0], iterations, sampling, seed, threads)
    reg.SetMetricFixedMask(fixed_mask)
    reg.SetInitialTransform(full, inPlace=True)
    reg.Execute(fixed, moving)
    return _matrix(full), float(reg.GetMetricValue())


def _metric(template_image: np.ndarray, moved: np.ndarray, region: np.ndarray, affine: np.ndarray) -> float:
    """Mattes mutual information (SimpleITK's value, lower is better) of two images on one grid in ``region``."""
    sitk = _sitk()
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.NONE)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetMetricFixedMask(_to_sitk(region.astype(np.uint8), affine, sitk.sitkUInt8))
    reg.SetInitialTransform(sitk.TranslationTransform(3))
    fixed = _to_sitk(template_image.astype(np.float32), affine, sitk.sitkFloat32)
    return float(reg.MetricEvaluate(fixed, _to_sitk(moved.astype(np.float32), affine, sitk.sitkFloat32)))


def foreground(moved: np.ndarray) -> np.ndarray:
    """The volume's own foreground: above a tenth of its smoothed robust range, holes filled."""
    smooth = ndimage.gaussian_filter(moved.astype(np.float32), 1.0)
    low, high = np.percentile(smooth, [1.0, 99.5])
    if high <= low:
        return np.zeros(moved.shape, bool)
    return ndimage.binary_fill_holes(smooth > low + 0.1 * (high - low))


def _mirror(template: Template) -> np.ndarray:
    """The template image mirrored about its world plane x = 0 (left <-> right), on its own grid."""
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    return resample_to(template.image, template.affine, template.image.shape, flip @ template.affine, 1)


def registration_quality(moved: np.ndarray, template: Template, transform: np.ndarray, mask_margin_mm: float) -> dict:
    """Quality of a registration from the volume on the template grid (``moved``): the metric against the
    template and its mirror image, the template mask's ``coverage`` by the foreground, their Dice, and the
    affine's singular values (``scales``)."""
    region = template.region(mask_margin_mm)
    metric = _metric(template.image, moved, region, template.affine)
    mirrored = _metric(_mirror(template), moved, region, template.affine)
    fg = foreground(moved)
    inside = float((fg & template.mask).sum())
    return {
        "metric": round(metric, 5),
        "mirror_gain": round(metric - mirrored, 5),
        "coverage": round(inside / max(1.0, float(template.mask.sum())), 4),
        "foreground_dice": round(2 * inside / max(1.0, float(fg.sum() + template.mask.sum())), 4),
        "scales": [round(float(s), 4) for s in np.linalg.svd(transform[:3, :3], compute_uv=False)],
    }
