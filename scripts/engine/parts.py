"""How the evaluator cuts a volume into parts scored independently: by default, not at all.

Each part's bank (that part of every volume) is scored on its own, against the same part of the other
volumes. :class:`scripts.engine.lung.LungCS3FEvaluator` overrides these hooks to score the right and the
left lung crops separately.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["WholeVolume"]


class WholeVolume:
    """The part hooks of :class:`~scripts.engine.evaluator.CS3FEvaluator`: one part ``""``, the whole
    (registered) volume. Mixed into the evaluator, whose ``image_key`` and ``mask_key`` they read."""

    image_key: str
    mask_key: str

    def split(self, item: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """Parts of one preprocessed item that are scored independently: ``{part: (image, mask)}``."""
        return {"": (item[self.image_key], item.get(self.mask_key))}

    def split_transform(self) -> Callable | None:
        """The transform behind :meth:`split`, whose parameters shape the tokens (``None``: no split)."""
        return None

    def merge(self, item: dict, maps: dict[str, torch.Tensor]) -> torch.Tensor:
        """The ``[1, H, W, D]`` map of the whole preprocessed item from its parts' maps."""
        return maps[""]

    def check_registration(self, part: str, image: torch.Tensor) -> bool:
        """Whether the volumes of ``part`` must share one affine (registered data); shapes always must."""
        return True
