"""Detection quality over several fixed synthetic cohorts: ``python -m scripts.benchmarks quality``.

Every variant (a set of config overrides) runs the bundle with ``configs/evaluate.json`` on every
cohort; variants that tokenize alike share a token cache, so scoring-only variants (``rho``,
``variant``, ``references``, ``edge``) cost scoring time only. Two baselines run on the same cohorts:
a cross-subject voxel z-score (each voxel against the same voxel of the other volumes) and random maps.
The report gives each metric as mean ± sd over the cohorts, with the command of each run.

The cohorts are fixed here, before any result is seen: T1 and T2, two seeds each, B = 32 and B = 64,
and one cohort with smaller, fainter lesions than the generator's defaults. Decide by the mean over
cohorts, never by one.
"""

from __future__ import annotations

import hashlib
import json
import math
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from scripts.benchmarks.cohorts import COHORTS, CONFIRMATION_COHORTS, METRICS, QUICK_COHORTS
from scripts.benchmarks.cohorts import cohort as _cohort
from scripts.benchmarks.markdown import table, write_block
from scripts.benchmarks.settings import ROOT
from scripts.engine.identity import SCORING_ONLY

__all__ = ["BASELINES", "COHORTS", "METRICS", "QUICK_COHORTS", "VARIANTS", "run_quality"]

