"""Map variants from one scoring pass: ``python -m scripts.benchmarks quality --maps C,F,MS --smooth 0,2,4``.

The variants ``variant`` (C, F, MS) and ``smooth_mm`` change neither the tokens nor the token scores of
an MS run: only how the token scores become voxel maps. So each cohort is tokenized and scored once (as
``--variant MS --q_fine [2,2,2]``, the bundle's own inferer built from ``configs/inference.json``), and
every (variant, smooth_mm) map set is made by the bundle's own :meth:`CS3FInferer.voxel_map` and
:func:`scripts.anomaly_map.smooth_map` and evaluated by the bundle's metric code. Each row is what the
bundle command printed beside it computes (up to the inversion to the input grid, which is the
identity on the synthetic cohorts' grids: RAS, divisible by ``q``). This makes a grid of map variants
cost one scoring pass per cohort instead of one bundle run per variant.
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from scripts.benchmarks.cohorts import COHORTS, METRICS, QUICK_COHORTS
from scripts.benchmarks.cohorts import cohort as _cohort
from scripts.benchmarks.settings import ROOT

__all__ = ["SCORED_AS", "run_map_variants"]

#: how each cohort is tokenized and scored (MS scores hold the coarse and the fine token scores): 8-slice
#: coarse tokens with 2-slice children of both EfficientNet-Lite0 stages at the paper's one pooling phase,
#: whatever the default's; the subject score is the paper's maximum, as in study 2
SCORED_AS = {
    "variant": "MS",
    "q": [8, 8, 8],
    "q_fine": [2, 2, 2],
    "layers": ["stage3", "stage5"],
    "subject_score": "max",
    "depth_phases": 1,
}


def _parser(cohort: Path, overrides: Mapping):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / "inference.json"), str(ROOT / "configs" / "evaluate.json")])
    parser.update({"bundle_root": str(ROOT), "dataset_dir": str(cohort), "quiet": True, **overrides})
    return parser


def _scored(cohort: Path, overrides: Mapping) -> tuple[list[dict], list, list, object, float]:
    """Rows, token banks and token scores of one cohort, the inferer, and the seconds it took."""
    parser = _parser(cohort, {**overrides, **SCORED_AS})
    rows = parser.get_parsed_content("datalist").rows
    dataset, network = parser.get_parsed_content("dataset"), parser.get_parsed_content("network").eval()
    inferer = parser.get_parsed_content("inferer")
    start = time.perf_counter()
    with torch.no_grad():
        items = (dataset[i] for i in range(len(dataset)))
        bank = [inferer.tokenize(item["image"], network, item.get("mask")) for item in items]
    scores = inferer.score(bank)
    return rows, bank, scores, inferer, time.perf_counter() - start


def _evaluate(rows, bank, scores, inferer, variant: str, smooth_mm: float) -> dict:
    from monai.transforms import LoadImage
    from scripts.anomaly_map import smooth_map, subject_score
    from scripts.evaluation.report import evaluate_cohort

    load = LoadImage(image_only=True)
    maps, subject_scores = [], []
    for row, tokens, token_scores in zip(rows, bank, scores, strict=True):
        mask = load(row["mask"])[None]
        amap = inferer.voxel_map(token_scores, tokens.spatial_shape, mask, variant=variant)
        amap = smooth_map(amap, smooth_mm, mask, mask.pixdim)
        maps.append(np.asarray(amap)[0])
        subject_scores.append(subject_score(amap, mask, inferer.subject_statistic))

    def subjects() -> Iterator[dict]:
        for row, amap, score in zip(rows, maps, subject_scores, strict=True):
            label, mask = load(row["label"]), load(row["mask"])
            fg = np.asarray(mask) > 0
            yield {
                "name": row["name"],
                "score_map": amap,
                "label": np.asarray(label),
                "mask": fg,
                "spacing": tuple(float(s) for s in label.pixdim),
                "affine": np.asarray(label.affine),
                "subject_score": score,
            }

    metrics = evaluate_cohort(subjects, out_dir=None, plots=False)
    # as in metrics.json: NaN (e.g. no lesion of a size class) is null
    return {k: v if isinstance(v := metrics.get(k), int | float) and np.isfinite(v) else None for k in METRICS}


def _command(cohort: Path, overrides: Mapping, variant: str, smooth_mm: float) -> str:
    args = ["python", "-m", "monai.bundle", "run", "--config_file"]
    args += ["['configs/inference.json','configs/evaluate.json']", "--dataset_dir", str(cohort)]
    for key, value in {**SCORED_AS, **overrides, "variant": variant, "smooth_mm": smooth_mm}.items():
        args += [f"--{key}", json.dumps(value) if isinstance(value, list) else str(value)]
    return shlex.join(args)


def run_map_variants(
    out: str | Path,
    cohorts: Sequence[str] | None,
    variants: Sequence[str],
    smooth_mm: Sequence[float],
    quick: bool = False,
) -> dict[str, dict[str, dict]]:
    """``{method: {cohort: {"metrics", "command", "stages_s"}}}`` for every (variant, smooth_mm), method
    names like ``F-smooth2``; the same layout as :func:`scripts.benchmarks.quality.run_quality`."""
    table_of = QUICK_COHORTS if quick else COHORTS
    overrides = {"image_size": 32, "q": [8, 8, 8]} if quick else {}
    results: dict[str, dict[str, dict]] = {}
    for name in cohorts or table_of:
        cohort = _cohort(Path(out) / "cohorts", name, table_of[name])
        rows, bank, scores, inferer, seconds = _scored(cohort, overrides)
        for variant in variants:
            for sigma in smooth_mm:
                method = f"{variant}-smooth{sigma:g}" if sigma else variant
                results.setdefault(method, {})[name] = {
                    "metrics": _evaluate(rows, bank, scores, inferer, variant, float(sigma)),
                    "command": _command(cohort, overrides, variant, float(sigma)),
                    "stages_s": round(seconds, 1),
                }
    return results
