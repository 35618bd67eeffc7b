"""The quality study's harness on one tiny cohort: runs, shared token caches, baselines, report."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scripts.benchmarks.quality import COHORTS, METRICS, _cache_key, doc_markers, run_quality
from scripts.engine.datalist import make_datalist


def test_quick_study_runs_variants_and_baselines(tmp_path: Path) -> None:
    out = tmp_path / "q"
    (tmp_path / "q.md").write_text("# Quality\n\nHand-written analysis.\n")
    variants = ["q4-C-stage3-smooth6", "q4-C-stage3-smooth6-zscore"]
    results = run_quality(out, cohorts=["t1-tiny"], variants=variants, quick=True, doc=tmp_path / "q.md")
    assert set(results) == {*variants, "baseline-zscore", "baseline-random"}
    for method, by_cohort in results.items():
        metrics = by_cohort["t1-tiny"]["metrics"]
        assert set(metrics) == set(METRICS) and 0.0 <= metrics["patient_auroc"] <= 1.0, method
    # the subject score only changes scores: the second variant read every token from the first one's cache
    run = json.loads((out / "runs" / "t1-tiny" / variants[1] / "run.json").read_text())
    assert run["encoded_volumes"] == 0 and run["cached_volumes"] == 5
    assert _cache_key({"rho": 0.2}) == _cache_key({}) != _cache_key({"q": [4, 4, 4]})
    report = (tmp_path / "q.md").read_text()
    assert report.startswith("# Quality\n\nHand-written analysis.\n")  # the block is appended, nothing lost
    assert report.rstrip().endswith(doc_markers(out)[1]) and "## Detection quality (generated)" in report
    assert f"| {variants[0]} | 1/1 |" in report and "baseline-zscore" in report
    assert "python -m monai.bundle run" in report
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


def test_every_variant_but_the_default_spells_its_keys_out() -> None:
    from scripts.benchmarks.quality import PAPER, VARIANTS

    assert VARIANTS["default"] == {} and VARIANTS["paper"] == PAPER
    assert PAPER["subject_score"] == "max" and PAPER["depth_phases"] == 1 and PAPER["smooth_mm"] == 0
    for name, overrides in VARIANTS.items():
        assert name == "default" or set(overrides) >= set(PAPER), name
    with pytest.raises(KeyError, match="unknown variants"):
        run_quality("unused", variants=["run-C"])


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


def test_paired_differences_are_the_mean_and_standard_error_of_the_per_cohort_differences() -> None:
    from scripts.benchmarks.quality import PAIRED, paired_differences

    default = {"a": 0.5, "b": 0.6, "c": 0.9}
    other = {"a": 0.7, "b": 0.6, "c": 1.0}
    results = {
        name: {c: {"metrics": dict.fromkeys(PAIRED, v[c])} for c in v}
        for name, v in (("default", default), ("x", other))
    }
    diffs = [0.2, 0.0, 0.1]
    mean = sum(diffs) / 3
    se = (sum((d - mean) ** 2 for d in diffs) / 2) ** 0.5 / 3**0.5
    assert paired_differences(results) == [["x - default", *[f"{mean:+.3f} ± {se:.3f}"] * len(PAIRED)]]


def test_the_sealed_set_spans_what_it_promises() -> None:
    """At least 8 cohorts, B from 16 to 96, T1/T2/FLAIR-like, metastasis- and glioma-sized lesions, lung CT;
    seeds unused by the study's and confirmation cohorts."""
    from scripts.benchmarks.cohorts import CONFIRMATION_COHORTS, SEALED_COHORTS
    from scripts.benchmarks.quality import SETS

    specs = list(SEALED_COHORTS.values())
    assert len(specs) >= 8 and SETS["sealed"][0] is SEALED_COHORTS
    sizes = {s["n_normal"] + s["n_abnormal"] for s in specs}
    assert min(sizes) == 16 and max(sizes) == 96
    assert {s.get("contrast") for s in specs} >= {"t1", "t2", "flair"}
    assert any(s.get("organ") == "lung" for s in specs)
    assert any(s.get("lesion_volume", (0, 0))[1] <= 1000 for s in specs)  # a few mm
    assert any(s.get("lesion_volume", (0, 0))[0] >= 100000 for s in specs)  # glioma-like
    used = {s["seed"] for s in (*COHORTS.values(), *CONFIRMATION_COHORTS.values())}
    assert not used & {s["seed"] for s in specs}
