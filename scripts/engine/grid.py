"""The cohort's common grid: CS3F matches tokens position by position, so every volume (every part of
a volume) must have the same preprocessed shape, and the same affine when the data are registered."""

from __future__ import annotations

import torch
from monai.data import MetaTensor

__all__ = ["CohortGrid", "grid_difference"]


def _rounded(values: torch.Tensor) -> list[float]:
    return [round(float(v), 3) for v in values]


def grid_difference(
    grid: tuple[tuple[int, ...], torch.Tensor], first: tuple[tuple[int, ...], torch.Tensor], atol: float
) -> list[str]:
    """What differs between two grids ``(shape, affine)``: shape, spacing, origin or direction, with
    the numbers of both (empty when they agree within ``atol`` mm)."""
    (shape, affine), (shape0, affine0) = grid, first
    out = [f"shape {tuple(shape)} vs {tuple(shape0)}"] if tuple(shape) != tuple(shape0) else []
    spacing, spacing0 = affine[:3, :3].norm(dim=0), affine0[:3, :3].norm(dim=0)
    if not torch.allclose(spacing, spacing0, atol=atol):
        out.append(f"spacing {_rounded(spacing)} vs {_rounded(spacing0)} mm")
    if not torch.allclose(affine[:3, 3], affine0[:3, 3], atol=atol):
        out.append(f"origin {_rounded(affine[:3, 3])} vs {_rounded(affine0[:3, 3])} mm")
    direction, direction0 = affine[:3, :3] / spacing, affine0[:3, :3] / spacing0
    if not torch.allclose(direction, direction0, atol=atol):
        out.append(f"direction {direction.round(decimals=3).tolist()} vs {direction0.round(decimals=3).tolist()}")
    return out


class CohortGrid:
    """The grid ``(spatial shape, affine [4, 4] float64)`` of each part, set by its first volume (or
    by a reference bank, :meth:`expect`), against which every later volume is checked."""

    def __init__(self, atol: float = 1e-3) -> None:
        self.atol = atol
        self.grids: dict[str, tuple[tuple[int, ...], torch.Tensor]] = {}

    def expect(self, part: str, grid: tuple[tuple[int, ...], torch.Tensor]) -> None:
        """Require ``grid`` for ``part`` (e.g. the grid the reference bank was built on)."""
        self.grids[part] = (tuple(grid[0]), torch.as_tensor(grid[1]).double())

    def check(self, name: str, part: str, image: torch.Tensor, registered: bool = True) -> str | None:
        """Why ``image`` (``[C, *spatial]``, part ``part`` of volume ``name``; no affine: the identity) is off
        the cohort's grid (the first image of a part sets it), or ``None``; ``registered``: check the affine too."""
        affine = image.affine if isinstance(image, MetaTensor) else torch.eye(4)
        grid = (tuple(image.shape[1:]), affine.double())
        first = self.grids.setdefault(part, grid)
        same_affine = torch.allclose(grid[1], first[1], atol=self.atol) or not registered
        if grid[0] != first[0] or not same_affine:
            where = f" ({part})" if part else ""
            differs = grid_difference(grid, first, self.atol) if registered else [f"shape {grid[0]} vs {first[0]}"]
            return (
                f"{name}{where} is not on the cohort's grid after preprocessing ({'; '.join(differs)}, "
                f"this volume vs the cohort): volumes must be registered to one space and preprocessed to "
                f"one shape"
            )
        return None
