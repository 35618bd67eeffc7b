"""What a newcomer sees: named stages without cursor codes in a log file, no stale evaluation files, and one
line about the foreground when a cohort has no masks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tests.helpers import assert_success, run_bundle

TINY = ("--image_size", "32", "--q", "[8,8,8]")
EVALUATION_FILES = ("metrics.json", "lesions.csv", "gt_lesions.csv", "roc_pr_patient.png", "roc_pr_voxel.png")


@pytest.mark.slow
def test_a_log_file_names_every_stage_and_a_rescore_leaves_no_stale_evaluation(
    tiny_cohort: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    evaluated = run_bundle(
        "--dataset_dir", tiny_cohort, "--output_dir", out, *TINY,
        config_file=["configs/inference.json", "configs/evaluate.json"],
    )  # fmt: skip
    assert_success(evaluated)
    # stderr is a pipe here, as a log file is: plain lines, every stage named, no cursor codes
    log = evaluated.stderr
    for stage in ("cs3f: encoding volume 6/6", "cs3f: scoring ", "volume pair", "cs3f: writing maps 6/6"):
        assert stage in log, log[-3000:]
    assert "\x1b[" not in log and "\r" not in log
    assert "Engine run" not in log and "Epoch[" not in log  # ignite's epochs are the two passes
    assert all((out / name).is_file() for name in EVALUATION_FILES) and any((out / "overlays").glob("*.png"))
    machine = json.loads((out / "run.json").read_text())["machine"]  # timings compare through this rate
    assert machine["cpu_gemm_gflops"] > 0 and machine["torch_threads"] >= 1
    # a rescore without the evaluation leaves nothing of the old report beside the new maps
    rescored = run_bundle("--dataset_dir", tiny_cohort, "--output_dir", out, "--rho", "0.5", "--quiet", "true", *TINY)
    assert_success(rescored)
    assert not any((out / name).exists() for name in EVALUATION_FILES) and not (out / "overlays").exists()
    assert (out / "scores.csv").is_file() and len(list(out.glob("*_anomaly.nii.gz"))) == 6
    assert "encoding volume" not in rescored.stderr and "scoring " not in rescored.stderr  # quiet: no progress


def test_a_cohort_without_masks_says_what_the_foreground_is(tiny_cohort: Path, tmp_path: Path) -> None:
    data = tmp_path / "flat"
    data.mkdir()
    for image in sorted((tiny_cohort / "images").glob("*.nii.gz"))[:3]:
        shutil.copy(image, data / image.name)
    proc = run_bundle("--dataset_dir", data, "--output_dir", tmp_path / "out", "--quiet", "true", *TINY)
    assert_success(proc)
    notes = [line for line in proc.stderr.splitlines() if "no foreground masks" in line]
    assert len(notes) == 1 and str(data) in notes[0] and "every voxel is foreground" in notes[0]
    masked = run_bundle("--dataset_dir", tiny_cohort, "--output_dir", tmp_path / "o2", "--quiet", "true", *TINY)
    assert_success(masked)
    assert "no foreground masks" not in masked.stderr
