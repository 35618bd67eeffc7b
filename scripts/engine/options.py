"""The bundle's user-facing config keys, checked and normalised before any file is read or encoded.

``python -m monai.bundle run --use_masks false`` hands the config the *string* ``"false"`` (the
command line parser turns only ``False`` into a boolean), which Python would take as true. Every key a
user may override is therefore read through :func:`check_options`: booleans accept ``true``/``false``
in any case, numbers are checked for type and range, choices against their allowed values, and a bad
value stops the run with one ``cs3f: error:`` line naming the key, the value and what is allowed.
The configs read the checked values from ``@options``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from types import SimpleNamespace
from typing import Any

from scripts.anomaly_map import EDGES, SUBJECT_SCORES
from scripts.encoders.base import ENCODER_PRECISIONS
from scripts.errors import CS3FInputError
from scripts.scoring.references import REPLACED_KEYS, ReferenceSet, reject_replaced_keys
from scripts.scoring.scorer import PRECISIONS
from scripts.transforms.tokenization import AXES, axis_index

__all__ = ["check_options", "as_bool"]

_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
TOKEN_DTYPES = ("float32", "float16", "bfloat16")
VARIANTS = ("C", "F", "MS")


def _bad(key: str, value: object, allowed: str) -> CS3FInputError:
    return CS3FInputError(f"{key} must be {allowed}, got {value!r}")


def as_bool(value: object, key: str = "value") -> bool:
    """``True``/``False`` from a bool or the words true/false (any case; also yes/no, on/off, 1/0)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise _bad(key, value, "true or false")


def _as_int(value: object, key: str, low: int | None = None, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
        bound = "" if low is None else f" >= {low}"
        raise _bad(key, value, f"an integer{bound}" + (" or null" if allow_none else ""))
    return int(value)


def _as_float(value: object, key: str, check: Callable[[float], bool], allowed: str) -> float:
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or not check(number):
        raise _bad(key, value, allowed)
    return number


def _as_choice(value: object, key: str, choices: Sequence[str], upper: bool = False) -> str:
    text = str(value).strip()
    text = text.upper() if upper else text.lower()
    if not isinstance(value, str) or text not in choices:
        raise _bad(key, value, "one of " + ", ".join(choices))
    return text


def _as_list(value: object, key: str) -> list:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise _bad(key, value, "a list")
    return list(value)


def _per_axis(value: object, key: str, allow_none: bool = False) -> list[int] | None:
    """One positive int, or three (sagittal, coronal, axial)."""
    if value is None and allow_none:
        return None
    values = [value] * 3 if isinstance(value, int) and not isinstance(value, bool) else value
    ok = isinstance(values, Sequence) and not isinstance(values, str) and len(values) == 3
    ok = ok and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values)
    if not ok:
        allowed = "a positive integer or three (sagittal, coronal, axial)" + (" or null" if allow_none else "")
        raise _bad(key, value, allowed)
    return [int(v) for v in values]


def _axes(value: object) -> list[str]:
    items = _as_list(value, "axes")
    try:
        names = [AXES[axis_index(a)] for a in items]
    except (KeyError, ValueError, IndexError, TypeError):
        names = []
    if not names or len(set(names)) != len(names):
        raise _bad("axes", value, f"a non-empty list of distinct axes from {list(AXES)}")
    return names


def _spatial_size(value: object) -> list[int]:
    items = _as_list(value, "spatial_size")
    ok = len(items) == 3 and all(isinstance(v, int) and not isinstance(v, bool) and (v == -1 or v >= 1) for v in items)
    if not ok:
        raise _bad("spatial_size", value, "three integers, each >= 1 or -1 (keep that axis)")
    return [int(v) for v in items]


def _percentiles(value: object) -> list[float]:
    items = _as_list(value, "intensity_percentiles")
    try:
        low, high = (float(v) for v in items)
    except (TypeError, ValueError):
        low, high = math.nan, math.nan
    if not 0.0 <= low < high <= 100.0:
        raise _bad("intensity_percentiles", value, "[low, high] with 0 <= low < high <= 100")
    return [low, high]


def _is_layer(v: object) -> bool:
    return (isinstance(v, int) and not isinstance(v, bool) and v >= 0) or (isinstance(v, str) and v != "")


def _layers(value: object) -> list[int | str] | None:
    """Block indices (ViTs) or stage names (EfficientNet, e.g. ``"stage3"``); the encoder checks they exist."""
    if value is None:
        return None
    items = _as_list(value, "layers")
    if not items or not all(_is_layer(v) for v in items):
        raise _bad("layers", value, "null or a non-empty list of layer indices >= 0 or stage names")
    return list(items)


