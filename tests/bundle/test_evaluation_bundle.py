"""The evaluation overlay: inference + metrics on a labelled cohort writes the full report."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from scripts.evaluation.metrics import ARCHITECTURE_KEYS
from tests.helpers import run_workflow


def test_evaluate_overlay_writes_metrics_and_report(tiny_cohort: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    run_workflow(["configs/inference.json", "configs/evaluate.json"], dataset_dir=str(tiny_cohort), output_dir=str(out))
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(ARCHITECTURE_KEYS) <= set(metrics)
    for key in ("patient_auroc", "patient_ap", "voxel_auroc", "voxel_ap", "dice_max", "iou_max"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["fp_per_volume"] >= 0
    # The patient metrics are those of scores.csv against the cohort's abnormal flags (independent check).
    with open(tiny_cohort / "cohort.csv") as f:
        truth = {Path(r["image"]).name.removesuffix(".nii.gz"): int(r["abnormal"]) for r in csv.DictReader(f)}
    with open(out / "scores.csv") as f:
        scores = {r["image"]: float(r["score"]) for r in csv.DictReader(f)}
    pos = np.array([scores[n] for n in truth if truth[n]])
    neg = np.array([scores[n] for n in truth if not truth[n]])
    pairs = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    assert abs(metrics["patient_auroc"] - pairs) < 1e-9
    for name in ("lesions.csv", "gt_lesions.csv", "roc_pr_patient.png", "roc_pr_voxel.png"):
        assert (out / name).stat().st_size > 0, name
    overlays = sorted((out / "overlays").glob("*.png"))
    assert len(overlays) == sum(truth.values())
