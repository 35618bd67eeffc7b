"""Detection quality over fixed synthetic cohorts: ``python -m scripts.benchmarks quality``.

Each variant (config overrides) runs the bundle with ``configs/evaluate.json`` on every cohort (variants that
tokenize alike share a token cache), beside a cross-subject voxel z-score and random maps; the report gives
mean ± sd over the cohorts. A run finished in ``out`` with the same command is read back, so a study resumes
and ``--cohorts`` invocations can fill one ``out`` side by side; after a config changes, use a new ``out``.
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

from scripts.benchmarks.cohorts import COHORTS, CONFIRMATION_COHORTS, METRICS, QUICK_COHORTS, SEALED_COHORTS, cohort
from scripts.benchmarks.common import ROOT, bundle_command
from scripts.benchmarks.tables import table, write_block
from scripts.engine.identity import SCORING_ONLY

#: CS3F-C as the paper has it, on the default encoder: 8-slice tokens of EfficientNet-Lite0's stride-8
#: and stride-16 stages at one pooling phase, no smoothing, the map's maximum as subject score
PAPER = {"variant": "C", "q": [8, 8, 8], "layers": ["stage3", "stage5"], "smooth_mm": 0.0, "subject_score": "max"}
PAPER["depth_phases"] = 1
_Q4 = {**PAPER, "q": [4, 4, 4]}
#: variant name -> config overrides (on top of configs/inference.json + configs/evaluate.json); every
#: key but the default's is spelled out, so that a name keeps its meaning when the default changes
VARIANTS: dict[str, dict] = {
    "default": {},
    "paper": PAPER,
    # earlier defaults, one change at a time: 4-slice tokens with 4 mm smoothing; the stride-8 stage
    # alone with 6 mm; the robust-z subject score
    "q4-C-smooth4": {**_Q4, "smooth_mm": 4.0},
    "q4-C-stage3-smooth6": {**_Q4, "layers": ["stage3"], "smooth_mm": 6.0},
    "q4-C-stage3-smooth6-zscore": {**_Q4, "layers": ["stage3"], "smooth_mm": 6.0, "subject_score": "robust_z"},
}
#: the sealed set's variants: the default, the paper's method, and the default with one departure from the
#: paper taken back at a time
SEALED_VARIANTS: dict[str, dict] = {
    "default": {},
    "paper": PAPER,
    "default-phases1": {"depth_phases": 1},
    "default-smooth0": {"smooth_mm": 0.0},
    "default-q8": {"q": [8, 8, 8]},
    "default-stage3+5": {"layers": ["stage3", "stage5"]},
    # the paper's method with the departures that stayed (the default that the rule leaves)
    "paper-phases2": {**PAPER, "depth_phases": 2},
}
#: cohort set name -> (cohorts, variants run by default)
SETS = {"study": (COHORTS, VARIANTS), "confirmation": (CONFIRMATION_COHORTS, VARIANTS)}
SETS["sealed"] = (SEALED_COHORTS, SEALED_VARIANTS)
#: paired differences against the default are reported for these metrics
PAIRED = ("patient_auroc", "voxel_ap", "dice_max")
#: the sealed set's rule (docs/quality.md): metric -> sign that makes a larger value better
RULE = {"patient_auroc": 1, "voxel_ap": 1, "dice_max": 1, "fp_per_volume": -1}
BASELINES = ("zscore", "random")
#: overrides of the quick (smoke) runs: tiny encoder input
QUICK_OVERRIDES = {"image_size": 32, "q": [8, 8, 8]}
# Overrides that change scores but not tokens: variants differing only in these share a token cache.
_SCORING_ONLY = (*SCORING_ONLY, "plots", "quiet")


def _cache_key(overrides: Mapping) -> str:
    """Variants that tokenize alike (same non-scoring overrides; F/MS add fine tokens) share a cache."""
    shaping = {k: v for k, v in overrides.items() if k not in _SCORING_ONLY}
    shaping["fine"] = overrides.get("variant", "C") != "C"
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:12]


def _stream(cmd: Sequence[str], label: str) -> tuple[int, str]:
    """Run a bundle command, passing its progress lines on; its exit code and last stderr line."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    last = ""
    for line in proc.stderr:
        line = line.rstrip()
        last = line or last
        if line.startswith("cs3f: "):
            print(f"  [{label}] {line[6:]}", file=sys.stderr, flush=True)
    return proc.wait(), last


def _run_variant(cohort: Path, out: Path, cache: Path, overrides: Mapping, lung: bool = False) -> dict:
    args = {"dataset_dir": cohort, "output_dir": out, "evaluator#cache_dir": cache, "plots": False, **overrides}
    configs = ["configs/inference.json", *(["configs/lung_ct.json"] if lung else []), "configs/evaluate.json"]
    cmd = bundle_command(configs, args)
    shown, done = shlex.join(["python", *cmd[1:]]), out / "quality_run.json"
    if done.is_file() and (earlier := json.loads(done.read_text())).get("command") == shown:
        return earlier  # finished by an earlier or a parallel invocation: a study resumes
    start = time.perf_counter()
    returncode, last_line = _stream(cmd, f"{cohort.name}/{out.name}")
    wall = time.perf_counter() - start
    if returncode != 0:
        return {"error": [last_line or "failed"], "command": shown}
    metrics = json.loads((out / "metrics.json").read_text())
    run = json.loads((out / "run.json").read_text())
    result = {
        "metrics": {k: metrics.get(k) for k in METRICS},
        "stages_s": sum(run.get("timings_s", {}).values()),
        "wall_s": round(wall, 1),
        "command": shown,
    }
    done.write_text(json.dumps(result))
    return result