_BOOLEANS = ("use_masks", "use_labels", "require_same_grid", "quiet", "keep_tokens", "plots")
_CHECKS: dict[str, Callable[[Any], Any]] = {
    "on_bad_input": lambda v: _as_choice(v, "on_bad_input", ("error", "skip")),
    "nonfinite": lambda v: _as_choice(v, "nonfinite", ("error", "zero")),
    "axes": _axes,
    "q": lambda v: _per_axis(v, "q"),
    "q_fine": lambda v: _per_axis(v, "q_fine", allow_none=True),
    "variant": lambda v: _as_choice(v, "variant", VARIANTS, upper=True),
    "L": lambda v: _as_int(v, "L", 1),
    "rho": lambda v: _as_float(v, "rho", lambda x: 0.0 < x <= 1.0, "a number in (0, 1]"),
    "d": lambda v: _as_int(v, "d", 1),
    "delta": lambda v: _as_float(v, "delta", lambda x: 0.0 <= x < 1.0, "a number in [0, 1)"),
    "image_size": lambda v: _as_int(v, "image_size", 16),
    "slab_size": lambda v: _as_int(v, "slab_size", 1),
    "token_dtype": lambda v: _as_choice(v, "token_dtype", TOKEN_DTYPES),
    "seed": lambda v: _as_int(v, "seed"),
    "num_threads": lambda v: _as_int(v, "num_threads", 1, allow_none=True),
    "spatial_size": _spatial_size,
    "intensity_percentiles": _percentiles,
    "layers": _layers,
    "references": ReferenceSet.parse,
    "edge": lambda v: _as_choice(v, "edge", EDGES),
    "smooth_mm": lambda v: _as_float(v, "smooth_mm", lambda x: x >= 0.0, "a number >= 0 (mm; 0 = off)"),
    "subject_score": lambda v: _as_choice(v, "subject_score", SUBJECT_SCORES),
    "depth_phases": lambda v: _as_int(v, "depth_phases", 1),
    "score_precision": lambda v: _as_choice(v, "score_precision", PRECISIONS),
    "encoder_precision": lambda v: _as_choice(v, "encoder_precision", ENCODER_PRECISIONS),
    "encoder_name": lambda v: v if isinstance(v, str) and v.strip() else _raise(_bad("encoder_name", v, "a name")),
}


def _raise(err: Exception) -> Any:
    raise err


def _combinations(o: dict[str, Any]) -> None:
    """Checks across keys (each key alone is already valid)."""
    phases = o.get("depth_phases", 1)
    smallest = min(o["q"][axis_index(axis)] for axis in o.get("axes", AXES))
    if phases > smallest:
        raise CS3FInputError(f"depth_phases={phases} exceeds the depth pooling q={smallest}: one phase per slice")
    if o.get("variant", "C") != "C":
        if o.get("q_fine") is None:
            raise CS3FInputError(f"variant {o['variant']} needs q_fine (e.g. [2, 2, 2]), got null")
        if phases > 1:
            raise CS3FInputError(
                f"variant {o['variant']} needs depth_phases 1 (two or more phases are implemented for variant C "
                "only): add --depth_phases 1, or use the configs/multiscale.json overlay"
            )
        for axis in o.get("axes", AXES):
            i = axis_index(axis)
            if o["q"][i] % o["q_fine"][i]:
                raise CS3FInputError(
                    f"q_fine must divide q on every slicing axis (q = h * q_fine): on the {axis} axis q="
                    f"{o['q'][i]}, q_fine={o['q_fine'][i]}"
                )


def check_options(values: Mapping[str, Any]) -> SimpleNamespace:
    """The checked and normalised values of the user-facing keys in ``values``.

    Keys this module does not know are passed through unchanged; keys that ``references`` replaced
    (``chunk_size``, ``n_references``, ``reference_bank``) must be null. Raises one
    :class:`CS3FInputError` line for the first bad value or combination.
    """
    reject_replaced_keys(**{k: v for k, v in values.items() if k in REPLACED_KEYS})
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key in REPLACED_KEYS:
            continue
        if key in _BOOLEANS:
            out[key] = as_bool(value, key)
        elif key in _CHECKS:
            out[key] = _CHECKS[key](value)
        else:
            out[key] = value
    if "variant" in out and "q" in out:
        _combinations(out)
    return SimpleNamespace(**out)