#: EfficientNet-Lite0's stride-8 and stride-16 stages: the layers of every study before study 4
_BOTH = ["stage3", "stage5"]
#: the paper's subject score (the map's maximum), which every study before study 9 used
_PAPER_SCORE = {"subject_score": "max"}
#: the paper's tokens, pooled from the volume's first slice only (every study before study 14)
_ONE_PHASE = {"depth_phases": 1}
_C8 = {"variant": "C", "q": [8, 8, 8], "smooth_mm": 0.0, "layers": _BOTH, **_PAPER_SCORE, **_ONE_PHASE}  # CS3F-C
_MS4 = {
    "variant": "MS",
    "q": [8, 8, 8],
    "q_fine": [2, 2, 2],
    "smooth_mm": 4.0,
    "layers": _BOTH,
    **_PAPER_SCORE,
    **_ONE_PHASE,
}
_C4 = {"variant": "C", "q": [4, 4, 4], "layers": _BOTH, **_PAPER_SCORE, **_ONE_PHASE}  # 4-slice tokens (study 3)
_C4S3 = {**_C4, "layers": ["stage3"], "smooth_mm": 6.0}  # the stride-8 stage alone, 6 mm (study 4)
#: the default's tokens at two pooling phases (study 14)
_PHASES2 = {**_C4S3, "subject_score": "robust_z", "depth_phases": 2}
#: 6-slice tokens at three pooling phases, 6.5 mm (study 16)
_Q6P3 = {**_PHASES2, "q": [6, 6, 6], "depth_phases": 3, "smooth_mm": 6.5}
#: key of a variant's config overlays (files read after configs/inference.json), not a bundle key
OVERLAYS = "overlays"
#: variant name -> config overrides (on top of configs/inference.json + configs/evaluate.json), every
#: key spelled out so that a name keeps its meaning when the default changes
VARIANTS: dict[str, dict] = {
    "default": {},
    # Study 1 (CS3F-C at q = 8 unsmoothed and single changes to it) and its C / F / MS runs
    "run-C": _C8,
    "run-C-smooth4": {**_C8, "smooth_mm": 4.0},
    "run-F": {**_MS4, "variant": "F", "smooth_mm": 0.0},
    "run-MS": {**_MS4, "smooth_mm": 0.0},
    "C-rho0.2": {**_C8, "rho": 0.2},
    "C-edge-normalized": {**_C8, "inferer#edge": "normalized"},
    "R224-q4": {**_C4, "image_size": 224, "smooth_mm": 0.0},
    # Study 3: encoder stages, projection dimension and rho on top of MS + 4 mm; token size with CS3F-C
    "MS4": _MS4,
    "MS4-stage3": {**_MS4, "layers": ["stage3"]},
    "MS4-stage5": {**_MS4, "layers": ["stage5"]},
    "MS4-d256": {**_MS4, "d": 256},
    "MS4-rho0.2": {**_MS4, "rho": 0.2},
    "q4-C": {**_C4, "smooth_mm": 0.0},
    "q4-C-smooth2": {**_C4, "smooth_mm": 2.0},
    "q4-C-smooth4": {**_C4, "smooth_mm": 4.0},
    "q4-C-smooth6": {**_C4, "smooth_mm": 6.0},
    # Study 4: the stride-8 stage alone with 4-slice CS3F-C tokens (its 6 mm variant became the default)
    "q4-C-stage3-smooth4": {**_C4S3, "smooth_mm": 4.0},
    "q4-C-stage3-smooth6": _C4S3,
    # Study 5: CS3F-MS on the default's tokens (4-slice coarse, 2-slice fine, stride-8 stage)
    "MS-q4-stage3-smooth6": {**_C4S3, "variant": "MS", "q_fine": [2, 2, 2]},
    "MS-q4-stage3-smooth4": {**_C4S3, "variant": "MS", "q_fine": [2, 2, 2], "smooth_mm": 4.0},
    # Study 6: Nyúl standardisation (configs/nyul.json) in place of the percentile scaling, on the default
    "q4-C-stage3-smooth6-nyul": {**_C4S3, OVERLAYS: ["configs/nyul.json"]},
    # Study 7: a larger encoder input R on the default (14 -> 16 and 18 stride-8 patches across a slice)
    "R128-q4-C-stage3-smooth6": {**_C4S3, "image_size": 128},
    "R144-q4-C-stage3-smooth6": {**_C4S3, "image_size": 144},
    "R144-q4-C-stage3-smooth8": {**_C4S3, "image_size": 144, "smooth_mm": 8.0},
    # Study 9: the subject score against the subject's own level (the default's since study 9)
    "q4-C-stage3-smooth6-zscore": {**_C4S3, "subject_score": "robust_z"},
    # Study 12: one nearest reference volume (K = 1 for B = 32 and 64) instead of rho = 0.1's K = 3 or 6
    "q4-C-stage3-smooth6-zscore-K1": {**_C4S3, "subject_score": "robust_z", "rho": 0.03},
    # Study 13: rho between and beyond (K = 2 / 4 at 0.065; K = 6 / 12 at 0.2, the paper's range's middle)
    "q4-C-stage3-smooth6-zscore-rho0.065": {**_C4S3, "subject_score": "robust_z", "rho": 0.065},
    "q4-C-stage3-smooth6-zscore-rho0.2": {**_C4S3, "subject_score": "robust_z", "rho": 0.2},
    # Study 14: a second pooling phase (tokens also pooled from slice q / 2), the phases' maps averaged
    "q4-C-stage3-smooth6-zscore-phases2": _PHASES2,
    # Study 15: study 14's tokens with a wider Gaussian (its 6 mm had 0.016 more false positives per volume)
    "q4-C-stage3-smooth6.5-zscore-phases2": {**_PHASES2, "smooth_mm": 6.5},
    "q4-C-stage3-smooth7-zscore-phases2": {**_PHASES2, "smooth_mm": 7.0},
    # Study 16: token depth q at the default's cost: a token starts every 2 slices (q / depth_phases = 2)
    "q2-C-stage3-smooth6.5-zscore": {**_PHASES2, "q": [2, 2, 2], "depth_phases": 1, "smooth_mm": 6.5},
    "q6-C-stage3-smooth6.5-zscore-phases3": _Q6P3,
    "q8-C-stage3-smooth6.5-zscore-phases4": {**_PHASES2, "q": [8, 8, 8], "depth_phases": 4, "smooth_mm": 6.5},
    # Study 17: study 16's 6-slice tokens at three phases with a narrower Gaussian
    "q6-C-stage3-smooth5-zscore-phases3": {**_Q6P3, "smooth_mm": 5.0},
    "q6-C-stage3-smooth5.5-zscore-phases3": {**_Q6P3, "smooth_mm": 5.5},
    "q6-C-stage3-smooth6-zscore-phases3": {**_Q6P3, "smooth_mm": 6.0},
}
BASELINES = ("zscore", "random")
# Overrides that change scores but not tokens: variants differing only in these share a token cache.
_SCORING_ONLY = (*SCORING_ONLY, "plots", "quiet")  # the bundle's own list, and what it only prints or plots


def _cache_key(overrides: Mapping) -> str:
    """Variants that tokenize alike (same non-scoring overrides; F/MS add fine tokens) share a cache."""
    shaping = {k: v for k, v in overrides.items() if k not in _SCORING_ONLY}
    shaping["fine"] = overrides.get("variant", "C") != "C"
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:12]


