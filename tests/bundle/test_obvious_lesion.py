"""The default subject score ranks a volume with an obvious, glioma-sized lesion first.

Five 16^3 brains (the default encoder at a 64-pixel input, 4-slice tokens): one with a lesion filling about a
fifth of the brain, three normal ones and an exact copy of one of them. A score that measures the peak
against the subject's own spread is at risk here: the lesion raises that spread.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
from scripts.synthetic.brain import generate_cohort
from tests.helpers import run_workflow

pytestmark = pytest.mark.slow


def _cohort(root: Path) -> tuple[Path, str]:
    """The cohort folder and the name of its lesion volume."""
    cohort = generate_cohort(
        root / "cohort",
        n_normal=3,
        n_abnormal=1,
        shape=16,
        seed=6,
        lesion_volume=(300000.0, 400000.0),
        lesion_contrast=(0.5, 0.6),
        p_hyper=1.0,
        lesions_per_subject=(1, 1),
        mass_effect=1.0,
    )
    with open(cohort / "cohort.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    normal = next(r for r in rows if r["abnormal"] == "0")
    copy = {k: v.replace(Path(normal["image"]).name, "sub-copy.nii.gz") for k, v in normal.items()}
    for key in ("image", "label", "mask"):
        shutil.copyfile(cohort / normal[key], cohort / copy[key])
    with open(cohort / "cohort.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows([*rows, copy])
    lesion = next(r for r in rows if r["abnormal"] == "1")
    return cohort, Path(lesion["image"]).name.removesuffix(".nii.gz")


def test_default_ranks_an_obvious_lesion_first(tmp_path: Path) -> None:
    cohort, lesion = _cohort(tmp_path)
    out = tmp_path / "out"
    run_workflow(dataset_dir=str(cohort), output_dir=str(out), image_size=64, q=[4, 4, 4])
    with open(out / "scores.csv", newline="") as f:
        scores = {r["image"]: r for r in csv.DictReader(f)}
    assert len(scores) == 5
    axes = ("score_sagittal", "score_coronal", "score_axial")
    others = [r for name, r in scores.items() if name != lesion]
    # the case is obvious: on every axis the lesion volume's peak is far above every other volume's
    for axis in axes:
        assert float(scores[lesion][axis]) > 1.4 * max(float(r[axis]) for r in others), axis
    ranked = sorted(scores, key=lambda name: -float(scores[name]["score"]))
    assert ranked[0] == lesion, {name: scores[name]["score"] for name in ranked}
