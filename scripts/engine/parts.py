"""How the evaluator cuts a volume into parts scored independently: by default, not at all.

Each part's bank (that part of every volume) is scored on its own, against the same part of the other
volumes. The evaluator holds one parts object (its ``parts``): :class:`WholeVolume` by default;
:class:`scripts.engine.lung_parts.LungParts` scores the right and the left lung crops separately.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["WholeVolume"]


class WholeVolume:
    """The parts of :class:`~scripts.engine.evaluator.CS3FEvaluator`'s volumes: one part ``""``, the whole
    (registered) volume.

    Args:
        image_key, mask_key: keys of the image and of its (optional) mask in the preprocessed items.
    """

    names: tuple[str, ...] = ("",)  # the parts' names (cache entries are <volume>.<part>)

    def __init__(self, image_key: str = "image", mask_key: str = "mask") -> None:
        self.image_key, self.mask_key = image_key, mask_key

    def split(self, item: dict, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """Parts of one preprocessed item (volume ``name``) scored independently: ``{part: (image, mask)}``."""
        return {"": (item[self.image_key], item.get(self.mask_key))}

    def split_transform(self) -> Callable | None:
        """The transform behind :meth:`split`, whose parameters shape the tokens (``None``: no split)."""
        return None

    def merge(self, item: dict, maps: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        """The ``[1, H, W, D]`` map of the whole preprocessed item (volume ``name``) from its parts' maps."""
        return maps[""]

    def check_registration(self, part: str, image: torch.Tensor) -> bool:
        """Whether the volumes of ``part`` must share one affine (registered data); shapes always must."""
        return True

    def voxel_map(
        self, inferer: Any, item: dict, name: str, token_scores: dict, token_validity: dict
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Pass 2: the ``[1, H, W, D]`` map of the item (volume ``name``), its parts' voxel maps (made by
        ``inferer`` from the ``{part: {name: ...}}`` token scores and validity grids) merged, and the
        largest score of each slicing axis over the parts."""
        axis_max: dict[str, float] = {}
        maps = {}
        for part, (image, mask) in self.split(item, name).items():
            part_max: dict[str, float] = {}
            maps[part] = inferer.voxel_map(
                token_scores[part][name],
                tuple(image.shape[1:]),
                mask,
                axis_max=part_max,
                validity=token_validity.get(part, {}).get(name),
            )
            for axis, value in part_max.items():
                axis_max[axis] = max(axis_max.get(axis, 0.0), value)
        return self.merge(item, maps, name), axis_max

    def check(self, inferer: Any) -> None:
        """Check that the parts suit ``inferer`` (a :class:`scripts.inferer.CS3FInferer`); any part does."""

    def record(self) -> dict:
        """Entries of ``run.json`` describing the parts (none for the whole volume)."""
        return {}