def _command(cohort: Path, out: Path, cache: Path, overrides: Mapping, extra: Sequence[str]) -> list[str]:
    """The bundle command of a variant: its ``overlays`` (config files) after the inference config, its
    other keys as ``--key value`` overrides."""
    files = ["configs/inference.json", *overrides.get(OVERLAYS, []), "configs/evaluate.json"]
    configs = "[" + ",".join(f"'{f}'" for f in files) + "]"
    args = ["--config_file", configs, "--dataset_dir", str(cohort), "--output_dir", str(out)]
    args += ["--evaluator#cache_dir", str(cache), "--plots", "false", "--quiet", "true", *extra]
    for key, value in overrides.items():
        if key != OVERLAYS:
            args += [f"--{key}", json.dumps(value) if not isinstance(value, str) else value]
    return [sys.executable, "-m", "monai.bundle", "run", *args]


def _run_variant(cohort: Path, out: Path, cache: Path, overrides: Mapping, extra: Sequence[str]) -> dict:
    cmd = _command(cohort, out, cache, overrides, extra)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    shown = shlex.join(["python", *cmd[1:]])
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1:] or ["failed"], "command": shown}
    metrics = json.loads((out / "metrics.json").read_text())
    run = json.loads((out / "run.json").read_text())
    return {
        "metrics": {k: metrics.get(k) for k in METRICS},
        "stages_s": sum(run.get("timings_s", {}).values()),
        "wall_s": round(wall, 1),
        "command": shown,
    }


def _baseline_maps(cohort: Path, out: Path, kind: str, seed: int = 0) -> dict:
    """Write baseline maps for ``cohort`` into ``out`` and evaluate them like the bundle's."""
    import nibabel as nib
    import numpy as np
    from scripts.engine.datalist import make_datalist
    from scripts.evaluation.report import evaluate_outputs
    from scripts.storage.atomic import atomic_write_csv

    rows = make_datalist(cohort, labels=True).rows
    images = []
    for row in rows:
        data = np.asarray(nib.load(row["image"]).dataobj, dtype=np.float32)
        images.append(data / max(float(np.percentile(data, 99.5)), 1e-6))  # as the bundle's scaling
    stack = np.stack(images)
    total, total_sq, b = stack.sum(0), (stack**2).sum(0), len(images)
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    scores = []
    for i, row in enumerate(rows):
        mask = np.asarray(nib.load(row["mask"]).dataobj) > 0 if "mask" in row else np.ones(stack.shape[1:], bool)
        if kind == "zscore":  # each voxel against the same voxel of the other volumes
            mean = (total - stack[i]) / (b - 1)
            var = np.maximum((total_sq - stack[i] ** 2) / (b - 1) - mean**2, 0.0)
            amap = np.abs(stack[i] - mean) / np.sqrt(var + 1e-4)
        else:
            amap = rng.random(stack.shape[1:], dtype=np.float32)
        amap = (amap * mask).astype(np.float32)
        affine = nib.load(row["image"]).affine
        nib.save(nib.Nifti1Image(amap, affine), out / f"{row['name']}_anomaly.nii.gz")
        scores.append([row["name"], f"{float(amap.max()):.6g}"])
    atomic_write_csv(out / "scores.csv", scores, header=["image", "score"], lineterminator="\n")
    metrics = evaluate_outputs(rows, out, plots=False, quiet=True)
    return {"metrics": {k: metrics.get(k) for k in METRICS}, "command": f"baseline {kind}"}


def _summary(results: Mapping[str, Mapping[str, dict]]) -> list[list]:
    """Per method: mean ± sd over the cohorts of every metric (runs that failed are counted apart)."""
    rows = []
    for method, by_cohort in results.items():
        good = [r for r in by_cohort.values() if "metrics" in r]
        cells: list = [method, f"{len(good)}/{len(by_cohort)}"]
        for key in METRICS:
            # NaN where a cohort has no lesion of a size class: averaged over the cohorts that have one
            values = [v for r in good if isinstance(v := r["metrics"].get(key), int | float) and math.isfinite(v)]
            if not values:
                cells.append(None)
                continue
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.3f} ± {sd:.3f}")
        times = [r["stages_s"] for r in good if "stages_s" in r]
        cells.append(f"{statistics.mean(times):.1f}" if times else None)
        rows.append(cells)
    return rows


