"""Classical lung segmentation of chest CT in HU (1 = right lung, 2 = left, the lungmask convention):

1. body: the largest component above ``body_hu``, its holes filled slice by slice along the axial axis;
2. air inside the body: below ``air_hu``;
3. airways: the air eroded by ``airway_mm`` (a ball); the two largest eroded components are the lungs,
   each grown back inside the air to ``airway_mm + 1 voxel`` from its core (trachea and bronchi stay out);
4. holes: each lung closed by ``closing_mm`` and filled slice by slice and in 3D;
5. sides: the lung whose centroid has the larger world x (RAS) is the right lung;
6. margin: each lung grown by ``margin_mm`` inside the body (a voxel within reach of both goes to the
   nearer), so that a mass on the pleura, which the air threshold cuts off, is still inside the mask and
   scored; ``margin_mm`` 0 gives the lungs alone.

Two lungs of at least ``min_component_ml`` each, or one :class:`~scripts.errors.CS3FInputError`.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from monai.utils import TransformBackends
from scipy import ndimage
from scripts.errors import CS3FInputError

__all__ = ["LUNG_MASKS_VERSION", "MARGIN_MM", "LungMasksd", "segment_lungs"]

#: version of :func:`segment_lungs`; with its parameters, the ``made_by`` record of the masks it makes
LUNG_MASKS_VERSION = 1
#: default of ``margin_mm``: how far each lung reaches past its air into the pleura and chest wall
MARGIN_MM = 10.0


def _ball(radius_mm: float, spacing: np.ndarray) -> np.ndarray:
    r = np.maximum(np.floor(radius_mm / spacing), 0).astype(int)
    grid = np.meshgrid(*[np.arange(-n, n + 1) * s for n, s in zip(r, spacing, strict=True)], indexing="ij")
    return sum(g**2 for g in grid) <= radius_mm**2 + 1e-6


def _fill_slices(mask: np.ndarray, axis: int) -> np.ndarray:
    out = np.moveaxis(mask.copy(), axis, 0)
    for i in range(out.shape[0]):
        if out[i].any():
            out[i] = ndimage.binary_fill_holes(out[i])
    return np.moveaxis(out, 0, axis)


def segment_lungs(
    image: np.ndarray,
    affine: np.ndarray,
    body_hu: float = -500.0,
    air_hu: float = -400.0,
    airway_mm: float = 4.0,
    closing_mm: float = 15.0,
    min_component_ml: float = 10.0,
    margin_mm: float = MARGIN_MM,
    name: str = "",
) -> np.ndarray:
    """Lung labels ``[X, Y, Z]`` uint8 of a CT ``image [X, Y, Z]`` in HU with voxel -> world ``affine``."""
    where = f"{name}: " if name else ""
    image = np.asarray(image, np.float32)
    affine = np.asarray(affine, np.float64)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    axial = int(np.argmax(np.abs(affine[2, :3]) / spacing))
    body, n = ndimage.label(image > body_hu)
    if n == 0:
        raise CS3FInputError(f"{where}no body found (no voxel above {body_hu} HU): not a CT in Hounsfield units?")
    body = body == 1 + int(np.argmax(np.bincount(body.ravel())[1:]))
    inside = _fill_slices(body, axial)
    air = (image < air_hu) & inside & ~body
    cores = ndimage.binary_erosion(air, _ball(airway_mm, spacing))
    lab, n = ndimage.label(cores)
    sizes = np.bincount(lab.ravel())[1:]
    order = np.argsort(sizes)[::-1][:2]
    reach = airway_mm + float(spacing.max())
    lungs = []
    for index in order:
        near = ndimage.distance_transform_edt(lab != index + 1, sampling=spacing) <= reach
        lung = air & near
        lung = ndimage.binary_closing(lung, _ball(closing_mm, spacing), iterations=1) | lung
        lungs.append(ndimage.binary_fill_holes(_fill_slices(lung, axial)))
    volumes = [float(lung.sum()) * voxel_ml for lung in lungs]
    if len(lungs) < 2 or min(volumes) < min_component_ml:
        raise CS3FInputError(
            f"{where}automatic lung segmentation found {n} air region(s) inside the body "
            f"(lungs of {', '.join(f'{v:.0f} ml' for v in volumes) or 'none'}), not two lungs of at least "
            f"{min_component_ml:g} ml: give lung masks"
        )
    centroids = [np.argwhere(lung).mean(0) @ affine[0, :3] + affine[0, 3] for lung in lungs]
    right, left = (lungs[0], lungs[1]) if centroids[0] > centroids[1] else (lungs[1], lungs[0])
    return _grown(right & ~left, left, inside, margin_mm, spacing)


def _grown(
    right: np.ndarray, left: np.ndarray, inside: np.ndarray, margin_mm: float, spacing: np.ndarray
) -> np.ndarray:
    """Labels (1 right, 2 left) of the two lungs, each grown by ``margin_mm`` within ``inside``."""
    out = np.zeros(right.shape, np.uint8)
    if margin_mm > 0:
        to_right = ndimage.distance_transform_edt(~right, sampling=spacing)
        to_left = ndimage.distance_transform_edt(~left, sampling=spacing)
        out[inside & (to_right <= margin_mm) & (to_right <= to_left)] = 1
        out[inside & (to_left <= margin_mm) & (to_left < to_right)] = 2
    out[right] = 1
    out[left] = 2
    return out


class LungMasksd(MapTransform):
    """Put an automatic lung mask (:func:`segment_lungs` with ``kwargs``) of the CT ``keys`` (HU, before any
    intensity scaling) under ``mask_key`` for items without one; it carries the image's metadata and
    ``meta["made_by"]`` (:meth:`made_by`), which :func:`scripts.engine.cached_tokens.source_digest` mixes into the
    volume's token cache key."""

    backend = [TransformBackends.NUMPY]
    makes_masks = True  # items without a mask get one: no "every voxel is foreground" warning

    def __init__(self, keys: KeysCollection = "image", mask_key: str = "mask", **kwargs) -> None:
        super().__init__(keys, allow_missing_keys=False)
        self.mask_key = mask_key
        self.kwargs = kwargs
        self.made_by()  # an unknown parameter fails here, not at the first volume

    def made_by(self) -> str:
        """Every parameter of :func:`segment_lungs` this transform uses (defaults filled in) and its version,
        as JSON (a method, not an attribute: the run's token identity describes the transform as given)."""
        try:
            bound = inspect.signature(segment_lungs).bind_partial(**self.kwargs)
        except TypeError as err:
            raise CS3FInputError(f"LungMasksd: {err}") from None
        bound.apply_defaults()
        used = {k: v for k, v in bound.arguments.items() if k != "name"}
        return json.dumps({"segment_lungs": LUNG_MASKS_VERSION, **used}, sort_keys=True)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        if d.get(self.mask_key) is not None:
            return d
        for key in self.key_iterator(d):
            image = d[key]
            affine = image.affine.numpy() if isinstance(image, MetaTensor) else np.eye(4)
            name = str(image.meta.get("filename_or_obj", "")) if isinstance(image, MetaTensor) else ""
            array = torch.as_tensor(image).detach().cpu().float().numpy()[0]
            labels = torch.from_numpy(segment_lungs(array, affine, name=name, **self.kwargs)[None])
            meta = {**image.meta, "made_by": self.made_by()} if isinstance(image, MetaTensor) else None
            d[self.mask_key] = MetaTensor(labels, meta=meta) if meta is not None else labels
        return d
