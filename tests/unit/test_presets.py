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
        "subject_score": "max",  # Sec. 3.3.4: the map's maximum
        "depth_phases": 1,  # Sec. 3.3.2: tokens pool q slices from the volume's first
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
        "subject_score": "max",
        "depth_phases": 1,
        "delta": 0.0,
        "rho": 0.1,
        "L": 16,
        "d": 128,
    },
}
#: where each parameter lives in the configs: a top-level key, or an argument of its component
IDS = {"q_fine": "inferer#q_fine", "L": "inferer#L", "delta": "inferer#delta"}
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
        **{"inferer#q_fine": [2, 2, 2], "dataloader#num_workers": 0},
    )
    nyul = next(t for t in evaluator.data_loader.dataset.transform.transforms if type(t).__name__ == "NyulStandardized")
    standard = nyul.standardize.standard
    assert standard is not None and len(standard) == 11 and all(standard[1:] >= standard[:-1])
    with (tmp_path / "out" / "scores.csv").open(newline="") as f:
        assert len(list(csv.DictReader(f))) == 6


def test_nyul_overlay_replaces_the_intensity_steps_only() -> None:
    """configs/nyul.json replaces the default's `intensity` list (percentile scaling) with Nyúl + min-max
    scaling, keeps `loading` and `finishing`, and learns the scale from the `loading` steps."""
    base = ConfigParser()
    base.read_config(str(ROOT / "configs" / "inference.json"))
    assert base.get("preprocessing#transforms") == "$@loading + @intensity + @finishing"
    base_names = [type(t).__name__ for t in base.get_parsed_content("preprocessing").transforms]
    assert base_names[5:7] == ["Resized", "ScaleIntensityRangePercentilesd"] and len(base.get("loading")) == 6
    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / f) for f in ("inference.json", "nyul.json")])
    names = [type(t).__name__ for t in parser.get_parsed_content("preprocessing").transforms]
    assert names == [*base_names[:6], "NyulStandardized", "ScaleIntensityd", *base_names[7:]]
    fit = parser.get("initialize")[-1]
    assert fit.startswith("$@nyul.fit(") and "Compose(@loading)" in fit


def test_nyul_overlay_standardises_each_volume_with_the_scale_learned_from_the_cohort(
    tiny_cohort: Path, tmp_path: Path
) -> None:
    """End to end at tiny sizes: the scale is learned at initialisation, and a volume's preprocessed image
    is its Nyúl mapping (by the learned scale) min-max scaled to [0, 1], recomputed here by hand."""
    import numpy as np
    import torch
    from monai.transforms import Compose

    evaluator = run_workflow(
        ["configs/inference.json", "configs/nyul.json"],
        dataset_dir=str(tiny_cohort),
        output_dir=str(tmp_path / "out"),
        q=[8, 8, 8],
        **{"dataloader#num_workers": 0},
    )
    transform = evaluator.data_loader.dataset.transform
    nyul = transform.transforms[6]
    standard = nyul.standardize.standard
    assert standard is not None and all(standard[1:] >= standard[:-1])
    item = evaluator.data_loader.dataset.data[0]
    loaded = Compose(transform.transforms[:6])(dict(item))
    image = np.asarray(loaded["image"], dtype=np.float64)[0]
    mask = np.asarray(loaded["mask"])[0] > 0
    marks = np.percentile(image[mask], [nyul.standardize.pc_low, *range(10, 100, 10), nyul.standardize.pc_high])
    marks = marks + np.arange(marks.size) * 1e-9 * max(1.0, float(np.abs(marks).max()))
    slope_lo = (standard[1] - standard[0]) / (marks[1] - marks[0])
    slope_hi = (standard[-1] - standard[-2]) / (marks[-1] - marks[-2])
    mapped = np.interp(image, marks, standard)
    mapped = np.where(image < marks[0], standard[0] + (image - marks[0]) * slope_lo, mapped)
    mapped = np.where(image > marks[-1], standard[-1] + (image - marks[-1]) * slope_hi, mapped)
    expected = (mapped - mapped.min()) / (mapped.max() - mapped.min())
    got = transform(dict(item))["image"][0]
    got = got[tuple(slice(0, n) for n in expected.shape)]  # the divisible padding comes after
    torch.testing.assert_close(torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(expected), atol=1e-5, rtol=0)
    with (tmp_path / "out" / "scores.csv").open(newline="") as f:
        assert len(list(csv.DictReader(f))) == 6
