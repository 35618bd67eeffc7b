"""User-facing config keys: booleans in any case, ranges, choices and combinations, one line each."""

from __future__ import annotations

import pytest
from scripts.engine.options import as_bool, check_options
from scripts.errors import CS3FInputError
from scripts.scoring.references import ReferenceSet


@pytest.mark.parametrize(
    ("text", "expected"), [("false", False), ("FALSE", False), ("True", True), (True, True), ("no", False), (0, False)]
)
def test_booleans_accept_true_and_false_in_any_case(text: object, expected: bool) -> None:
    assert as_bool(text, "use_masks") is expected
    assert check_options({"use_masks": text}).use_masks is expected


@pytest.mark.parametrize("text", ["flase", "", 2, None, [True]])
def test_other_booleans_are_one_error_line(text: object) -> None:
    with pytest.raises(CS3FInputError, match="use_masks must be true or false") as err:
        check_options({"use_masks": text})
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("axes", ["nope"], "axes must be"),
        ("axes", [], "axes must be"),
        ("axes", ["axial", "A"], "axes must be"),
        ("q", [4, 4], "q must be"),
        ("q", [0, 4, 4], "q must be"),
        ("q", "8", "q must be"),
        ("variant", "X", "variant must be one of C, F, MS"),
        ("rho", 0, "rho must be a number in (0, 1]"),
        ("rho", 1.5, "rho must be"),
        ("rho", "a", "rho must be"),
        ("delta", 1.0, "delta must be"),
        ("smooth_mm", -1, "smooth_mm must be a number >= 0"),
        ("smooth_mm", "x", "smooth_mm must be"),
        ("subject_score", "mean", "subject_score must be one of max, robust_z"),
        ("d", 0, "d must be an integer >= 1"),
        ("L", 2.5, "L must be an integer"),
        ("token_dtype", "int8", "token_dtype must be one of"),
        ("on_bad_input", "ignore", "on_bad_input must be one of error, skip"),
        ("nonfinite", "nan", "nonfinite must be one of error, zero"),
        ("spatial_size", [96, 96], "spatial_size must be"),
        ("intensity_percentiles", [99, 1], "intensity_percentiles must be"),
        ("num_threads", 0, "num_threads must be"),
        ("layers", [], "layers must be"),
        ("layers", [-1], "layers must be"),
        ("layers", [""], "layers must be"),
        ("references", "random:0", "references must be"),
        ("score_precision", "fp16", "score_precision must be one of auto, fp32"),
    ],
)
def test_bad_values_name_the_key(key: str, value: object, fragment: str) -> None:
    with pytest.raises(CS3FInputError) as err:
        check_options({key: value})
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_good_values_are_normalised() -> None:
    o = check_options(
        {
            "axes": ["S", "axial"],
            "q": 8,
            "variant": "ms",
            "q_fine": [2, 2, 2],
            "rho": "0.2",
            "references": "random:8",
            "score_precision": " AUTO",
        }
    )
    assert o.axes == ["sagittal", "axial"] and o.q == [8, 8, 8] and o.variant == "MS"
    assert o.rho == 0.2 and o.references == ReferenceSet("random", 8) and o.score_precision == "auto"
    assert check_options({"other": object}).other is object  # unknown keys pass through


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"variant": "MS", "q": [8, 8, 8], "q_fine": None}, "needs q_fine"),
        ({"variant": "F", "q": [8, 8, 8], "q_fine": [3, 2, 2], "axes": ["sagittal"]}, "q_fine must divide q"),
    ],
)
def test_combinations(values: dict, fragment: str) -> None:
    with pytest.raises(CS3FInputError, match=fragment):
        check_options(values)
    values = {**values, "axes": ["coronal"], "q_fine": [3, 2, 2]}
    assert check_options(values).q_fine == [3, 2, 2]  # only the slicing axes must divide


def test_layers_are_block_indices_or_stage_names() -> None:
    """ViTs name blocks by index, EfficientNet by stage name; both pass, the encoder checks existence."""
    assert check_options({"layers": [4, 11]}).layers == [4, 11]
    assert check_options({"layers": ["stage3"]}).layers == ["stage3"]
