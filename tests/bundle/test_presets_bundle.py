"""The brain preset and the Nyul overlays end to end at tiny sizes: the preset's fixed standard scale, and
the scale learned from the cohort at initialisation (the presets' values: tests/unit/test_presets.py)."""

from __future__ import annotations

import csv
from pathlib import Path

from scripts.transforms.intensity import MNI152_T1_STANDARD
from tests.helpers import run_workflow


def test_brain_preset_runs_with_the_fixed_standard_scale(tiny_cohort: Path, tmp_path: Path) -> None:
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
    assert nyul.standardize.standard.tolist() == list(MNI152_T1_STANDARD)
    with (tmp_path / "out" / "scores.csv").open(newline="") as f:
        assert len(list(csv.DictReader(f))) == 6


def test_nyul_overlay_standardises_each_volume_with_the_scale_learned_from_the_cohort(
    tiny_cohort: Path, tmp_path: Path
) -> None:
    """End to end at tiny sizes: the scale is learned at initialisation, and a volume's preprocessed image
    is its Nyúl mapping (by the learned scale) min-max scaled to [0, 1], recomputed here by hand."""
    import numpy as np
    import torch
    from monai.transforms import Compose

    evaluator = run_workflow(
        ["configs/inference.json", "configs/nyul.json", "configs/nyul_from_cohort.json"],
        dataset_dir=str(tiny_cohort),
        output_dir=str(tmp_path / "out"),
        q=[8, 8, 8],
        **{"dataloader#num_workers": 0},
    )
    transform = evaluator.data_loader.dataset.transform
    at = [type(t).__name__ for t in transform.transforms].index("NyulStandardized")  # after the loading steps
    nyul = transform.transforms[at]
    standard = nyul.standardize.standard
    assert all(standard[1:] >= standard[:-1]) and standard.tolist() != list(MNI152_T1_STANDARD)
    item = evaluator.data_loader.dataset.data[0]
    loaded = Compose(transform.transforms[:at])(dict(item))
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