def _baseline_maps(cohort: Path, out: Path, kind: str, seed: int = 0) -> dict:
    """Write baseline maps for ``cohort`` into ``out`` and evaluate them like the bundle's (random maps need
    no common grid; the voxel z-score does)."""
    import nibabel as nib
    import numpy as np
    from scripts.engine.datalist import make_datalist
    from scripts.evaluation.report import evaluate_outputs
    from scripts.storage.atomic import atomic_write_csv

    rows = make_datalist(cohort, labels=True, require_same_grid=kind == "zscore").rows
    volumes = [nib.load(row["image"]) for row in rows]
    if kind == "zscore":
        images = [np.asarray(image.dataobj, dtype=np.float32) for image in volumes]
        stack = np.stack([v / max(float(np.percentile(v, 99.5)), 1e-6) for v in images])  # the bundle's scaling
        total, total_sq, b = stack.sum(0), (stack**2).sum(0), len(volumes)
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    scores = []
    for i, (row, image) in enumerate(zip(rows, volumes, strict=True)):
        mask = np.asarray(nib.load(row["mask"]).dataobj) > 0 if "mask" in row else np.ones(image.shape, bool)
        if kind == "zscore":  # each voxel against the same voxel of the other volumes
            mean = (total - stack[i]) / (b - 1)
            var = np.maximum((total_sq - stack[i] ** 2) / (b - 1) - mean**2, 0.0)
            amap = np.abs(stack[i] - mean) / np.sqrt(var + 1e-4)
        else:
            amap = rng.random(image.shape, dtype=np.float32)
        amap = (amap * mask).astype(np.float32)
        nib.save(nib.Nifti1Image(amap, image.affine), out / f"{row['name']}_anomaly.nii.gz")
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
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.3f} ± {sd:.3f}" if values else None)
        times = [r["stages_s"] for r in good if "stages_s" in r]
        cells.append(f"{statistics.mean(times):.1f}" if times else None)
        rows.append(cells)
    return rows


def _paired(results: Mapping[str, Mapping[str, dict]], a: str, b: str, key: str, only=None) -> tuple[float, float]:
    """Mean over the cohorts (all, or ``only``) of ``a - b`` on ``key`` and its SE (NaN below two cohorts)."""
    diffs = []
    for name, run in results.get(a, {}).items():
        x, y = (r.get("metrics", {}).get(key) for r in (run, results.get(b, {}).get(name, {})))
        numbers = isinstance(x, int | float) and isinstance(y, int | float)
        if (only is None or name in only) and numbers and math.isfinite(x - y):
            diffs.append(x - y)
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
    return (statistics.mean(diffs) if diffs else float("nan")), se


def paired_differences(results: Mapping[str, Mapping[str, dict]], reference: str = "default") -> list[list]:
    """Per method and metric of :data:`PAIRED`: mean over the cohorts of (method - ``reference``) ± its
    standard error (sd of the paired differences / sqrt(n))."""
    rows = []
    for method in [m for m in results if m != reference and reference in results]:
        pairs = [_paired(results, method, reference, key) for key in PAIRED]
        cells = [f"{m:+.3f} ± {se:.3f}" if m == m else None for m, se in pairs]
        if any(cells):  # a cohort in common (not so for the lung cohort's rows)
            rows.append([f"{method} - {reference}", *cells])
    return rows


def verdicts(results: Mapping[str, Mapping[str, dict]], cohorts: Mapping[str, dict]) -> list[list]:
    """The sealed set's rule (docs/quality.md) per departure: the default against each ``default-*`` variant,
    each ``paper-*`` variant against ``paper``; kept minus revert ± SE per metric of :data:`RULE` (+ favours
    the departure) and on the glioma-like cohorts' patient AUROC, and the verdict."""
    glioma = {n for n, s in cohorts.items() if s.get("lesion_volume", (0, 0))[0] >= 100000}
    pairs = [("default", m) for m in results if m.startswith("default-")]
    pairs += [(m, "paper") for m in results if m.startswith("paper-")]
    rows = []
    for kept, revert in [(a, b) for a, b in pairs if a in results and b in results]:
        diffs = [(sign * m, se) for key, sign in RULE.items() for m, se in [_paired(results, kept, revert, key)]]
        g, g_se = _paired(results, kept, revert, "patient_auroc", glioma)
        stays = any(m > se for m, se in diffs) and not any(m < -se for m, se in diffs) and g >= -g_se
        if kept == "default":  # the revert's overrides name the departure
            moved = list(SEALED_VARIANTS.get(revert, {}))
        else:  # where the paper-* variant leaves the paper's method
            moved = [k for k, v in SEALED_VARIANTS.get(kept, {}).items() if v != PAPER.get(k)]
        departure = ", ".join(f"{k} (paper: {PAPER.get(k)})" for k in moved)
        cells = [f"{m:+.3f} ± {se:.3f}" for m, se in [*diffs, (g, g_se)]]
        rows.append([f"{kept}: {departure}", *cells, "stays" if stays else "the paper's choice returns"])
    return rows


