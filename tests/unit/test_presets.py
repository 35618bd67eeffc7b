"""The paper presets set every parameter of the paper's Table 2 (and Sec. 4.1's preprocessing)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from monai.bundle import ConfigParser
from tests.helpers import run_workflow

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
        "delta": 0.0,
        "rho": 0.1,
        "L": 16,
        "d": 128,
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
        "delta": 0.0,
        "rho": 0.1,
        "L": 16,
        "d": 128,
    },
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
        assert parser.get_parsed_content(key) == value, key
    assert parser.get_parsed_content("variant") in ("C", "F", "MS")  # every variant is the paper's
    inferer, network = parser.get("inferer"), parser.get("network_def")
    assert inferer["q"] == "@q" and inferer["q_fine"] == "@q_fine"  # the inferer reads the preset
    assert network["name"] == "@encoder_name" and network["layers"] == "@layers"


def test_brain_preset_standardises_with_nyul_after_the_crop_and_resize() -> None:
    parser = _parser("brain")
    names = [type(t).__name__ for t in parser.get_parsed_content("preprocessing").transforms]
    assert names.index("CenterSpatialCropd") < names.index("Resized") < names.index("NyulStandardized")
    assert names.index("NyulStandardized") < names.index("ScaleIntensityd")
    assert any("nyul.fit" in step for step in parser.get("initialize"))


def test_brain_preset_runs_with_the_standard_scale_learned_from_the_cohort(tiny_cohort: Path, tmp_path: Path) -> None:
    """The preset's pipeline end to end at tiny sizes (the default encoder stands in for DINOv2)."""
    evaluator = run_workflow(
        ["configs/inference.json", "configs/paper_brain_mri.json"],
        dataset_dir=str(tiny_cohort),
        output_dir=str(tmp_path / "out"),
        encoder_name="efficientnet_lite0",
        layers=None,
        crop_size=[24, 24, 24],
        spatial_size=[32, 32, 32],
        q=[8, 8, 8],
        q_fine=[2, 2, 2],
        **{"dataloader#num_workers": 0},
    )
    nyul = next(t for t in evaluator.data_loader.dataset.transform.transforms if type(t).__name__ == "NyulStandardized")
    standard = nyul.standardize.standard
    assert standard is not None and len(standard) == 11 and all(standard[1:] >= standard[:-1])
    with (tmp_path / "out" / "scores.csv").open(newline="") as f:
        assert len(list(csv.DictReader(f))) == 6
