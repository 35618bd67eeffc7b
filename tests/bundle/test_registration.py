"""``--register mni152`` end to end on a tiny native-space cohort: maps on each input's own grid, the
registration record, and a rerun that registers nothing again."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scripts.synthetic.brain import generate_cohort, summarize_cohort
from scripts.synthetic.native_space import move_cohort
from tests.helpers import FAST_ARGS, assert_success, run_bundle

pytest.importorskip("SimpleITK")


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*_anomaly.nii.gz"))}


@pytest.mark.slow
def test_register_mni152_on_a_native_space_cohort(tmp_path):
    registered = generate_cohort(tmp_path / "registered", n_normal=3, n_abnormal=1, shape=48, seed=1)
    native = move_cohort(
        registered, tmp_path / "native", seed=1, spacing=(3.0, 3.0, 4.0), generator={"seed": 1, "shape": 48}
    )
    stats = summarize_cohort(native)  # what `synth --native_space` prints: masks on the subjects' own grids
    assert stats["n_subjects"] == 4 and stats["mask_dice"] != stats["mask_dice"]  # NaN: grids differ
    out = tmp_path / "out"
    proc = run_bundle("--dataset_dir", native, "--output_dir", out, "--register", "mni152", *FAST_ARGS)
    assert_success(proc)
    rows = list(csv.DictReader((native / "cohort.csv").open()))
    for row in rows:  # each map on its own input's grid and affine
        image = nib.load(str(native / row["image"]))
        amap = nib.load(str(out / Path(row["image"]).name.replace(".nii.gz", "_anomaly.nii.gz")))
        assert amap.shape == image.shape
        assert np.allclose(amap.affine, image.affine, atol=1e-4)
    record = json.loads((out / "run.json").read_text())["registration"]
    assert sorted(record) == sorted(Path(r["image"]).name.replace(".nii.gz", "") for r in rows)
    assert all(entry["coverage"] > 0.9 and not entry["cached"] for entry in record.values())
    table = list(csv.DictReader((out / "registration.csv").open()))
    assert len(table) == len(rows) and {"metric", "coverage", "scales"} <= set(table[0])
    maps = _digest(out)
    proc = run_bundle("--dataset_dir", native, "--output_dir", out, "--register", "mni152", *FAST_ARGS)
    assert_success(proc)
    again = json.loads((out / "run.json").read_text())
    assert all(entry["cached"] for entry in again["registration"].values())  # not registered again
    assert again["cached_volumes"] == len(rows) and _digest(out) == maps
