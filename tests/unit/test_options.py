"""User-facing arguments: each component checks its own (booleans in any case, ranges, choices and
combinations, one line each), and the command line's keys are checked against the configs' ids."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from scripts.engine.datalist import CheckedDataset
from scripts.engine.options import check_overrides, config_ids
from scripts.errors import CS3FInputError, as_bool
from scripts.inferer import CS3FInferer
from scripts.scoring.references import ReferenceSet
from scripts.transforms.inputs import CheckVolumed

ROOT = Path(__file__).resolve().parents[2]
MONAI_RUN = str(Path(sys.prefix) / "lib" / "monai" / "bundle" / "__main__.py")


@pytest.mark.parametrize(
    ("text", "expected"), [("false", False), ("FALSE", False), ("True", True), (True, True), ("no", False), (0, False)]
)
def test_booleans_accept_true_and_false_in_any_case(text: object, expected: bool) -> None:
    assert as_bool(text, "use_masks") is expected


@pytest.mark.parametrize("text", ["flase", "", 2, None, [True]])
def test_other_booleans_are_one_error_line(text: object) -> None:
    with pytest.raises(CS3FInputError, match="use_masks must be true or false") as err:
        as_bool(text, "use_masks")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("axes", ["nope"], "unknown axis"),
        ("axes", [], "axes must be"),
        ("axes", ["axial", "A"], "axes must be"),
        ("q", [4, 4], "q must be"),
        ("q", [0, 4, 4], "q must be"),
        ("variant", "X", "variant must be one of C, F, MS"),
        ("rho", 0, "rho must be in (0, 1]"),
        ("rho", 1.5, "rho must be"),
        ("rho", "a", "rho must be a number"),
        ("delta", 1.0, "delta must be"),
        ("smooth_mm", -1, "smooth_mm must be a number >= 0"),
        ("smooth_mm", "x", "smooth_mm must be"),
        ("subject_score", "mean", "subject_score must be one of max, robust_z"),
        ("edge", "soft", "edge must be one of"),
        ("d", 0, "d must be an integer >= 1"),
        ("L", 2.5, "L (coarse routes per reference volume) must be an int"),
        ("slab_size", 0, "slab_size must be an integer >= 1"),
        ("seed", "x", "seed must be an integer"),
        ("token_dtype", "int8", "token_dtype must be one of"),
        ("references", "random:0", "references must be"),
        ("score_precision", "fp16", "score_precision must be one of auto, fp32"),
        ("depth_phases", 0, "depth_phases must be"),
    ],
)
def test_the_inferer_names_its_bad_argument(key: str, value: object, fragment: str) -> None:
    """Every scoring and tokenization argument is checked where the inferer is built, before any work."""
    with pytest.raises(CS3FInputError) as err:
        CS3FInferer(**{"q": [4, 4, 4], key: value})
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_the_data_components_name_their_bad_argument() -> None:
    with pytest.raises(CS3FInputError, match="on_bad_input must be one of error, skip"):
        CheckedDataset([], on_bad_input="ignore")
    with pytest.raises(CS3FInputError, match="nonfinite must be 'error' or 'zero'"):
        CheckVolumed("image", nonfinite="nan")


def test_good_values_are_normalised() -> None:
    inferer = CS3FInferer(
        axes=["S", "axial"],
        q=8,
        variant="ms",
        q_fine=[2, 2, 2],
        rho="0.2",
        references="random:8",
        score_precision=" AUTO",
    )
    assert inferer.axes == ["sagittal", "axial"] and inferer.describe()["q"] == [8, 8, 8] and inferer.variant == "MS"
    assert inferer.rho == 0.2 and inferer.references == ReferenceSet("random", 8) and inferer.scorer.precision == "auto"


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"variant": "MS", "q": [8, 8, 8], "q_fine": None}, "needs q_fine"),
        ({"variant": "F", "q": [8, 8, 8], "q_fine": [3, 2, 2], "axes": ["sagittal"]}, "is not a multiple of q_f=3"),
    ],
)
def test_combinations(values: dict, fragment: str) -> None:
    with pytest.raises(CS3FInputError, match=fragment):
        CS3FInferer(**values)
    values = {**values, "axes": ["coronal"], "q_fine": [3, 2, 2]}
    assert CS3FInferer(**values).describe()["q_fine"] == [3, 2, 2]  # only the slicing axes must divide


def _run_argv(*args: str, config: str = "configs/inference.json") -> list[str]:
    return [MONAI_RUN, "run", "--config_file", config, *args]


def test_a_typo_on_the_command_line_names_the_closest_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    with pytest.raises(CS3FInputError, match=r"unknown config key --rhoo: did you mean --rho\?"):
        check_overrides(_run_argv("--rhoo", "0.2"))
    # a key that moved into its component names its new spelling
    with pytest.raises(CS3FInputError, match=r"--L: did you mean --inferer#L\?"):
        check_overrides(_run_argv("--L", "8"))
    with pytest.raises(CS3FInputError, match=r"--cache_dir: did you mean --evaluator#cache_dir\?"):
        check_overrides(_run_argv("--cache_dir", "x"))
    # known keys: top-level, nested, arguments a component leaves to their default, overlays' keys
    check_overrides(_run_argv("--rho", "0.2", "--inferer#L", "8", "--inferer#slab_size", "8", "--quiet", "true"))
    check_overrides(_run_argv("--datalist#modality", "t2", "--evaluator#keep_tokens", "true", "--meta_file", "m"))
    check_overrides(_run_argv("--network_def#model_dir", "models/x"))  # build_network passes **kwargs on
    lung = "['configs/inference.json','configs/lung_ct.json']"
    check_overrides(_run_argv("--crop_size", "[32,48,64]", "--q", "[8,8,8]", config=lung))
    check_overrides(["pytest", "--rhoo"])  # not a bundle command line: nothing to check


def test_config_ids_include_the_components_arguments() -> None:
    ids = set(config_ids({"inferer": {"_target_": "scripts.inferer.CS3FInferer", "q": 4}, "x": [{"a": 1}]}))
    assert {"inferer", "inferer#q", "inferer#edge", "inferer#slab_size", "x", "x#0", "x#0#a"} <= ids


def test_signals_become_one_line_only_in_a_bundle_run_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """An in-process run (a notebook, a service) keeps its host's SIGINT/SIGTERM handlers; the
    ``monai.bundle run`` process gets the bundle's (one line, nothing partial published)."""
    import signal

    from scripts import errors

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # restored after the test
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        check_overrides(["/env/lib/ipykernel_launcher.py", "-f", "kernel.json"])
        assert {s: signal.getsignal(s) for s in before} == before
        check_overrides(_run_argv("--rho", "0.2"))
        assert all(signal.getsignal(s) is errors._interrupt for s in before)
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