def render(results: Mapping[str, Mapping[str, dict]], cohorts: Mapping[str, dict], level: int = 1) -> str:
    """The markdown report: summary table, cohorts, and the command of every run.

    Args:
        level: heading level of its title (2 for a block inside a document such as ``docs/quality.md``).
    """
    title, sub = "#" * level, "#" * (level + 1)
    lines = [f"{title} Detection quality (generated)", "", "Generated by `python -m scripts.benchmarks quality`.", ""]
    lines += ["Mean ± sd over the cohorts (a method's failed runs are counted in `ok`).", ""]
    lines.append(table(["method", "ok", *METRICS, "stages (s)"], _summary(results)))
    lines += ["", f"{sub} Cohorts", ""]
    lines.append(table(["cohort", "generator arguments"], [[n, json.dumps(s)] for n, s in cohorts.items()]))
    lines += ["", f"{sub} Runs", ""]
    rows = [[m, c, r.get("command", ""), r.get("error", "")] for m, rs in results.items() for c, r in rs.items()]
    lines.append(table(["method", "cohort", "command", "error"], rows))
    return "\n".join(lines) + "\n"


def doc_markers(out: str | Path) -> tuple[str, str]:
    """The marker lines of one study's block in a document: one block per working folder."""
    return (
        f"<!-- BEGIN GENERATED by `python -m scripts.benchmarks quality --out {out}` -->",
        f"<!-- END GENERATED quality --out {out} -->",
    )


def run_quality(
    out: str | Path = "bench_out/quality",
    cohorts: Sequence[str] | None = None,
    variants: Sequence[str] | None = None,
    quick: bool = False,
    doc: str | Path | None = None,
    extra: Sequence[str] = (),
    maps: Sequence[str] | None = None,
    smooth: Sequence[float] = (0.0,),
) -> dict:
    """Run the study; write ``<out>/quality.json`` and ``<out>/quality.md`` (and ``doc`` if given).

    Args:
        out: working folder (cohorts, token caches, run outputs, the report).
        cohorts: names from :data:`COHORTS` or :data:`CONFIRMATION_COHORTS` (:data:`QUICK_COHORTS` with
            ``quick``); default: all of :data:`COHORTS`.
        variants: names from :data:`VARIANTS`; default: all.
        quick: tiny cohorts and a small encoder input, for a smoke run.
        doc: also write the report into this document (e.g. ``docs/quality.md``), as the block between
            :func:`doc_markers` of ``out``: replaced if it is there, appended if not; the rest of the
            document (hand-written analysis, other studies' blocks) is kept.
        extra: further command-line overrides for every bundle run.
        maps: map variants (C, F, MS) made from one MS scoring pass per cohort, each with every ``smooth``
            (``smooth_mm``) value (:mod:`scripts.benchmarks.quality_maps`); with ``maps`` and no
            ``variants``, no bundle variant runs.
        smooth: the ``smooth_mm`` values of the map variants.
    """
    from scripts.storage.atomic import atomic_write_json, atomic_write_text

    out = Path(out)
    table_of = QUICK_COHORTS if quick else {**COHORTS, **CONFIRMATION_COHORTS}
    chosen = {n: table_of[n] for n in (cohorts or (QUICK_COHORTS if quick else COHORTS))}
    names = list(variants or ([] if maps else VARIANTS))
    extra = [*(["--image_size", "32", "--q", "[8,8,8]"] if quick else []), *extra]
    results: dict[str, dict[str, dict]] = {}
    for cohort_name, spec in chosen.items():
        cohort = _cohort(out / "cohorts", cohort_name, spec)
        for name in names:
            overrides = VARIANTS[name]
            cache = out / "tokens" / cohort_name / _cache_key(overrides)
            run_dir = out / "runs" / cohort_name / name
            results.setdefault(name, {})[cohort_name] = _run_variant(cohort, run_dir, cache, overrides, extra)
        for kind in BASELINES:
            run_dir = out / "runs" / cohort_name / f"baseline-{kind}"
            results.setdefault(f"baseline-{kind}", {})[cohort_name] = _baseline_maps(cohort, run_dir, kind)
    if maps:
        from scripts.benchmarks.quality_maps import run_map_variants

        from_maps = run_map_variants(out, list(chosen), maps, smooth, quick)
        if set(from_maps) & set(results):  # a bundle variant's name must not hide a map variant's
            raise ValueError(f"variant names used twice: {sorted(set(from_maps) & set(results))}")
        results.update(from_maps)
    atomic_write_json(out / "quality.json", {"cohorts": chosen, "results": results})
    report = render(results, chosen)
    atomic_write_text(out / "quality.md", report)
    if doc is not None:
        write_block(Path(doc), *doc_markers(out), render(results, chosen, level=2).rstrip("\n"))
    return results
