"""Lung CT (paper Sec. 4.1, 4.2, 4.6): :class:`LungSplit` splits the lung mask (lungmask: 1 = right, 2 = left)
into the two lungs, :class:`LungCrop` crops each lung's box to a fixed size and pastes a crop's map back;
the engine (:class:`scripts.engine.lung_parts.LungParts`) scores each side against the same side of the others.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import Compose, MapTransform, ResizeWithPadOrCrop, SpatialCrop, Transform
from scipy import ndimage
from scripts.errors import CS3FInputError
from scripts.transforms.tokenization import AXES, axis_index

__all__ = [
    "CheckLungsd",
    "LEFT",
    "MASK_MODES",
    "PAPER_CROP_SIZE",
    "PAPER_Q",
    "RIGHT",
    "SIDES",
    "LungCrop",
    "LungCropd",
    "LungSplit",
    "MaskWithSourced",
    "check_crop_divisible",
]

RIGHT, LEFT = 1, 2  # lung mask labels (lungmask convention)
SIDES: tuple[str, str] = ("right", "left")
#: the paper's crop size (sagittal, coronal, axial) at 1 mm and its coarse pooling (Sec. 4.2, Table 2)
PAPER_CROP_SIZE: tuple[int, int, int] = (160, 238, 336)
PAPER_Q: tuple[int, int, int] = (8, 14, 14)
MASK_MODES = ("auto", "labels", "binary")


def _triple(value, name: str) -> tuple[int, int, int]:
    values = [int(value)] * 3 if isinstance(value, int | np.integer) else [int(v) for v in value]
    if len(values) != 3 or min(values) < 1:
        raise CS3FInputError(f"{name} must be one positive int or three (sagittal, coronal, axial), got {value}")
    return tuple(values)  # type: ignore[return-value]


def check_crop_divisible(crop_size: Sequence[int], q: int | Sequence[int], axes: Sequence[str | int] = AXES) -> None:
    """Raise :class:`CS3FInputError` unless the depth pooling ``q`` divides the crop size on every slicing axis."""
    size = _triple(crop_size, "crop_size")
    qs = _triple(q, "q")
    for axis in axes:
        i = axis_index(axis)
        if size[i] % qs[i]:
            multiple = -(-size[i] // qs[i]) * qs[i]
            raise CS3FInputError(
                f"lung crop size {size[i]} on the {AXES[i]} axis is not a multiple of q={qs[i]} "
                f"(crop_size {list(size)}, q {list(qs)}, both sagittal, coronal, axial): choose a crop size "
                f"that q divides on every axis (e.g. {multiple} instead of {size[i]}; the paper uses "
                f"crop_size {list(PAPER_CROP_SIZE)} with q {list(PAPER_Q)})"
            )


def label_values(value) -> tuple[int, ...]:
    return (int(value),) if isinstance(value, int | np.integer) else tuple(int(v) for v in value)


class LungSplit(Transform):
    """A lung mask ``[1, H, W, D]`` into ``{"right": mask, "left": mask}`` (bool, same shape).

    Args:
        mode: ``"labels"``: one label per lung (``labels``); ``"binary"``: the two largest components, the
            one with the larger world x (RAS) is the right lung; ``"auto"``: binary for a 0/1 mask.
        labels: ``(right, left)`` label values, each an int or a list of ints (e.g. lobe ids).
        min_fraction: in binary mode the second component must have at least this fraction of the
            first's voxels, else the lungs are merged (an error).

    Call: ``(mask, affine=None, name="")``; :class:`CS3FInputError` naming a missing lung, unexpected labels
    or merged lungs.
    """

    def __init__(self, mode: str = "auto", labels=(RIGHT, LEFT), min_fraction: float = 0.05) -> None:
        if mode not in MASK_MODES:
            raise CS3FInputError(f"lung mask mode must be one of {MASK_MODES}, got {mode!r}")
        labels = list(labels)
        if len(labels) != 2:
            raise CS3FInputError(f"lung_labels must be (right, left), each an int or a list, got {labels}")
        self.mode = mode
        self.labels = {side: label_values(v) for side, v in zip(SIDES, labels, strict=True)}
        if set(self.labels["right"]) & set(self.labels["left"]):
            raise CS3FInputError(f"lung_labels for the right and left lung overlap: {labels}")
        self.min_fraction = float(min_fraction)

    def __call__(self, mask: torch.Tensor, affine=None, name: str = "") -> dict[str, torch.Tensor]:
        where = f"{name}: " if name else ""
        if affine is None:
            affine = mask.affine if isinstance(mask, MetaTensor) else torch.eye(4)
        m = torch.as_tensor(mask).detach().cpu()
        if m.ndim == 3:
            m = m[None]
        values = torch.unique(m)
        values = values[values != 0]
        mode = self.mode
        if mode == "auto":
            mode = "binary" if values.numel() == 0 or bool((values == 1).all()) else "labels"
        if mode == "labels":
            allowed = torch.tensor(self.labels["right"] + self.labels["left"], dtype=values.dtype)
            extra = values[~torch.isin(values, allowed)]
            if extra.numel():
                raise CS3FInputError(
                    f"{where}lung mask has labels {extra.tolist()} besides the lung labels "
                    f"right={list(self.labels['right'])}, left={list(self.labels['left'])}: give a mask "
                    f"of the lungs only (lungmask: 1 = right, 2 = left) or set lung_labels"
                )
            out = {side: torch.isin(m, torch.tensor(self.labels[side], dtype=m.dtype)) for side in SIDES}
            for side in SIDES:
                if not bool(out[side].any()):
                    raise CS3FInputError(
                        f"{where}lung mask has no {side} lung (label {list(self.labels[side])}): both "
                        f"lungs are scored, each against the same lung of the other volumes"
                    )
            return out
        return self._components(m > 0, np.asarray(affine, dtype=np.float64), where)

    def _components(self, binary: torch.Tensor, affine: np.ndarray, where: str) -> dict[str, torch.Tensor]:
        lab, n = ndimage.label(binary[0].numpy())
        sizes = np.bincount(lab.ravel())[1:]
        if n < 2 or np.sort(sizes)[-2] < self.min_fraction * sizes.max():
            raise CS3FInputError(
                f"{where}binary lung mask has {n} connected component(s) of which not two are lungs "
                f"(sizes {sorted(sizes.tolist(), reverse=True)[:3]} voxels): the lungs touch or one is "
                f"missing; give a left/right labelled mask (lungmask: 1 = right, 2 = left)"
            )
        ids = 1 + np.argsort(sizes)[::-1][:2]
        centroids = np.array(ndimage.center_of_mass(np.ones_like(lab), lab, ids))
        world_x = centroids @ affine[0, :3] + affine[0, 3]
        right, left = (ids[0], ids[1]) if world_x[0] > world_x[1] else (ids[1], ids[0])
        return {"right": torch.from_numpy(lab == right)[None], "left": torch.from_numpy(lab == left)[None]}


class CheckLungsd(MapTransform):
    """Check in the data loader that the lung mask splits into a right and a left lung (:class:`LungSplit`)."""

    def __init__(
        self, keys: KeysCollection = "mask", mode: str = "auto", labels=(RIGHT, LEFT), image_key: str = "image"
    ) -> None:
        super().__init__(keys, allow_missing_keys=False)
        self.splitter = LungSplit(mode, labels)
        self.image_key = image_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.keys:
            if d.get(key) is None:
                image = d.get(self.image_key)
                source = image.meta.get("filename_or_obj", "") if isinstance(image, MetaTensor) else ""
                raise CS3FInputError(
                    f"{source or 'a volume'} has no lung mask: the lung CT pipeline needs one per volume "
                    f"(a masks/ folder or a mask column; make them with lungmask or TotalSegmentator)"
                )
            mask = d[key]
            source = mask.meta.get("filename_or_obj", "") if isinstance(mask, MetaTensor) else ""
            self.splitter(mask, name=str(source))
        return d


class LungCrop(Transform):
    """Crop one lung's bounding box (plus ``margin`` voxels) and centre crop-or-pad it (with ``value``) to
    ``crop_size`` ``(sagittal, coronal, axial)``, no resampling; :meth:`paste` applies MONAI's inverse."""

    def __init__(self, crop_size: Sequence[int] = PAPER_CROP_SIZE, margin: int = 0, value: float = 0.0) -> None:
        self.crop_size = _triple(crop_size, "crop_size")
        self.margin = int(margin)
        if self.margin < 0:
            raise CS3FInputError(f"crop margin must be >= 0 voxels, got {margin}")
        self.value = float(value)

    def box(self, lung: torch.Tensor) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """``(start, end)`` voxel box of the mask ``[1, H, W, D]`` (plus margin, clipped to the volume)."""
        m = torch.as_tensor(lung)
        m = m[0] if m.ndim == 4 else m
        idx = torch.nonzero(m > 0)
        if idx.numel() == 0:
            raise CS3FInputError("empty lung mask: no bounding box to crop")
        shape = torch.tensor(m.shape)
        start = torch.clamp(idx.min(0).values - self.margin, min=0)
        end = torch.minimum(idx.max(0).values + 1 + self.margin, shape)
        return tuple(int(v) for v in start), tuple(int(v) for v in end)  # type: ignore[return-value]

    def _transform(self, box) -> Compose:
        crop = SpatialCrop(roi_start=box[0], roi_end=box[1])
        return Compose([crop, ResizeWithPadOrCrop(self.crop_size, mode="constant", value=self.value)])

    @staticmethod
    def _fresh(img: torch.Tensor) -> MetaTensor:
        """A MetaTensor with ``img``'s affine and no transform history (the crop is recorded alone)."""
        affine = img.affine.clone() if isinstance(img, MetaTensor) else torch.eye(4, dtype=torch.float64)
        data = img.as_tensor() if isinstance(img, MetaTensor) else torch.as_tensor(img)
        return MetaTensor(data.float() if data.dtype == torch.bool else data, affine=affine)

    def __call__(self, img: torch.Tensor, box) -> MetaTensor:
        """The ``[C, *crop_size]`` crop of ``img [C, H, W, D]`` for ``box``, the crop its only recorded operation."""
        return self._transform(box)(self._fresh(img))

    def paste(self, crop_map: torch.Tensor, box, like: torch.Tensor) -> torch.Tensor:
        """``crop_map [C, *crop_size]`` back on the grid of ``like [C', H, W, D]`` (0 outside the crop)."""
        transform = self._transform(box)
        reference = transform(self._fresh(torch.as_tensor(like)[:1]))
        data = crop_map.as_tensor() if isinstance(crop_map, MetaTensor) else torch.as_tensor(crop_map)
        if tuple(data.shape[1:]) != self.crop_size:
            raise ValueError(f"map of shape {tuple(data.shape)} does not match the crop size {self.crop_size}")
        out = MetaTensor(data.float(), affine=reference.affine, applied_operations=list(reference.applied_operations))
        return transform.inverse(out).as_tensor()

    def truncated(self, box) -> list[str]:
        """Axes on which the box is larger than the crop size (its ends are cut off)."""
        return [AXES[i] for i in range(3) if box[1][i] - box[0][i] > self.crop_size[i]]


