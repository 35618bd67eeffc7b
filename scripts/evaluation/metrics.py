"""Patient-, voxel- and lesion-level metrics of the CS3F paper (Sec. 4.2, 4.5.1, 4.6), streamed over a cohort
in two passes (:func:`scripts.evaluation.report.evaluate_cohort`); definitions in docs/design.md."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from scripts.evaluation.lesions import (
    MIN_DIAMETER_MM,
    SIZE_CLASSES,
    STRUCTURE_18,
    affine_of,
    as_volume_array,
    components,
    equivalent_diameter,
    size_class,
    to_world,
)
from scripts.evaluation.ranking import NAN, FloatBins, rank_metrics, roc_pr_points

__all__ = ["ARCHITECTURE_KEYS", "CohortEvaluator"]

ARCHITECTURE_KEYS = tuple(
    "patient_auroc patient_ap patient_f1 voxel_auroc voxel_ap dice_max iou_max ltpr99_small ltpr99_medium "
    "ltpr99_large dice99 fp_per_volume".split()
)
TNR = 0.99


@dataclass
class _Subject:
    name: str
    score: float
    abnormal: bool
    shape: tuple
    spacing: tuple
    affine: np.ndarray
    n_foreground: int
    n_positive: int
    label_peak: float  # max score over label voxels inside the mask (-inf if none)
    lesions: list = field(default_factory=list)  # dicts, one per GT lesion
    overlay_voxel: tuple | None = None
    done_pass2: bool = False
    n_fp: int = 0


def _label_and_mask(shape: tuple, label, mask) -> tuple[np.ndarray, np.ndarray]:
    lab = np.zeros(shape, bool) if label is None else as_volume_array(label) > 0
    return lab, np.ones(shape, bool) if mask is None else as_volume_array(mask) > 0


class CohortEvaluator:
    """Streamed cohort evaluation: ``add`` (pass 1) per subject, ``add_components`` (pass 2), ``compute``;
    it keeps three histograms of ``2**(9 + mantissa_bits) + 1`` bins and small per-subject records."""

    def __init__(self, mantissa_bits: int = 12, tnr: float = TNR, min_diameter_mm: float = MIN_DIAMETER_MM):
        self.bins = FloatBins(mantissa_bits)
        self.tnr = float(tnr)
        self.min_diameter_mm = float(min_diameter_mm)
        n = self.bins.n_bins
        self.h_pos = np.zeros(n, np.int64)  # label > 0 foreground voxels (abnormal subjects)
        self.h_neg_abn = np.zeros(n, np.int64)  # label == 0 foreground voxels of abnormal subjects
        self.h_neg_norm = np.zeros(n, np.int64)  # foreground voxels of normal subjects
        self.subjects: dict[str, _Subject] = {}
        self.components: list[dict] = []  # predicted components at threshold99 (pass 2)
        self.overlays: dict[str, dict] = {}
        self._frozen: dict | None = None

    def add(
        self, name: str, score_map, label=None, mask=None, spacing=None, subject_score: float | None = None, affine=None
    ) -> None:
        """Pass 1: accumulate one subject.

        Args:
            score_map: ``[H, W, D]`` (or ``[1, H, W, D]``) finite scores (evaluated as float32).
            label: same shape, > 0 = lesion; ``None``: a normal subject.
            mask: the foreground; ``None``: all voxels.
            spacing: voxel size (mm); ``None``: from ``affine``, else 1 mm.
            subject_score: ``None``: the map's maximum over the foreground.
            affine: ``[4, 4]`` voxel -> world (mm); ``None``: the map's ``.affine``, else ``diag(spacing)``.
        """
        if self._frozen is not None:
            raise RuntimeError("add() after pass 2 started: all subjects must be added before add_components()")
        name = str(name)
        if name in self.subjects:
            raise ValueError(f"subject {name!r} added twice")
        if affine is None:
            affine = affine_of(score_map)
        s = as_volume_array(score_map, np.float32)
        lab, fg = _label_and_mask(s.shape, label, mask)
        if lab.shape != s.shape or fg.shape != s.shape:
            raise ValueError(f"{name}: shapes differ: score {s.shape}, label {lab.shape}, mask {fg.shape}")
        if np.isnan(s).any():
            raise ValueError(f"{name}: score map contains NaN")
        if affine is not None:
            affine = np.asarray(affine, dtype=np.float64)
        if spacing is None:
            spacing = np.linalg.norm(affine[:3, :3], axis=0) if affine is not None else (1.0, 1.0, 1.0)
        spacing = tuple(float(v) for v in np.asarray(spacing, dtype=np.float64).ravel())
        if len(spacing) != 3 or min(spacing) <= 0:
            raise ValueError(f"{name}: spacing must be 3 positive numbers, got {spacing}")
        if affine is None:
            affine = np.diag([*spacing, 1.0])
        abnormal = bool(lab.any())
        s_fg = s[fg]
        if subject_score is None:
            subject_score = float(s_fg.max()) if s_fg.size else NAN
        if not math.isfinite(float(subject_score)):
            raise ValueError(f"{name}: subject score {subject_score} is not finite")
        rec = _Subject(
            name=name,
            score=float(subject_score),
            abnormal=abnormal,
            shape=s.shape,
            spacing=spacing,
            affine=affine,
            n_foreground=int(s_fg.size),
            n_positive=0,
            label_peak=-math.inf,
        )
        if not abnormal:
            self.h_neg_norm += self.bins.histogram(s_fg)
        else:
            lab_fg = lab[fg]
            rec.n_positive = int(lab_fg.sum())
            self.h_pos += self.bins.histogram(s_fg[lab_fg])
            self.h_neg_abn += self.bins.histogram(s_fg[~lab_fg])
            rec.lesions = self._gt_lesions(s, lab, fg, spacing, affine)
            les = max(rec.lesions, key=lambda lesion: lesion["peak_score"])  # the first of equal peaks
            rec.label_peak = les["peak_score"]
            rec.overlay_voxel = les["peak_voxel"] if les["peak_voxel"] is not None else les["centroid_voxel"]
        self.subjects[name] = rec

    def _gt_lesions(self, s, lab, fg, spacing, affine) -> list[dict]:
        c = components(lab, s, fg)
        n, n_vox, peak, peak_pos, com = c["n"], c["n_voxels"], c["peak"], c["peak_voxel"], c["centroid"]
        volume = n_vox * float(np.prod(spacing))
        diameter = equivalent_diameter(volume)
        world = to_world(affine, com)
        return [
            {
                "lesion_id": i + 1,
                "n_voxels": int(n_vox[i]),
                "volume_mm3": float(volume[i]),
                "diameter_mm": float(diameter[i]),
                "size_class": size_class(float(volume[i])),
                "excluded": bool(diameter[i] < self.min_diameter_mm),
                "peak_score": float(peak[i]),
                "peak_voxel": tuple(int(v) for v in peak_pos[i]) if np.isfinite(peak[i]) else None,
                "centroid_voxel": tuple(int(round(v)) for v in com[i]),
                "centroid_mm": tuple(float(v) for v in world[i]),
            }
            for i in range(n)
        ]

    @property
    def h_neg(self) -> np.ndarray:
        return self.h_neg_abn + self.h_neg_norm

    def threshold99(self) -> float:
        """Lowest bin edge t with #{normal foreground voxels >= t} <= (1 - tnr) * #normal (NaN if none)."""
        return self._thresholds()["threshold99"]

    def _thresholds(self) -> dict:
        return self._frozen if self._frozen is not None else self._compute_thresholds()

    def _compute_thresholds(self) -> dict:
        out = {}
        neg = self.h_neg
        n_norm = int(neg.sum())
        if n_norm:
            suffix = np.cumsum(neg[::-1])[::-1]  # suffix[b] = #normal voxels in bins >= b
            above = np.flatnonzero(suffix > (1.0 - self.tnr) * n_norm)
            b99 = int(above[-1]) + 1 if above.size else 0
            n_fp = int(suffix[b99]) if b99 < len(suffix) else 0
            out.update(
                threshold99=float(self.bins.lower_edge(b99)), threshold99_bin=b99, threshold99_tnr=1 - n_fp / n_norm
            )
        else:
            out.update(threshold99=NAN, threshold99_bin=-1, threshold99_tnr=NAN)
        # dice sweep on abnormal subjects (positives vs abnormal-subject negatives), nonempty bins only
        nz = np.flatnonzero(self.h_pos | self.h_neg_abn)[::-1]
        r = rank_metrics(self.h_pos[nz], self.h_neg_abn[nz], exact=nz == self.bins.zero_bin)
        if r["argmax"] >= 0:
            b = int(nz[r["argmax"]])
            out["dice_max_threshold"], out["dice_max_bin"] = float(self.bins.lower_edge(b)), b
        else:
            out["dice_max_threshold"], out["dice_max_bin"] = NAN, -1
        out["_dice"] = r
        return out

    def add_components(self, name: str, score_map, label=None, mask=None, image=None) -> None:
        """Pass 2 for one subject: predicted components at ``threshold99`` (18-connected, inside the mask), FP
        count, lesions.csv rows; for abnormal subjects the overlay slices (``image``: optional background)."""
        if self._frozen is None:
            self._frozen = self._compute_thresholds()
        name = str(name)
        rec = self.subjects.get(name)
        if rec is None:
            raise KeyError(f"add_components({name!r}): subject was not added in pass 1")
        if rec.done_pass2:
            raise ValueError(f"add_components({name!r}) called twice")
        s = as_volume_array(score_map, np.float32)
        if s.shape != rec.shape:
            raise ValueError(f"{name}: pass-2 shape {s.shape} != pass-1 shape {rec.shape}")
        lab, fg = _label_and_mask(s.shape, label, mask)
        if bool(lab.any()) != rec.abnormal:
            raise ValueError(f"{name}: pass-2 label disagrees with pass 1 (abnormal={rec.abnormal})")
        t99 = self._frozen["threshold99"]
        rows = []
        if not math.isnan(t99):
            pred = (s >= np.float32(t99)) & fg
            c = components(pred, s)
            n = c["n"]
            if n:
                n_vox, peak, mean = c["n_voxels"], c["peak"], c["mean"]
                world = to_world(rec.affine, c["centroid"])
                matched: dict[int, list[int]] = {}
                if rec.abnormal:
                    gt, n_gt = ndimage.label(lab, structure=STRUCTURE_18)
                    g = gt.ravel()[c["flat"]]
                    hit = g > 0
                    pairs = np.unique(c["labels"][hit].astype(np.int64) * (n_gt + 1) + g[hit])
                    for p in pairs.tolist():
                        matched.setdefault(p // (n_gt + 1), []).append(p % (n_gt + 1))
                vv = float(np.prod(rec.spacing))
                for i in range(n):
                    m = matched.get(i + 1)
                    rows.append(
                        {
                            "subject": name,
                            "component_id": i + 1,
                            "n_voxels": int(n_vox[i]),
                            "volume_mm3": float(n_vox[i] * vv),
                            "centroid_x_mm": float(world[i, 0]),
                            "centroid_y_mm": float(world[i, 1]),
                            "centroid_z_mm": float(world[i, 2]),
                            "peak_score": float(peak[i]),
                            "mean_score": float(mean[i]),
                            "matched_lesion": ";".join(str(j) for j in m) if m else "FP",
                        }
                    )
        rec.n_fp = sum(r["matched_lesion"] == "FP" for r in rows)
        self.components.extend(rows)
        if rec.abnormal and rec.overlay_voxel is not None:
            self.overlays[name] = self._overlay_slices(rec, s, lab, fg, as_volume_array(image, np.float32))
        rec.done_pass2 = True

    def _overlay_slices(self, rec, s, lab, fg, image) -> dict:
        t = self._frozen["dice_max_threshold"]
        pred = (s >= np.float32(t)) & fg if math.isfinite(t) else np.zeros(s.shape, bool)
        i, j, k = rec.overlay_voxel
        cut = [np.s_[i, :, :], np.s_[:, j, :], np.s_[:, :, k]]
        d = {
            "voxel": (i, j, k),
            "spacing": rec.spacing,
            "threshold": t,
            "score": [s[c].astype(np.float16) for c in cut],
            "gt": [lab[c].copy() for c in cut],
            "pred": [pred[c].copy() for c in cut],
            "mask": [fg[c].copy() for c in cut],
            "image": None,
        }
        if image is not None:
            if image.shape != s.shape:
                raise ValueError(f"{rec.name}: image shape {image.shape} != score shape {s.shape}")
            vals = image[fg] if fg.any() else image.ravel()
            lo, hi = np.percentile(vals, [0.5, 99.5]) if vals.size else (0.0, 1.0)
            scale = 255.0 / (hi - lo) if hi > lo else 0.0
            d["image"] = [np.clip((image[c] - lo) * scale, 0, 255).astype(np.uint8) for c in cut]
        return d

    def _patient_groups(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(scores, positives, negatives)`` per distinct subject score, highest first."""
        subs = list(self.subjects.values())
        y = np.array([r.abnormal for r in subs], dtype=np.float64)
        uniq, inv = np.unique(np.array([r.score for r in subs], dtype=np.float64), return_inverse=True)
        pos = np.bincount(inv, weights=y, minlength=len(uniq))[::-1]
        return uniq[::-1], pos, np.bincount(inv, weights=1 - y, minlength=len(uniq))[::-1]

    def compute(self) -> dict:
        """All metrics as a flat dict (floats, ints, strings; NaN where undefined)."""
        th = self._thresholds()
        subs = list(self.subjects.values())
        m: dict = {}
        # patient level (exact)
        y = np.array([r.abnormal for r in subs], dtype=np.int64)
        sc = np.array([r.score for r in subs], dtype=np.float64)
        if len(subs) and 0 < y.sum() < len(y):
            import torch
            from monai.metrics import compute_roc_auc

            m["patient_auroc"] = float(compute_roc_auc(torch.from_numpy(sc), torch.from_numpy(y)))
        else:
            m["patient_auroc"] = NAN
        uniq, p_pos, p_neg = self._patient_groups()
        rp = rank_metrics(p_pos, p_neg, exact=True)
        m["patient_ap"], m["patient_f1"] = rp["ap"], rp["f1"]
        m["patient_f1_threshold"] = float(uniq[rp["argmax"]]) if rp["argmax"] >= 0 else NAN
        # voxel level (binned)
        neg = self.h_neg
        nz = np.flatnonzero(self.h_pos | neg)[::-1]
        rv = rank_metrics(self.h_pos[nz], neg[nz], exact=nz == self.bins.zero_bin)
        m["voxel_auroc"], m["voxel_ap"] = rv["auroc"], rv["ap"]
        rd = th["_dice"]
        m["dice_max"], m["iou_max"] = rd["f1"], rd["iou_at_argmax"]
        # lesion level at threshold99
        lesions = [les for r in subs for les in r.lesions]
        counted = [les for les in lesions if not les["excluded"]]
        t99 = th["threshold99"]
        for c in SIZE_CLASSES:
            cl = [les for les in counted if les["size_class"] == c]
            det = sum(les["peak_score"] >= t99 for les in cl)
            m[f"ltpr99_{c}"] = det / len(cl) if cl else NAN
            m[f"n_lesions_{c}"] = len(cl)
            m[f"n_detected99_{c}"] = int(det)
        P = float(self.h_pos.sum())  # noqa: N806
        if P > 0 and math.isfinite(t99):
            b = th["threshold99_bin"]
            tp = float(self.h_pos[b:].sum())
            fp = float(self.h_neg_abn[b:].sum())
            m["dice99"], m["iou99"] = 2 * tp / (tp + fp + P), tp / (fp + P)
        else:
            m["dice99"] = m["iou99"] = NAN
        complete = bool(subs) and all(r.done_pass2 for r in subs) and not math.isnan(t99)
        m["fp_per_volume"] = sum(r.n_fp for r in subs) / len(subs) if complete else NAN
        # extras
        abn = [r for r in subs if r.abnormal]
        m["localization99"] = sum(r.label_peak >= t99 for r in abn) / len(abn) if abn else NAN
        m["n_localized99"] = int(sum(r.label_peak >= t99 for r in abn))
        m.update(n_lesions_excluded=len(lesions) - len(counted), n_lesions_total=len(lesions))
        m["n_fp_components"] = int(sum(r.n_fp for r in subs)) if complete else None
        m.update(lesion_pass_complete=complete, threshold99=t99, threshold99_tnr=th["threshold99_tnr"])
        m.update(dice_max_threshold=th["dice_max_threshold"], dice_max_upper_bound=rd["f1_upper"])
        m.update(voxel_auroc_bin_error_bound=rv["auroc_bound"], voxel_ap_bin_error_bound=rv["ap_bound"])
        m.update(n_subjects=len(subs), n_abnormal=len(abn), n_normal=len(subs) - len(abn))
        m.update(n_voxels=int(sum(r.n_foreground for r in subs)), n_positive_voxels=int(P))
        m["binning"] = (
            f"float32 order-preserving, {self.bins.mantissa_bits} mantissa bits "
            f"({self.bins.n_bins} bins, relative width <= 2^-{self.bins.mantissa_bits}); "
            f"{len(nz)} nonempty"
        )
        m["dice_pooling"] = "pooled over foreground voxels of abnormal subjects, one threshold"
        m.update(min_lesion_diameter_mm=self.min_diameter_mm, tnr=self.tnr)
        return m

    def curves(self) -> dict:
        """ROC / PR curve points: {"patient": {...}, "voxel": {...}} (voxel from the histograms)."""
        _, pp, pn = self._patient_groups()
        neg = self.h_neg
        nz = np.flatnonzero(self.h_pos | neg)[::-1]
        vp, vn = self.h_pos[nz].astype(np.float64), neg[nz].astype(np.float64)
        return {
            "patient": roc_pr_points(np.cumsum(pp), np.cumsum(pn), pp.sum(), pn.sum()),
            "voxel": roc_pr_points(np.cumsum(vp), np.cumsum(vn), vp.sum(), vn.sum()),
        }

    def gt_lesion_rows(self) -> list[dict]:
        t99 = self._thresholds()["threshold99"]
        rows = []
        for r in self.subjects.values():
            for les in r.lesions:
                centroid = dict(
                    zip(("centroid_x_mm", "centroid_y_mm", "centroid_z_mm"), les["centroid_mm"], strict=True)
                )
                rows.append({"subject": r.name, **les, **centroid, "detected99": bool(les["peak_score"] >= t99)})
        return rows
