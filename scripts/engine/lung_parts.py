"""The two-part lung CT form: right and left lung crops scored as independent cohorts.

:class:`LungParts` is the evaluator's parts object (see :mod:`scripts.engine.parts`);
:class:`LungCS3FEvaluator` is the evaluator that holds one (``configs/lung_ct.json``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from scripts.engine.evaluator import CS3FEvaluator
from scripts.engine.parts import WholeVolume
from scripts.transforms.lung_crops import (
    LEFT,
    PAPER_CROP_SIZE,
    RIGHT,
    SIDES,
    LungCropd,
    check_crop_divisible,
    label_values,
)
from scripts.transforms.tokenization import AXES

__all__ = ["LungCS3FEvaluator", "LungParts"]


class LungParts(WholeVolume):
    """The right and left lung crops of each volume as two parts, ``"right"`` and ``"left"``.

    Args:
        image_key, mask_key: keys of the image and of its lung mask in the preprocessed items.
        crop_size: per-lung crop size ``(sagittal, coronal, axial)`` at the preprocessed (1 mm) spacing;
            the inferer's ``q`` must divide it on every slicing axis (:meth:`check`, before any encoding).
        margin: voxels around each lung's bounding box before crop-or-pad.
        mask_mode: ``"auto"``, ``"labels"`` or ``"binary"`` (see :class:`LungSplit`).
        lung_labels: ``(right, left)`` label values (ints or lists of ints); default ``(1, 2)``.

    A lung larger than the crop size is cut (a warning; its voxels outside the crop score 0; listed under
    ``lung.truncated`` in ``run.json``).
    """

    names = SIDES

    def __init__(
        self,
        image_key: str = "image",
        mask_key: str = "mask",
        crop_size: Sequence[int] = PAPER_CROP_SIZE,
        margin: int = 0,
        mask_mode: str = "auto",
        lung_labels=(RIGHT, LEFT),
    ) -> None:
        super().__init__(image_key, mask_key)
        self.crop = LungCropd(
            image_key, mask_key=mask_key, crop_size=crop_size, margin=margin, mode=mask_mode, labels=lung_labels
        )
        self.lung_info = {  # for run.json; the token identity has the crop's parameters (split_transform)
            "crop_size": list(self.crop.cropper.crop_size),
            "margin": int(margin),
            "mask_mode": mask_mode,
            "lung_labels": [list(label_values(v)) for v in lung_labels],
        }
        self.truncated: dict[str, dict[str, list[str]]] = {}

    def check(self, inferer: Any) -> None:
        check_crop_divisible(self.crop.cropper.crop_size, [inferer.q[a] for a in AXES], inferer.axes)

    def split_transform(self) -> LungCropd:
        return self.crop  # crops of another size or margin must not reuse cached tokens, nor a bank's

    def check_registration(self, part: str, image: torch.Tensor) -> bool:
        return False  # CT is not atlas-registered: crops share their size, not their affine

    def split(self, item: dict, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        d = self.crop({self.image_key: item[self.image_key], self.mask_key: item.get(self.mask_key)}, name=name)
        for side, box in d[f"{self.mask_key}_boxes"].items():
            cut = self.crop.cropper.truncated(box)
            if cut and side not in self.truncated.get(name, {}):
                self.truncated.setdefault(name, {})[side] = cut
                warnings.warn(
                    f"cs3f: {name}: the {side} lung's box {[e - s for s, e in zip(*box, strict=True)]} is "
                    f"larger than the crop size {list(self.crop.cropper.crop_size)} on the {', '.join(cut)} "
                    f"axis; voxels outside the crop score 0 (raise crop_size)",
                    stacklevel=2,
                )
        return {side: (d[f"{self.image_key}_{side}"], d[f"{self.mask_key}_{side}"]) for side in SIDES}

    def merge(self, item: dict, maps: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        lungs = self.crop.splitter(item[self.mask_key], name=name)
        cropper = self.crop.cropper
        merged = torch.zeros((1, *item[self.image_key].shape[1:]), dtype=torch.float32)
        for side in SIDES:
            pasted = cropper.paste(maps[side], cropper.box(lungs[side]), lungs[side])
            merged = torch.maximum(merged, pasted.float() * lungs[side].float())
        return merged

    def record(self) -> dict:
        return {"lung": {**self.lung_info, "truncated": self.truncated}}


class LungCS3FEvaluator(CS3FEvaluator):
    """:class:`scripts.engine.evaluator.CS3FEvaluator` holding :class:`LungParts`: ``CS3FEvaluator``'s
    arguments but ``parts``, plus ``LungParts``' keywords."""

    def __init__(
        self,
        *args,
        crop_size: Sequence[int] = PAPER_CROP_SIZE,
        margin: int = 0,
        mask_mode: str = "auto",
        lung_labels=(RIGHT, LEFT),
        **kwargs,
    ) -> None:
        keys = kwargs.get("image_key", "image"), kwargs.get("mask_key", "mask")
        parts = LungParts(*keys, crop_size=crop_size, margin=margin, mask_mode=mask_mode, lung_labels=lung_labels)
        super().__init__(*args, parts=parts, **kwargs)
