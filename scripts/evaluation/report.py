"""Evaluation of a finished inference run against ground truth (``configs/evaluate.json``): the report
(``metrics.json``, ``lesions.csv``, ``gt_lesions.csv``, figures) is written next to the maps."""

from __future__ import annotations

import csv
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
from monai.transforms import LoadImage
from scripts.errors import CS3FInputError
from scripts.evaluation.metrics import ARCHITECTURE_KEYS, CohortEvaluator
from scripts.storage.atomic import atomic_write_csv, atomic_write_json
from scripts.storage.outputs import OutputLock

__all__ = ["REPORT_FILES", "evaluate_cohort", "evaluate_outputs", "format_table", "report_files", "write_report"]


def _read_scores(path: Path) -> dict[str, float]:
    if not path.is_file():
        raise CS3FInputError(f"no {path.name} in {path.parent}: run the inference before the evaluation")
    with path.open(newline="") as f:
        return {row["image"]: float(row["score"]) for row in csv.DictReader(f)}


def evaluate_outputs(datalist: Sequence[dict], output_dir: str | Path, plots: bool = True, quiet: bool = False) -> dict:
    """The metrics (also written to ``<output_dir>/metrics.json``) of the maps in ``output_dir`` for the rows
    (``image``, ``name``, optional ``label`` and ``mask``) of ``datalist``; ``plots``: the figures too. Holds
    the folder's run lock meanwhile: no other run publishes into it while its maps are read and the report
    written (one line if a run holds it now)."""
    lock = OutputLock(output_dir)
    lock.acquire()
    try:
        return _evaluate_outputs(datalist, Path(output_dir), plots, quiet)
    finally:
        lock.release()


def _evaluate_outputs(datalist: Sequence[dict], out: Path, plots: bool, quiet: bool) -> dict:
    scores = _read_scores(out / "scores.csv")
    if not any("label" in row for row in datalist):
        raise CS3FInputError("evaluation needs ground-truth labels: a 'label' column or a labels/ folder")
    load = LoadImage(image_only=True)
    missing = [row["name"] for row in datalist if row["name"] not in scores]
    if missing:
        raise CS3FInputError(f"{out / 'scores.csv'} has no score for {missing[:5]}: re-run the inference")

    def _foreground(row: dict, load: LoadImage) -> np.ndarray | None:
        if "mask" in row:
            return np.asarray(load(row["mask"])) > 0
        if row.get("foreground") == "image":  # skull-stripped scans without a mask file (BraTS)
            return np.asarray(load(row["image"])) > 0
        return None

    def subjects() -> Iterator[dict]:
        for row in datalist:
            map_path = out / f"{row['name']}_anomaly.nii.gz"
            if not map_path.is_file():
                raise CS3FInputError(f"anomaly map missing: {map_path}")
            amap = load(str(map_path))
            spacing = tuple(float(s) for s in np.linalg.norm(np.asarray(amap.affine)[:3, :3], axis=0))
            yield {
                "name": row["name"],
                "score_map": np.asarray(amap),
                "label": np.asarray(load(row["label"])) if "label" in row else None,
                "mask": _foreground(row, load),
                "spacing": spacing,
                "affine": np.asarray(amap.affine),
                "subject_score": scores[row["name"]],
                "image": np.asarray(load(row["image"])),
            }

    metrics = evaluate_cohort(subjects, out_dir=out, plots=plots)
    if not quiet:
        print(format_table(metrics), flush=True)
        print(f"cs3f: metrics in {out / 'metrics.json'}, lesion report in {out / 'lesions.csv'}", flush=True)
    return metrics


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> Path:
    """``rows`` as CSV with the given columns (in that order), written atomically."""
    return atomic_write_csv(path, ([r[k] for k in columns] for r in rows), header=columns)