def render(results: Mapping[str, Mapping[str, dict]], cohorts: Mapping[str, dict], level: int = 1) -> str:
    """The markdown report: summary table, paired differences, cohorts and the command of every run; at
    ``level`` > 1 (a block inside a document) only the two tables: the full report is ``<out>/quality.md``."""
    title, sub = "#" * level, "#" * (level + 1)
    lines = [f"{title} Detection quality (generated)", "", "Generated by `python -m scripts.benchmarks quality`.", ""]
    if level > 1:
        lines = ["Generated by `python -m scripts.benchmarks quality` (runs and commands: `<out>/quality.md`).", ""]
    lines += ["Mean ± sd over the cohorts (a method's failed runs are counted in `ok`).", ""]
    lines.append(table(["method", "ok", *METRICS, "stages (s)"], _summary(results)))
    if "default" in results:
        lines += ["", "Paired differences against the default: mean over the cohorts ± its standard error.", ""]
        lines.append(table(["difference", *PAIRED], paired_differences(results)))
    if rows := verdicts(results, cohorts):
        lines += ["", "The rule per departure: kept - revert ± SE, + favours the departure (fewer FP per volume).", ""]
        lines.append(table(["departure", *RULE, "patient_auroc, glioma-like", "verdict"], rows))
    if level > 1:
        return "\n".join(lines) + "\n"
    lines += ["", f"{sub} Cohorts", ""]
    lines.append(table(["cohort", "generator arguments"], [[n, json.dumps(s)] for n, s in cohorts.items()]))
    lines += ["", f"{sub} Runs", ""]
    rows = [[m, c, r.get("command", ""), r.get("error", "")] for m, rs in results.items() for c, r in rs.items()]
    lines.append(table(["method", "cohort", "command", "error"], rows))
    return "\n".join(lines) + "\n"


def doc_markers(out: str | Path) -> tuple[str, str]:
    """The marker lines of one study's block in a document: one block per working folder."""
    begin = f"<!-- BEGIN GENERATED by `python -m scripts.benchmarks quality --out {out}` -->"
    return begin, f"<!-- END GENERATED quality --out {out} -->"


def run_quality(
    out: str | Path = "bench_out/quality",
    cohorts: Sequence[str] | None = None,
    variants: Sequence[str] | None = None,
    quick: bool = False,
    doc: str | Path | None = None,
    cohort_set: str = "study",
) -> dict:
    """Run the study (``cohort_set``: :data:`SETS`) into ``out``: ``quality.json``, ``quality.md``, ``doc``'s block.

    Raises:
        KeyError: an unknown cohort or variant name.
    """
    from scripts.storage.atomic import atomic_write_json, atomic_write_text

    out = Path(out)
    set_cohorts, set_variants = SETS[cohort_set]
    table_of = QUICK_COHORTS if quick else set_cohorts
    chosen = {n: table_of[n] for n in (cohorts or table_of)}
    known = {**VARIANTS, **SEALED_VARIANTS}
    names = list(variants or set_variants)
    if unknown := [n for n in names if n not in known]:
        raise KeyError(f"unknown variants {unknown}; choose from {list(known)}")
    results: dict[str, dict[str, dict]] = {}
    for cohort_name, spec in chosen.items():
        cohort_dir = cohort(out / "cohorts", cohort_name, spec)
        # configs/lung_ct.json has none of the brain default's departures (its q, phases and smoothing are the
        # paper's): a lung cohort runs it once, reported apart, with random maps (its CTs share no grid)
        lung = spec.get("organ") == "lung"
        prefix = "lung-" if lung else ""
        for name in ["default"] if lung else names:
            overrides = {**(QUICK_OVERRIDES if quick else {}), **known[name]}
            cache = out / "tokens" / cohort_name / _cache_key(overrides)
            run_dir = out / "runs" / cohort_name / name
            run = _run_variant(cohort_dir, run_dir, cache, overrides, lung)
            results.setdefault(prefix + name, {})[cohort_name] = run
        for kind in ["random"] if lung else BASELINES:
            run_dir = out / "runs" / cohort_name / f"baseline-{kind}"
            results.setdefault(f"{prefix}baseline-{kind}", {})[cohort_name] = _baseline_maps(cohort_dir, run_dir, kind)
    atomic_write_json(out / "quality.json", {"cohorts": chosen, "results": results})
    atomic_write_text(out / "quality.md", render(results, chosen))
    if doc is not None:
        write_block(Path(doc), *doc_markers(out), render(results, chosen, level=2).rstrip("\n"))
    return results
