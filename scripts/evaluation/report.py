"""Evaluation of a finished inference run against ground truth (``configs/evaluate.json``).

Reads the written outputs (``<output_dir>/<stem>_anomaly.nii.gz`` on each input file's grid, and
``scores.csv``) together with the input images, labels and masks, streams them twice through
:class:`scripts.evaluation.metrics.CohortEvaluator` (pass 1: histograms and lesion peaks; pass 2: predicted
components at the 99 %-TNR threshold), and writes ``metrics.json``, ``lesions.csv``, ``gt_lesions.csv``
and the PNG figures next to the maps. Metrics are computed at the input resolution, as in the paper.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from monai.transforms import LoadImage
from scripts.errors import CS3FInputError
from scripts.evaluation.metrics import evaluate_cohort, format_table

__all__ = ["evaluate_outputs"]


def _read_scores(path: Path) -> dict[str, float]:
    if not path.is_file():
        raise CS3FInputError(f"no {path.name} in {path.parent}: run the inference before the evaluation")
    with path.open(newline="") as f:
        return {row["image"]: float(row["score"]) for row in csv.DictReader(f)}


def evaluate_outputs(datalist: Sequence[dict], output_dir: str | Path, plots: bool = True, quiet: bool = False) -> dict:
    """Metrics of the maps in ``output_dir`` for the volumes of ``datalist``.

    Args:
        datalist: rows with ``image``, ``name`` and optionally ``label`` (absent or all-zero = normal
            subject) and ``mask`` (foreground; absent = all voxels), as made by
            :func:`scripts.engine.datalist.make_datalist` with ``labels=True``.
        output_dir: the inference output folder; the report is written there too.
        plots: write the ROC/PR curves and the per-subject overlay montages.
        quiet: do not print the metric table.

    Returns:
        the metrics dict (also in ``<output_dir>/metrics.json``).
    """
    out = Path(output_dir)
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
