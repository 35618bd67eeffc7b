"""Checked loading: read errors and unusable volumes become one line naming the file."""

from __future__ import annotations

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import LoadImaged, MapTransform
from scripts.errors import CS3FInputError, one_line

__all__ = ["CheckedLoadImaged", "CheckVolumed", "ForegroundFromImaged"]


class CheckedLoadImaged(LoadImaged):
    """``LoadImaged`` whose read errors name the failing file in one :class:`CS3FInputError` line."""

    def __call__(self, data, reader=None):  # noqa: ANN001 - same signature as LoadImaged
        d = dict(data)
        for key in self.key_iterator(d):
            try:
                d.update(super().__call__({key: d[key]}, reader))
            except Exception as err:
                cause = err
                while cause.__cause__ is not None:
                    cause = cause.__cause__
                raise CS3FInputError(f"cannot read {key} {d[key]}: {one_line(cause)}") from None
        return d


class CheckVolumed(MapTransform):
    """Reject volumes CS3F cannot score (:class:`CS3FInputError` naming the file): non-finite voxels (or
    set them to 0, ``nonfinite="zero"``), a constant image, an empty mask. Place it right after loading."""

    def __init__(
        self,
        keys: KeysCollection = "image",
        mask_key: str | None = "mask",
        nonfinite: str = "error",
        allow_missing_keys: bool = True,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if nonfinite not in ("error", "zero"):
            raise CS3FInputError(f"nonfinite must be 'error' or 'zero', got {nonfinite!r}")
        self.mask_key = mask_key
        self.nonfinite = nonfinite

    @staticmethod
    def _source(img) -> str:  # noqa: ANN001
        return str(img.meta.get("filename_or_obj", "<in-memory volume>")) if isinstance(img, MetaTensor) else ""

    def __call__(self, data):  # noqa: ANN001 - MONAI dictionary transform
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            bad = ~torch.isfinite(torch.as_tensor(img))
            count = int(bad.sum())
            if count and self.nonfinite == "error":
                raise CS3FInputError(
                    f"{self._source(img)} has {count} NaN/Inf voxels (set nonfinite to 'zero' to replace them with 0)"
                )
            if count:
                d[key] = img.masked_fill(bad, 0) if isinstance(img, torch.Tensor) else np.where(bad, 0, img)
        for key in self.key_iterator(d):
            values = torch.as_tensor(d[key])
            if values.numel() and bool(values.amin() == values.amax()):  # it would rank above any lesion
                raise CS3FInputError(
                    f"{self._source(d[key])} is constant (every voxel {float(values.flatten()[0]):g}): "
                    f"no anatomy to compare"
                )
        if self.mask_key and self.mask_key in d and not bool((torch.as_tensor(d[self.mask_key]) > 0).any()):
            raise CS3FInputError(f"mask {self._source(d[self.mask_key])} is empty (all background)")
        return d


class ForegroundFromImaged(MapTransform):
    """``mask_key = image > 0`` (with the image's metadata) for items whose datalist row says
    ``"foreground": "image"`` (skull-stripped scans without a mask). Place it before orientation."""

    def __init__(self, keys: KeysCollection = "image", mask_key: str = "mask", flag: str = "foreground") -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.mask_key, self.flag = mask_key, flag

    def __call__(self, data):  # noqa: ANN001 - MONAI dictionary transform
        d = dict(data)
        if d.get(self.flag) != "image" or self.mask_key in d:
            return d
        for key in self.key_iterator(d):
            image = d[key]
            mask = (torch.as_tensor(image) > 0).to(torch.uint8)
            d[self.mask_key] = MetaTensor(mask, meta=dict(image.meta)) if isinstance(image, MetaTensor) else mask
        return d