class LungCropd(MapTransform):
    """Dictionary version: writes ``{key}_{side}``, ``{mask_key}_{side}`` (the lung's own mask) and
    ``{mask_key}_boxes`` (``{side: (start, end)}``, for :meth:`LungCrop.paste`)."""

    def __init__(
        self,
        keys: KeysCollection,
        mask_key: str = "mask",
        crop_size: Sequence[int] = PAPER_CROP_SIZE,
        margin: int = 0,
        mode: str = "auto",
        labels=(RIGHT, LEFT),
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mask_key = mask_key
        self.splitter = LungSplit(mode, labels)
        self.cropper = LungCrop(crop_size, margin)

    def __call__(self, data: Mapping[Hashable, torch.Tensor], name: str = "") -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        if d.get(self.mask_key) is None:
            where = f"{name}: " if name else ""
            raise CS3FInputError(
                f"{where}the lung CT pipeline needs a lung mask per volume (a masks/ folder or a mask "
                f"column; make them with lungmask or TotalSegmentator)"
            )
        lungs = self.splitter(d[self.mask_key], name=name)
        boxes = {}
        for side in SIDES:
            boxes[side] = box = self.cropper.box(lungs[side])
            for key in self.key_iterator(d):
                d[f"{key}_{side}"] = self.cropper(d[key], box)
            d[f"{self.mask_key}_{side}"] = self.cropper(lungs[side], box)
        d[f"{self.mask_key}_boxes"] = boxes
        return d


class MaskWithSourced(MapTransform):
    """Zero ``keys`` (maps inverted to the input grid) outside ``mask_key``, the mask as loaded (no mask:
    no-op); its name must not start with ``"mask_"`` (``Spacingd`` takes ``"{key}_*"`` entries for metadata)."""

    def __init__(
        self, keys: KeysCollection = "pred", mask_key: str = "source_mask", allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mask_key = mask_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        mask = d.get(self.mask_key)
        if mask is None:
            return d
        inside = (mask.as_tensor() if isinstance(mask, MetaTensor) else torch.as_tensor(mask)) > 0
        inside = inside.reshape(inside.shape[-3:])
        for key in self.key_iterator(d):
            pred = d[key]
            if tuple(pred.shape[1:]) != tuple(inside.shape):
                raise ValueError(
                    f"{key} has shape {tuple(pred.shape[1:])} but the source-grid mask {self.mask_key!r} has "
                    f"{tuple(inside.shape)}: put MaskWithSourced after Invertd"
                )
            d[key] = pred * inside.reshape(1, *inside.shape).to(pred.device, pred.dtype)
        return d
