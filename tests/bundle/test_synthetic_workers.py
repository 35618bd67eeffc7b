"""Generating a cohort in spawned worker processes (``workers > 1``) gives the serial cohort, file for file.

Each spawned worker starts a fresh interpreter (torch, MONAI, the generator), which is why this lives
outside tests/unit."""

from __future__ import annotations

import numpy as np
import pytest
from scripts.synthetic import brain as synth
from tests.helpers import load_nifti, read_cohort_csv

SHAPE = 40


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory):
    """The small T1w cohort of tests/unit/test_synthetic.py (4 normal + 4 abnormal, 40^3, seed 0), serially."""
    root = tmp_path_factory.mktemp("synth")
    return {"t1": synth.generate_cohort(root / "t1", n_normal=4, n_abnormal=4, shape=SHAPE, contrast="t1", seed=0)}


@pytest.mark.slow
def test_workers_give_the_same_cohort(cohorts, tmp_path):
    out = synth.generate_cohort(tmp_path / "par", n_normal=4, n_abnormal=4, shape=SHAPE, seed=0, workers=2)
    assert read_cohort_csv(out) == read_cohort_csv(cohorts["t1"])
    for r in read_cohort_csv(out):
        for key in ("image", "label", "mask"):
            assert np.array_equal(load_nifti(out / r[key])[0], load_nifti(cohorts["t1"] / r[key])[0])