LESION_COLUMNS = (
    "subject component_id n_voxels volume_mm3 centroid_x_mm centroid_y_mm centroid_z_mm peak_score mean_score "
    "matched_lesion".split()
)
GT_LESION_COLUMNS = (
    "subject lesion_id n_voxels volume_mm3 diameter_mm size_class excluded centroid_x_mm centroid_y_mm "
    "centroid_z_mm peak_score detected99".split()
)


#: the files :func:`write_report` writes into the output folder (``overlays/`` holds one PNG per subject)
REPORT_FILES = ("metrics.json", "lesions.csv", "gt_lesions.csv", "roc_pr_patient.png", "roc_pr_voxel.png")


def report_files(out_dir: str | Path) -> list[Path]:
    """The files of an earlier evaluation in ``out_dir`` (a new run's publication removes them)."""
    out = Path(out_dir)
    return [out / n for n in REPORT_FILES if (out / n).is_file()] + sorted((out / "overlays").glob("*.png"))


def write_report(out_dir, evaluator: CohortEvaluator, metrics: dict | None = None, plots: bool = True) -> dict:
    """Write the report (:data:`REPORT_FILES` and ``overlays/<subject>.png``); returns ``{name: path}``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = evaluator.compute() if metrics is None else metrics
    paths = {"metrics": atomic_write_json(out / "metrics.json", metrics)}
    paths["lesions"] = _write_csv(out / "lesions.csv", evaluator.components, LESION_COLUMNS)
    paths["gt_lesions"] = _write_csv(out / "gt_lesions.csv", evaluator.gt_lesion_rows(), GT_LESION_COLUMNS)
    if plots:
        from scripts.evaluation import plots as P

        cur = evaluator.curves()
        for level, key_a, key_p in (("patient", "patient_auroc", "patient_ap"), ("voxel", "voxel_auroc", "voxel_ap")):
            p = out / f"roc_pr_{level}.png"
            P.plot_roc_pr(cur[level], p, f"{level}-level", metrics.get(key_a), metrics.get(key_p))
            paths[f"roc_pr_{level}"] = p
        for name, ov in evaluator.overlays.items():
            p = out / "overlays" / f"{_safe(name)}.png"
            P.plot_overlay(ov, p, title=name)
            paths[f"overlay:{name}"] = p
    return paths


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name) or "subject"


def format_table(metrics: Mapping) -> str:
    """The documented metrics.json keys (+ localisation rate) as a markdown table (percent for fractions)."""
    lines = ["| metric | value |", "|---|---|"]
    for k in (*ARCHITECTURE_KEYS, "localization99"):
        v = metrics.get(k)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            s = "n/a"
        elif k == "fp_per_volume":
            s = f"{v:.2f}"
        else:
            s = f"{100 * v:.1f} %"
        lines.append(f"| {k} | {s} |")
    return "\n".join(lines)


ADD_KEYS = ("name", "score_map", "label", "mask", "spacing", "subject_score", "affine")
PASS2_KEYS = ("name", "score_map", "label", "mask", "image")


def evaluate_cohort(subjects: Callable[[], Iterable[Mapping]], out_dir=None, plots: bool = True, **kwargs) -> dict:
    """The metrics of both passes over ``subjects()`` (called once per pass), dicts with keys among
    ``ADD_KEYS + ("image",)``; ``kwargs`` go to ``CohortEvaluator``; the report goes to ``out_dir`` if given."""
    ev = CohortEvaluator(**kwargs)
    for s in subjects():
        ev.add(**{k: s[k] for k in ADD_KEYS if k in s})
    for s in subjects():
        ev.add_components(**{k: s[k] for k in PASS2_KEYS if k in s})
    missing = [r.name for r in ev.subjects.values() if not r.done_pass2]
    if missing:
        warnings.warn(f"pass 2 missed {len(missing)} subject(s), e.g. {missing[:3]}", stacklevel=2)
    m = ev.compute()
    if out_dir is not None:
        write_report(out_dir, ev, m, plots=plots)
    return m
