"""Order-preserving float binning and rank metrics (AUROC, AP, max F1) from tie-grouped counts: exact for
subject scores, per bin with error bounds for voxel scores (definitions in docs/design.md)."""

from __future__ import annotations

import numpy as np

__all__ = ["FloatBins", "rank_metrics", "roc_pr_points"]

NAN = float("nan")


class FloatBins:
    """Monotone map float32 -> bin index keeping ``mantissa_bits`` mantissa bits.

    Exact zero (+0.0 and -0.0; maps are zero wherever a token is invalid) gets a bin of its own; the
    positive floats below the first grid value above zero (denormals) form the next bin.
    """

    def __init__(self, mantissa_bits: int = 12):
        if not 0 <= mantissa_bits <= 14:
            raise ValueError(f"mantissa_bits must be in [0, 14], got {mantissa_bits}")
        self.mantissa_bits = int(mantissa_bits)
        self.shift = 23 - self.mantissa_bits
        self.zero_bin = 1 << (31 - self.shift)  # grid index of +0.0
        self.n_bins = (1 << (32 - self.shift)) + 1

    def index(self, x: np.ndarray) -> np.ndarray:
        """Bin index (intp) of each float32 value; larger value -> larger or equal index."""
        x = np.ascontiguousarray(x, dtype=np.float32) + np.float32(0.0)  # -0.0 -> +0.0
        u = x.view(np.uint32)
        key = np.where(u >= np.uint32(0x80000000), ~u, u | np.uint32(0x80000000))
        return (key >> np.uint32(self.shift)).astype(np.intp) + (x > 0)

    def lower_edge(self, b) -> np.ndarray:
        """Smallest float32 of bin(s) ``b`` (``b >= n_bins``: +inf); ``x >= edge(b)`` iff bin(x) >= b."""
        b = np.asarray(b, dtype=np.int64)
        out = np.full(b.shape, np.inf, dtype=np.float64)
        ok = b < self.n_bins
        g = b[ok] - (b[ok] > self.zero_bin)  # grid index
        key = (g.astype(np.uint64) << np.uint64(self.shift)).astype(np.uint32)
        u = np.where(key >= np.uint32(0x80000000), key & np.uint32(0x7FFFFFFF), ~key)
        e = u.view(np.float32).astype(np.float64)
        e[np.isnan(e)] = -np.inf  # the lowest keys are NaN bit patterns: the bin starts at -inf
        e[b[ok] == self.zero_bin + 1] = float(np.nextafter(np.float32(0), np.float32(1)))
        out[ok] = e
        return out if out.ndim else out[()]

    def histogram(self, x: np.ndarray) -> np.ndarray:
        return np.bincount(self.index(x).ravel(), minlength=self.n_bins).astype(np.int64)


def rank_metrics(pos: np.ndarray, neg: np.ndarray, exact=False) -> dict:
    """AUROC, AP, max F1 (= max Dice) from positive/negative counts per tie group (or bin), highest score first.

    The operating points are the thresholds "score >= lowest value of group i". ``exact`` (bool or bool per
    group) marks groups of a single score value; for the others (bins) the returned bounds say how far the
    exact metrics can be from the binned ones.
    """
    pos = np.asarray(pos, dtype=np.float64)
    neg = np.asarray(neg, dtype=np.float64)
    binned = ~np.broadcast_to(np.asarray(exact, dtype=bool), pos.shape)
    P, N = float(pos.sum()), float(neg.sum())  # noqa: N806
    tp, fp = np.cumsum(pos), np.cumsum(neg)
    tpa, fpa = tp - pos, fp - neg  # strictly above the group
    out = {"P": P, "N": N, "tp": tp, "fp": fp}
    if P > 0 and N > 0:
        out["auroc"] = float((np.dot(pos, N - fp) + 0.5 * np.dot(pos, neg)) / (P * N))
        out["auroc_bound"] = float(0.5 * np.dot(pos[binned], neg[binned]) / (P * N))
    else:
        out["auroc"] = out["auroc_bound"] = NAN
    if P > 0:
        has = pos > 0
        prec = tp[has] / (tp[has] + fp[has])
        out["ap"] = float(np.dot(pos[has] / P, prec))
        b = binned[has]
        lo = (tpa[has] + 1) / (tpa[has] + 1 + fpa[has] + neg[has])
        hi = (tpa[has] + pos[has]) / (tpa[has] + pos[has] + fpa[has])
        out["ap_bound"] = float(np.dot(pos[has][b] / P, hi[b] - lo[b]))
        f1 = 2 * tp / (tp + fp + P)
        i = int(np.argmax(f1))
        out["f1"], out["argmax"] = float(f1[i]), i
        out["iou_at_argmax"] = float(tp[i] / (fp[i] + P))
        f1_in_bin = np.where(binned, 2 * (tpa + pos) / (tpa + pos + fpa + P), f1)
        out["f1_upper"] = float(max(np.max(f1_in_bin), f1[i]))
    else:
        out.update(ap=NAN, ap_bound=NAN, f1=NAN, argmax=-1, iou_at_argmax=NAN, f1_upper=NAN)
    return out


def roc_pr_points(tp, fp, P, N, max_points: int = 4000) -> dict:  # noqa: N803
    """ROC and PR curve points (thinned to about ``max_points`` for plotting)."""
    idx = np.arange(len(tp))
    if len(idx) > max_points:
        idx = np.unique(np.linspace(0, len(tp) - 1, max_points).round().astype(int))
    tp, fp = np.asarray(tp)[idx], np.asarray(fp)[idx]
    d = {}
    if P > 0 and N > 0:
        d["fpr"] = np.concatenate([[0.0], fp / N])
        d["tpr"] = np.concatenate([[0.0], tp / P])
    if P > 0:
        up = np.diff(np.concatenate([[0.0], tp])) > 0  # points where recall grows: the AP step function
        tp, fp = tp[up], fp[up]
        prec = tp / np.maximum(tp + fp, 1)
        d["recall"] = np.concatenate([[0.0], tp / P])  # precision p_i holds on (r_{i-1}, r_i] (step "pre")
        d["precision"] = np.concatenate([prec[:1], prec])
        d["prevalence"] = P / (P + N)
    return d
