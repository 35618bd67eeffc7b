"""The quality study's harness on one tiny cohort: runs, shared token caches, baselines, report."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scripts.benchmarks.quality import COHORTS, METRICS, _cache_key, doc_markers, run_quality
from scripts.engine.datalist import make_datalist


@pytest.mark.slow
def test_quick_study_runs_variants_and_baselines(tmp_path: Path) -> None:
    out = tmp_path / "q"
    (tmp_path / "q.md").write_text("# Quality\n\nHand-written analysis.\n")
    results = run_quality(out, cohorts=["t1-tiny"], variants=["run-C", "C-rho0.2"], quick=True, doc=tmp_path / "q.md")
    assert set(results) == {"run-C", "C-rho0.2", "baseline-zscore", "baseline-random"}
    for method, by_cohort in results.items():
        metrics = by_cohort["t1-tiny"]["metrics"]
        assert set(metrics) == set(METRICS) and 0.0 <= metrics["patient_auroc"] <= 1.0, method
    # rho only changes scores: the second variant read every token from the first one's cache
    run = json.loads((out / "runs" / "t1-tiny" / "C-rho0.2" / "run.json").read_text())
    assert run["encoded_volumes"] == 0 and run["cached_volumes"] == 5
    assert _cache_key({"rho": 0.2}) == _cache_key({}) != _cache_key({"q": [4, 4, 4]})
    report = (tmp_path / "q.md").read_text()
    assert report.startswith("# Quality\n\nHand-written analysis.\n")  # the block is appended, nothing lost
    assert report.rstrip().endswith(doc_markers(out)[1]) and "## Detection quality (generated)" in report
    assert "| run-C | 1/1 |" in report and "baseline-zscore" in report and "python -m monai.bundle run" in report
    # The z-score baseline against an independent computation at one voxel.
    rows = make_datalist(out / "cohorts" / "t1-tiny").rows
    images = [np.asarray(nib.load(r["image"]).dataobj, dtype=np.float64) for r in rows]
    images = [v / np.percentile(v, 99.5) for v in images]
    mask = np.asarray(nib.load(rows[0]["mask"]).dataobj) > 0
    at = tuple(np.argwhere(mask)[len(np.argwhere(mask)) // 2])
    others = np.array([v[at] for v in images[1:]])
    expected = abs(images[0][at] - others.mean()) / np.sqrt(others.var() + 1e-4)
    got = np.asarray(
        nib.load(out / "runs" / "t1-tiny" / "baseline-zscore" / f"{rows[0]['name']}_anomaly.nii.gz").dataobj
    )
    assert abs(float(got[at]) - expected) < 1e-3 * max(1.0, expected)


@pytest.mark.slow
def test_map_variants_from_one_scoring_pass_equal_the_bundle_runs(tmp_path: Path) -> None:
    """C and C smoothed by 4 mm made from the MS scoring pass equal the bundle runs ``--variant C
    --smooth_mm 0`` and ``--variant C --smooth_mm 4``: the same maps, the same metrics."""
    results = run_quality(
        tmp_path / "q",
        cohorts=["t1-tiny"],
        variants=["run-C", "run-C-smooth4"],
        maps=["C", "F"],
        smooth=[0, 4],
        quick=True,
    )
    assert {"run-C", "run-C-smooth4", "C", "C-smooth4", "F", "F-smooth4"} <= set(results)
    assert "--variant C" in results["run-C"]["t1-tiny"]["command"]  # a bundle run, not a map variant
    for bundle_run, from_maps in (("run-C", "C"), ("run-C-smooth4", "C-smooth4")):
        want, got = results[bundle_run]["t1-tiny"]["metrics"], results[from_maps]["t1-tiny"]["metrics"]
        for key in METRICS:
            assert (want[key] is None and got[key] is None) or abs(want[key] - got[key]) < 1e-6, (bundle_run, key)
    assert results["C"]["t1-tiny"]["metrics"] != results["C-smooth4"]["t1-tiny"]["metrics"]
    assert "--smooth_mm 4.0" in results["F-smooth4"]["t1-tiny"]["command"]


def test_the_study_cohorts_are_fixed() -> None:
    """T1 and T2, two seeds each, B = 32 and 64, and one non-default lesion setting."""
    assert {s["contrast"] for s in COHORTS.values()} == {"t1", "t2"}
    assert {s["n_normal"] + s["n_abnormal"] for s in COHORTS.values()} == {32, 64}
    assert any("lesion_volume" in s for s in COHORTS.values())


def test_the_confirmation_cohorts_repeat_the_study_cohorts_with_new_seeds() -> None:
    from scripts.benchmarks.cohorts import CONFIRMATION_COHORTS

    def without_seed(spec: dict) -> dict:
        return {k: v for k, v in spec.items() if k != "seed"}

    study = sorted(map(json.dumps, map(without_seed, COHORTS.values())))
    assert sorted(map(json.dumps, map(without_seed, CONFIRMATION_COHORTS.values()))) == study
    seeds = [s["seed"] for s in CONFIRMATION_COHORTS.values()]
    assert len(set(seeds)) == 5 and not set(seeds) & {s["seed"] for s in COHORTS.values()}
    assert not set(CONFIRMATION_COHORTS) & set(COHORTS)
