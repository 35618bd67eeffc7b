"""Rounding of measured figures and conversion of results to JSON."""

from __future__ import annotations

import math

import torch


def rounded(x: float | None, nd: int = 3) -> float | None:
    """``x`` rounded to ``nd`` decimals; ``None`` for ``None`` and non-finite values."""
    if x is None or not math.isfinite(x):
        return None
    return round(float(x), nd)


def significant(x: float | None, digits: int = 4) -> float | None:
    """``x`` rounded to ``digits`` significant digits, so that tiny quick-mode figures stay non-zero.

    ``None`` for ``None`` and non-finite values.
    """
    if x is None or not math.isfinite(x):
        return None
    if x == 0:
        return 0.0
    return round(float(x), digits - 1 - math.floor(math.log10(abs(x))))


def jsonable(obj: object) -> object:
    """``obj`` with tensors as lists, non-finite floats as ``None`` and anything unknown as ``str``."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, str | int | float | bool) or obj is None:
        return obj
    return str(obj)
