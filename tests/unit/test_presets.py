"""The paper presets set every parameter of the paper's Table 2 (and Sec. 4.1's preprocessing)."""

from __future__ import annotations

from pathlib import Path

import pytest
from monai.bundle import ConfigParser
from scripts.transforms.intensity import MNI152_T1_STANDARD

ROOT = Path(__file__).resolve().parents[2]

# Table 2 of the paper, Sec. 4.1 (brain: 156^3 brain crop resized to 224^3, Nyul standardisation) and
# Sec. 4.2 (DINOv2-L/14 at R = 224, layers 6/12/18/24), written out here independently of the configs.
PAPER = {
    "brain": {
        "encoder_name": "dinov2",
        "layers": [6, 12, 18, 24],
        "image_size": 224,
        "crop_size": [156, 156, 156],
        "spatial_size": [224, 224, 224],
        "q": [14, 14, 14],
        "q_fine": [2, 2, 2],
        "smooth_mm": 0.0,  # not in the paper: off
        "subject_score": "max",  # Sec. 3.3.4: the map's maximum
        "depth_phases": 1,  # Sec. 3.3.2: tokens pool q slices from the volume's first
        "delta": 0.0,
        "rho": 0.1,
        "L": 16,
        "d": 128,
        "precision": "fp32",  # the encoder in full precision: no autocast on a GPU
        "score_precision": "fp32",
    },
    "lung": {
        "encoder_name": "dinov2",
        "layers": [6, 12, 18, 24],
        "image_size": 224,
        "crop_size": [160, 238, 336],
        "spacing": [1.0, 1.0, 1.0],
        "hu_window": [-800.0, 400.0],
        "q": [8, 14, 14],
        "q_fine": [2, 2, 2],
        "smooth_mm": 0.0,
        "subject_score": "max",
        "depth_phases": 1,
        "delta": 0.0,
        "rho": 0.1,
        "L": 16,
        "d": 128,
        "precision": "fp32",  # the encoder in full precision: no autocast on a GPU
        "score_precision": "fp32",
    },
}
#: where each parameter lives in the configs: a top-level key, or an argument of its component
IDS = {
    "q_fine": "inferer#q_fine",
    "L": "inferer#L",
    "delta": "inferer#delta",
    "precision": "network_def#precision",
    "score_precision": "inferer#score_precision",
}
FILES = {
    "brain": ["inference.json", "paper_brain_mri.json"],
    "lung": ["inference.json", "lung_ct.json", "paper_lung_ct.json"],
}


def _parser(organ: str) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / f) for f in FILES[organ]])
    return parser


@pytest.mark.parametrize("organ", ["brain", "lung"])
def test_presets_set_every_parameter_of_the_paper(organ: str) -> None:
    parser = _parser(organ)
    for key, value in PAPER[organ].items():
        assert parser.get_parsed_content(IDS.get(key, key)) == value, key
    assert parser.get_parsed_content("variant") in ("C", "F", "MS")  # every variant is the paper's
    inferer, network = parser.get("inferer"), parser.get("network_def")
    assert inferer["q"] == "@q"  # the inferer reads the preset
    assert network["layers"] == "@layers"


def test_brain_preset_standardises_with_nyul_after_the_crop_and_resize() -> None:
    parser = _parser("brain")
    names = [type(t).__name__ for t in parser.get_parsed_content("preprocessing").transforms]
    assert names.index("CenterSpatialCropd") < names.index("Resized") < names.index("NyulStandardized")
    assert names.index("NyulStandardized") < names.index("ScaleIntensityd")
    # a fixed reference scale, as the paper's; nothing is learned from the cohort being scored
    assert not any("nyul.fit" in step for step in parser.get("initialize"))
    nyul = parser.get_parsed_content("nyul")
    assert nyul.standardize.standard.tolist() == list(MNI152_T1_STANDARD)


def test_nyul_overlay_replaces_the_intensity_steps_only() -> None:
    """configs/nyul.json replaces the default's `intensity` list (percentile scaling) with Nyúl + min-max
    scaling on the fixed scale, keeps `loading` and `finishing`; configs/nyul_from_cohort.json learns the
    scale from the cohort's `loading` steps instead."""
    base = ConfigParser()
    base.read_config(str(ROOT / "configs" / "inference.json"))
    assert base.get("preprocessing#transforms") == "$@loading + @intensity + @finishing"
    base_names = [type(t).__name__ for t in base.get_parsed_content("preprocessing").transforms]
    n = len(base.get("loading"))
    assert base_names[n - 1 : n + 1] == ["Resized", "ScaleIntensityRangePercentilesd"]
    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / f) for f in ("inference.json", "nyul.json")])
    names = [type(t).__name__ for t in parser.get_parsed_content("preprocessing").transforms]
    assert names == [*base_names[:n], "NyulStandardized", "ScaleIntensityd", *base_names[n + 1 :]]
    assert not any("nyul.fit" in step for step in parser.get("initialize"))
    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / f) for f in ("inference.json", "nyul.json", "nyul_from_cohort.json")])
    fit = parser.get("initialize")[-1]
    assert fit.startswith("$@nyul.fit(") and "Compose(@loading)" in fit
