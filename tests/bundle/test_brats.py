"""BraTS-style folders without conversion: one folder per scan, one file per modality, a segmentation."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scripts.engine.datalist import make_datalist
from scripts.errors import CS3FInputError
from scripts.transforms.inputs import ForegroundFromImaged
from tests.helpers import run_workflow

SUFFIXES = {"2021": ("_t1", "_t1ce", "_t2", "_flair", "_seg"), "2023": ("-t1n", "-t1c", "-t2w", "-t2f", "-seg")}


def _brats(cohort: Path, root: Path, naming: str) -> dict[str, str]:
    """The synthetic cohort as a BraTS folder; the t2 file is the cohort's image, the others are
    transformed copies, the segmentation is the label with BraTS's classes (1, 2, 3)."""
    with (cohort / "cohort.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    t1, t1ce, t2, flair, seg = SUFFIXES[naming]
    names = {}
    for i, row in enumerate(rows):
        scan = f"BraTS-GLI-{i:05d}-000" if naming == "2023" else f"BraTS2021_{i:05d}"
        folder = root / scan
        folder.mkdir(parents=True)
        img = nib.load(cohort / row["image"])
        image = np.asarray(img.dataobj, dtype=np.float32) * (np.asarray(nib.load(cohort / row["mask"]).dataobj) > 0)
        label = np.asarray(nib.load(cohort / row["label"]).dataobj)
        for suffix, array in ((t1, image * 0.5), (t1ce, image + 1), (t2, image), (flair, image**2), (seg, label * 2)):
            nib.save(nib.Nifti1Image(array, img.affine), folder / f"{scan}{suffix}.nii.gz")
        names[scan + t2] = row["image"]
    return names


@pytest.mark.parametrize("naming", ["2021", "2023"])
def test_datalist_of_a_brats_folder(tiny_cohort: Path, tmp_path: Path, naming: str) -> None:
    names = _brats(tiny_cohort, tmp_path / "brats", naming)
    rows = make_datalist(tmp_path / "brats", labels=True, modality="t2")
    assert sorted(r["name"] for r in rows) == sorted(names)
    for row in rows:
        assert row["image"].endswith(f"{SUFFIXES[naming][2]}.nii.gz")
        assert row["label"].endswith(f"{SUFFIXES[naming][4]}.nii.gz")
        assert row["foreground"] == "image" and "mask" not in row
    flair = make_datalist(tmp_path / "brats", modality="flair")
    assert all(r["image"].endswith(f"{SUFFIXES[naming][3]}.nii.gz") for r in flair)
    with pytest.raises(CS3FInputError, match="modality must be one of"):
        make_datalist(tmp_path / "brats", modality="seg")


def test_the_foreground_is_the_nonzero_voxels() -> None:
    image = torch.tensor([[[[0.0, 2.0], [0.0, 5.0]]]])
    out = ForegroundFromImaged("image")({"image": image, "foreground": "image"})
    assert torch.equal(out["mask"], (image > 0).to(torch.uint8))
    untouched = ForegroundFromImaged("image")({"image": image})
    assert "mask" not in untouched


def test_a_brats_folder_runs_with_evaluation(tiny_cohort: Path, tmp_path: Path) -> None:
    _brats(tiny_cohort, tmp_path / "brats", "2023")
    out = tmp_path / "out"
    run_workflow(
        ["configs/inference.json", "configs/evaluate.json"],
        dataset_dir=str(tmp_path / "brats"),
        output_dir=str(out),
        **{"datalist#modality": "t2"},
        plots=False,
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["patient_auroc"] <= 1.0 and metrics["voxel_ap"] > 0
    # The masks came from the images: every map is 0 wherever its image is 0.
    for path in out.glob("*_anomaly.nii.gz"):
        scan = path.name.replace("_anomaly.nii.gz", "")
        image = np.asarray(nib.load(tmp_path / "brats" / scan.rsplit("-", 1)[0] / f"{scan}.nii.gz").dataobj)
        assert float(np.abs(np.asarray(nib.load(path).dataobj)[image == 0]).max()) == 0.0
