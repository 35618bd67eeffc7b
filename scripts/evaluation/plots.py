"""Evaluation figures: ROC/PR curves and the per-subject overlay montage (matplotlib Agg, no pyplot)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from scripts.storage.atomic import atomic_write

GT_COLOR = "lime"
PRED_COLOR = "red"
AXIS_NAMES = ("sagittal (axis 0)", "coronal (axis 1)", "axial (axis 2)")


def _fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f} %"


def _save(fig: Figure, path) -> Path:
    """Render ``fig`` to ``path`` (format from its extension, PNG by default), atomically."""
    path = Path(path)
    FigureCanvasAgg(fig)
    fmt = path.suffix.lstrip(".") or "png"
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format=fmt))


def plot_roc_pr(curve: dict, path, title: str, auroc=None, ap=None) -> Path:
    """ROC (left) and precision-recall (right) curves from ``CohortEvaluator.curves()[level]``."""
    fig = Figure(figsize=(10, 4.6))
    ax_roc, ax_pr = fig.subplots(1, 2)
    if "fpr" in curve:
        ax_roc.plot(curve["fpr"], curve["tpr"], color="C0", lw=1.8, label=f"AUROC {_fmt(auroc)}")
        ax_roc.legend(loc="lower right")
    else:
        ax_roc.text(0.5, 0.5, "undefined (one class only)", ha="center", va="center")
    ax_roc.plot([0, 1], [0, 1], color="0.7", lw=1, ls="--")
    ax_roc.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01))
    ax_roc.set_title(f"{title} ROC")
    if "recall" in curve:
        ax_pr.step(curve["recall"], curve["precision"], where="pre", color="C1", lw=1.8, label=f"AP {_fmt(ap)}")
        ax_pr.axhline(curve["prevalence"], color="0.7", lw=1, ls="--", label="prevalence")
        ax_pr.legend(loc="upper right")
    else:
        ax_pr.text(0.5, 0.5, "undefined (no positives)", ha="center", va="center")
    ax_pr.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.01))
    ax_pr.set_title(f"{title} precision-recall")
    for ax in (ax_roc, ax_pr):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def _contour(ax, m: np.ndarray, color: str, lw: float) -> None:
    if m.any() and not m.all():
        ax.contour(m.T.astype(np.float32), levels=[0.5], colors=color, linewidths=lw, origin="lower")


def plot_overlay(ov: dict, path, title: str = "") -> Path:
    """Montage of three orthogonal slices through ``ov["voxel"]`` (see ``CohortEvaluator.overlays``):
    top row the image (if given) in gray, bottom row the score map (outside the mask: flat gray);
    ground truth contour in green,
    prediction at ``ov["threshold"]`` (the dice-max threshold) in red, a cross at the peak voxel."""
    rows = (["image"] if ov.get("image") is not None else []) + ["score"]
    sc = [np.asarray(a, dtype=np.float32) for a in ov["score"]]
    inside = np.concatenate([a[m] for a, m in zip(sc, ov["mask"], strict=True)])
    vmin, vmax = (float(inside.min()), float(inside.max())) if inside.size else (0.0, 1.0)
    sp = ov["spacing"]
    v = ov["voxel"]
    fig = Figure(figsize=(12, 4.2 * len(rows) + 0.6))
    axes = np.atleast_2d(fig.subplots(len(rows), 3))
    for r, kind in enumerate(rows):
        for a in range(3):
            ax = axes[r, a]
            h_ax, v_ax = [d for d in range(3) if d != a]
            if kind == "image":
                data, kw = ov["image"][a], {"vmin": 0, "vmax": 255, "cmap": "gray"}
            else:  # background (outside the mask) is not evaluated: shown flat gray
                data = np.ma.masked_array(sc[a], mask=~ov["mask"][a])
                kw = {"vmin": vmin, "vmax": vmax, "cmap": colormaps["inferno"].with_extremes(bad="0.25")}
            im = ax.imshow(data.T, origin="lower", aspect=sp[v_ax] / sp[h_ax], interpolation="nearest", **kw)
            _contour(ax, ov["gt"][a], GT_COLOR, 3.0)  # wide, under the prediction: both stay visible
            _contour(ax, ov["pred"][a], PRED_COLOR, 1.2)
            ax.plot(v[h_ax], v[v_ax], "+", color="cyan", ms=10, mew=1.2)
            ax.set(xticks=[], yticks=[])
            if r == 0:
                ax.set_title(f"{AXIS_NAMES[a]} = {v[a]}")
            if kind == "score" and a == 2:
                fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label="anomaly score")
    handles = [
        Line2D([], [], color=GT_COLOR, lw=3, label="ground truth"),
        Line2D([], [], color=PRED_COLOR, label=f"prediction (score >= {ov['threshold']:.4g}, dice-max)"),
        Line2D([], [], color="cyan", marker="+", ls="", label="peak voxel of top lesion"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=3, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return _save(fig, path)
