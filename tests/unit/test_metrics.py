"""Tests of scripts.evaluation.metrics / .plots against independent straightforward computations."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from scipy import ndimage
from scripts.evaluation.lesions import size_class
from scripts.evaluation.metrics import ARCHITECTURE_KEYS, CohortEvaluator
from scripts.evaluation.ranking import FloatBins
from scripts.evaluation.report import evaluate_cohort, format_table, write_report
from sklearn.metrics import average_precision_score, roc_auc_score

# ----------------------------------------------------------------------------------------- helpers


def brute_f1_max(scores, y):
    """Max over every distinct threshold t of F1 of the prediction 'score >= t' (plain loop)."""
    best = 0.0
    for t in np.unique(scores):
        pred = scores >= t
        tp = np.sum(pred & (y == 1))
        fp = np.sum(pred & (y == 0))
        fn = np.sum(~pred & (y == 1))
        best = max(best, 2 * tp / (2 * tp + fp + fn))
    return best


def exact_dice_sweep(scores, y):
    """Exact Dice / IoU at every distinct threshold (sorted descending, tie groups merged)."""
    order = np.argsort(-scores, kind="stable")
    s, t = scores[order], y[order].astype(np.float64)
    last = np.r_[s[1:] != s[:-1], True]  # end of each tie group
    tp = np.cumsum(t)[last]
    fp = np.cumsum(1 - t)[last]
    P = t.sum()  # noqa: N806
    dice = 2 * tp / (tp + fp + P)
    return dice, tp / (fp + P), s[last]


def random_cohort(rng, n_norm=2, n_abn=2, shape=(32, 32, 25), ties=0.3, zeros=0.05, hot_background=True):
    """Small cohort with a spherical-ish foreground, random lesions and scores with ties (a fraction
    ``ties`` rounded to 0.01, a fraction ``zeros`` exactly 0, as invalid tokens give)."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    fg = (grid**2).sum(0) < 0.9
    subs = []
    for i in range(n_norm + n_abn):
        s = rng.gamma(2.0, 0.1, shape).astype(np.float32)
        lab = np.zeros(shape, np.uint8)
        if i >= n_norm:
            c = rng.uniform(-0.4, 0.4, 3)
            lab[((grid - c[:, None, None, None]) ** 2).sum(0) < rng.uniform(0.03, 0.08)] = 1
            lab &= fg
            s += lab * rng.uniform(0.0, 0.4, shape).astype(np.float32)
        else:
            s *= np.float32(1.15)  # normal subjects differ (a Dice including them would differ)
        m = rng.random(shape) < ties
        s[m] = np.round(s[m], 2)
        s[rng.random(shape) < zeros] = 0.0
        if hot_background:
            s[~fg] = rng.uniform(0.5, 2.0, (~fg).sum())  # including background would change everything
        subs.append(dict(name=f"sub{i:02d}", score_map=s, label=lab if i >= n_norm else None, mask=fg))
    return subs


def build(subs, **kw):
    ev = CohortEvaluator(**kw)
    for s in subs:
        ev.add(
            s["name"],
            s["score_map"],
            s.get("label"),
            s.get("mask"),
            s.get("spacing", (1.0, 1.0, 1.0)),
            s.get("subject_score"),
            affine=s.get("affine"),
        )
    return ev


def pooled(subs, which):
    """Concatenate foreground scores / labels of the chosen subjects (test-side reference only)."""
    sc, y = [], []
    for s in subs:
        lab = s["label"] if s.get("label") is not None else np.zeros(s["score_map"].shape, np.uint8)
        if which == "abnormal" and not lab.any():
            continue
        fg = s["mask"] if s.get("mask") is not None else np.ones(lab.shape, bool)
        sc.append(s["score_map"][fg])
        y.append((lab[fg] > 0).astype(np.int64))
    return np.concatenate(sc), np.concatenate(y)


# ----------------------------------------------------------------------------------------- binning


def _width(fb: FloatBins, b) -> np.ndarray:
    """Width of bin(s) ``b``."""
    return fb.lower_edge(np.asarray(b) + 1) - fb.lower_edge(b)


def test_float_bins_order_preserving_and_edges():
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [
            rng.normal(0, 3, 5000),
            rng.lognormal(0, 8, 2000),
            -rng.lognormal(0, 8, 2000),
            [0.0, -0.0, np.inf, -np.inf, 1e-40, -1e-40, 1.0, 2.0],
        ]
    ).astype(np.float32)
    for bits in (0, 5, 12):
        fb = FloatBins(bits)
        xs = np.sort(x)
        idx = fb.index(xs)
        assert np.all(np.diff(idx) >= 0), "binning must be monotone"
        assert idx.min() >= 0 and idx.max() < fb.n_bins
        finite = np.isfinite(xs) & (idx > 0)
        lo = fb.lower_edge(idx[finite])
        hi = fb.lower_edge(idx[finite] + 1)
        assert np.all(xs[finite] >= lo) and np.all(xs[finite] < hi)
        # relative bin width <= 2**-bits for normal floats away from zero
        big = finite & (np.abs(xs) > 1e-30)
        w = _width(fb, idx[big])
        assert np.all(w <= np.abs(xs[big]) * 2.0 ** (-bits) * (1 + 1e-6))
    fb = FloatBins()
    z, tiny = fb.index(np.float32([-0.0, 0.0, 1e-45]))[[0, 1]], fb.index(np.float32([1e-45]))[0]
    assert z[0] == z[1] == fb.zero_bin and tiny == fb.zero_bin + 1  # exact zero has a bin of its own
    assert fb.lower_edge(fb.zero_bin) == 0.0 and fb.lower_edge(fb.zero_bin + 1) > 0


# ------------------------------------------------------------------------------------ patient level


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_patient_metrics_vs_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = 41
    y = (rng.random(n) < 0.4).astype(int)
    y[:2] = [0, 1]
    sc = np.round(rng.normal(y * 0.8, 1.0), 1)  # heavy ties, also across classes
    lab1 = np.zeros((2, 2, 2), np.uint8)
    lab1[0, 0, 0] = 1
    ev = CohortEvaluator(mantissa_bits=4)
    for i in range(n):
        ev.add(f"p{i}", np.zeros((2, 2, 2), np.float32), lab1 if y[i] else None, subject_score=sc[i])
    m = ev.compute()
    assert m["patient_auroc"] == pytest.approx(roc_auc_score(y, sc), abs=1e-12)
    assert m["patient_ap"] == pytest.approx(average_precision_score(y, sc), abs=1e-12)
    assert m["patient_f1"] == pytest.approx(brute_f1_max(sc, y), abs=1e-12)
    # teeth: breaking ties by input order (a plausible wrong AP) gives a different number here
    order = np.argsort(-sc, kind="stable")
    yy = y[order]
    wrong_ap = np.sum(yy * np.cumsum(yy) / np.arange(1, n + 1)) / yy.sum()
    assert abs(wrong_ap - m["patient_ap"]) > 1e-3


def test_patient_undefined_is_nan():
    ev = CohortEvaluator(mantissa_bits=4)
    for i in range(3):
        ev.add(f"n{i}", np.zeros((2, 2, 2), np.float32), None, subject_score=float(i))
    m = ev.compute()
    for k in ("patient_auroc", "patient_ap", "patient_f1", "voxel_auroc", "dice_max", "ltpr99_small"):
        assert math.isnan(m[k]), k


# -------------------------------------------------------------------------------------- voxel level


def test_voxel_auroc_ap_vs_sklearn_within_reported_bound():
    rng = np.random.default_rng(3)
    subs = random_cohort(rng, shape=(40, 40, 36), ties=0.02)
    ev = build(subs)
    m = ev.compute()
    sc, y = pooled(subs, "all")
    assert sc.size > 8e4  # ~1e5 foreground voxels
    auc, ap = roc_auc_score(y, sc), average_precision_score(y, sc)
    assert abs(m["voxel_auroc"] - auc) <= m["voxel_auroc_bin_error_bound"] + 1e-12
    assert abs(m["voxel_ap"] - ap) <= m["voxel_ap_bin_error_bound"] + 1e-12
    assert m["voxel_auroc_bin_error_bound"] < 1e-4 and m["voxel_ap_bin_error_bound"] < 1e-3
    assert abs(m["voxel_auroc"] - auc) < 1e-4 and abs(m["voxel_ap"] - ap) < 1e-3
    assert m["n_voxels"] == sc.size and m["n_positive_voxels"] == y.sum()
    # teeth: background voxels (outside the mask) must not count
    all_s = np.concatenate([s["score_map"].ravel() for s in subs])
    all_y = np.concatenate([(s["label"] if s["label"] is not None else 0 * s["score_map"]).ravel() for s in subs])
    assert abs(roc_auc_score(all_y > 0, all_s) - m["voxel_auroc"]) > 0.01


def test_bounds_hold_with_coarse_bins():
    """With very wide bins the binned values move, but never beyond the reported bounds."""
    rng = np.random.default_rng(4)
    subs = random_cohort(rng, shape=(20, 20, 16))
    sc, y = pooled(subs, "all")
    sa, ya = pooled(subs, "abnormal")
    exact_dice = exact_dice_sweep(sa, ya)[0].max()
    for bits in (0, 2, 5):
        m = build(subs, mantissa_bits=bits).compute()
        assert abs(m["voxel_auroc"] - roc_auc_score(y, sc)) <= m["voxel_auroc_bin_error_bound"] + 1e-12
        assert abs(m["voxel_ap"] - average_precision_score(y, sc)) <= m["voxel_ap_bin_error_bound"] + 1e-12
        assert m["dice_max"] - 1e-12 <= exact_dice <= m["dice_max_upper_bound"] + 1e-12
    assert m["voxel_auroc_bin_error_bound"] > 1e-4  # the coarse grid really is coarse (test has teeth)


def test_dice_max_vs_bruteforce_sweep_abnormal_only():
    rng = np.random.default_rng(5)
    subs = random_cohort(rng, n_norm=3, n_abn=3)
    m = build(subs).compute()
    sa, ya = pooled(subs, "abnormal")
    dice, iou, thr = exact_dice_sweep(sa, ya)
    best = dice.max()
    assert m["dice_max"] <= best + 1e-12 <= m["dice_max_upper_bound"] + 2e-12
    assert best - m["dice_max"] < 1e-3
    # at the reported threshold the Dice / IoU are exact
    t = m["dice_max_threshold"]
    pred = sa >= np.float32(t)
    tp, fp, fn = np.sum(pred & (ya == 1)), np.sum(pred & (ya == 0)), np.sum(~pred & (ya == 1))
    assert m["dice_max"] == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-12)
    assert m["iou_max"] == pytest.approx(tp / (tp + fp + fn), abs=1e-12)
    assert iou.max() == pytest.approx(best / (2 - best), abs=1e-12)
    # teeth: pooling normal subjects' voxels in too, or the background, gives a clearly different max Dice
    sc, y = pooled(subs, "all")
    assert abs(exact_dice_sweep(sc, y)[0].max() - m["dice_max"]) > 1e-2
    sb = np.concatenate([s["score_map"].ravel() for s in subs[3:]])
    yb = np.concatenate([s["label"].ravel() for s in subs[3:]])
    assert abs(exact_dice_sweep(sb, yb)[0].max() - m["dice_max"]) > 1e-2


def test_threshold99_is_percentile_of_all_normal_foreground_voxels():
    rng = np.random.default_rng(6)
    subs = random_cohort(rng, n_norm=2, n_abn=3, ties=0.0, zeros=0.0)
    for s in subs[2:]:  # normal tissue of abnormal subjects scores higher: must be in the percentile
        s["score_map"] = s["score_map"] + np.float32(0.3) * s["mask"]
    ev = build(subs)
    m = ev.compute()
    normal = np.concatenate(
        [s["score_map"][s["mask"] & ((s["label"] if s["label"] is not None else 0 * s["mask"]) == 0)] for s in subs]
    )
    t, fb = m["threshold99"], ev.bins
    p99 = np.percentile(normal, 99)
    x = np.sort(normal)
    n, c = x.size, int(np.floor(0.01 * x.size))
    X = x[n - 1 - c]  # (c+1)-th largest  # noqa: N806
    wX = _width(fb, fb.index(np.float32([X]))[0])  # noqa: N806
    assert X <= t < X + wX  # the upper edge of X's bin
    gap = max(x[min(n - 1, n - c)] - X, X - x[n - 2 - c])
    assert abs(t - p99) <= wX + gap
    assert abs(t - p99) / p99 < 5e-4  # continuous scores: essentially np.percentile
    frac = np.mean(normal >= np.float32(t))
    assert frac <= 0.01 and m["threshold99_tnr"] == pytest.approx(1 - frac, abs=1e-12)
    prev = fb.lower_edge(fb.index(np.float32([t]))[0] - 1)
    assert np.mean(normal >= np.float32(prev)) > 0.01  # lowest such edge
    # teeth: the percentile over normal SUBJECTS only would be a different threshold
    only_normal = np.concatenate([s["score_map"][s["mask"]] for s in subs[:2]])
    assert abs(np.percentile(only_normal, 99) - t) > 0.05
    # dice99 pooled over abnormal subjects at that threshold
    sa, ya = pooled(subs, "abnormal")
    pred = sa >= np.float32(t)
    tp, fp, fn = np.sum(pred & (ya == 1)), np.sum(pred & (ya == 0)), np.sum(~pred & (ya == 1))
    assert m["dice99"] == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-12)


# ------------------------------------------------------------------------------------- lesion level


def test_size_classes_use_anisotropic_spacing_and_diameter_exclusion():
    shape = (30, 30, 30)
    lab = np.zeros(shape, np.uint8)
    lab[1:3, 1:3, 1:3] = 1  # 8 vox * 3 mm3 = 24 mm3 -> small, d = 3.58 mm (at 1 mm: 8 mm3, d 2.48 excluded)
    lab[5:9, 5:9, 5:9] = 1  # 64 vox -> 192 mm3 -> medium (at 1 mm: 64 mm3 small)
    lab[12:20, 12:20, 12:20] = 1  # 512 vox -> 1536 mm3 -> large (at 1 mm: medium)
    lab[25, 25, 25] = 1  # 1 vox -> 3 mm3, d = 1.79 mm -> excluded
    ev = CohortEvaluator(mantissa_bits=4)
    ev.add("a", np.zeros(shape, np.float32), lab, None, (1.0, 1.5, 2.0), 1.0)
    rows = {r["lesion_id"]: r for r in ev.gt_lesion_rows()}
    got = sorted((r["n_voxels"], r["volume_mm3"], r["size_class"], r["excluded"]) for r in rows.values())
    assert got == [
        (1, 3.0, "small", True),
        (8, 24.0, "small", False),
        (64, 192.0, "medium", False),
        (512, 1536.0, "large", False),
    ]
    m = ev.compute()
    assert (m["n_lesions_small"], m["n_lesions_medium"], m["n_lesions_large"], m["n_lesions_excluded"]) == (1, 1, 1, 1)
    for r in rows.values():
        assert r["diameter_mm"] == pytest.approx((6 * r["volume_mm3"] / np.pi) ** (1 / 3))
    # the paper's example: a 4x4x4-voxel cube at 1.5 mm is 216 mm3 = medium; class boundaries
    assert size_class(4**3 * 1.5**3) == "medium"
    assert [size_class(v) for v in (99.9, 100.0, 1000.0, 1000.1)] == ["small", "medium", "medium", "large"]
    # same cubes at 1 mm isotropic: 8 mm3 cube is excluded, classes shift
    ev1 = CohortEvaluator(mantissa_bits=4)
    ev1.add("a", np.zeros(shape, np.float32), lab, None, (1.0, 1.0, 1.0), 1.0)
    m1 = ev1.compute()
    assert (m1["n_lesions_small"], m1["n_lesions_medium"], m1["n_lesions_large"], m1["n_lesions_excluded"]) == (
        1,
        1,
        0,
        2,
    )


def test_18_connectivity_corner_vs_edge():
    shape = (20, 20, 20)
    lab = np.zeros(shape, np.uint8)
    lab[2:5, 2:5, 2:5] = 1  # 3x3x3 block ...
    lab[5:8, 5:8, 5:8] = 1  # ... and another touching it only at a corner: 2 lesions (26-conn: 1)
    lab[10:13, 10:13, 2:5] = 1  # a third block ...
    lab[13:16, 13:16, 2:5] = 1  # ... sharing an edge (a line of voxel edges) with it: 1 lesion (6-conn: 2)
    s = np.zeros(shape, np.float32)
    s[3, 3, 3] = 1.0  # only the first corner block is hit
    ev = CohortEvaluator(mantissa_bits=4)
    ev.add("a", s, lab, None, (1.5, 1.5, 1.5), 1.0)  # 27 vox = 91.1 mm3 small; 54 vox = 182 mm3 medium
    ev.add("n", np.zeros(shape, np.float32), None, None, (1.5, 1.5, 1.5), 0.0)
    m = ev.compute()
    assert (m["n_lesions_small"], m["n_lesions_medium"], m["n_lesions_large"]) == (2, 1, 0)
    assert m["ltpr99_small"] == 0.5 and m["ltpr99_medium"] == 0.0 and math.isnan(m["ltpr99_large"])
    # reference: 26-connectivity would merge the corner pair into one detected medium lesion
    assert ndimage.label(lab, np.ones((3, 3, 3)))[1] == 2 and ndimage.label(lab)[1] == 4


def hand_built_cohort():
    """Scores are 0 except where set; >99 % of normal voxels are 0, so threshold99 is just above 0."""
    shape = (20, 20, 20)
    fg = np.zeros(shape, bool)
    fg[2:18, 2:18, 2:18] = True  # 4096 foreground voxels per subject
    subs = []

    def sub(name, lab=None):
        d = dict(name=name, score_map=np.zeros(shape, np.float32), label=lab, mask=fg.copy())
        subs.append(d)
        return d

    n1 = sub("normal1")
    n1["score_map"][4, 4, 4] = n1["score_map"][5, 5, 5] = 3.0  # corner-touching: 2 FP components (26: 1)
    n1["score_map"][10:12, 10:12, 10:12] = 2.0  # one 8-voxel FP component
    n1["score_map"][0:2, :, :] = 9.0  # 800 hot BACKGROUND voxels: neither FP nor in the threshold
    sub("normal2")
    sub("normal3")
    la = np.zeros(shape, np.uint8)
    la[4:7, 4:7, 4:7] = 1  # L1: 27 mm3 small, d 3.72 mm
    la[10:15, 10:15, 10:15] = 1  # L2: 125 mm3 medium
    la[16, 3, 16] = 1  # L3: 1 voxel, excluded (d 1.24 mm)
    a = sub("abnA", la)
    a["score_map"][6, 6, 6:9] = 1.0  # hits L1 and leaves it: one matched component
    a["score_map"][16, 12, 12] = 1.5  # next to L2 (not overlapping): FP
    a["score_map"][16, 3, 16] = 0.5  # on the excluded lesion: matched, not FP
    lb = np.zeros(shape, np.uint8)
    lb[3:14, 3:14, 3:14] = 1  # 1331 mm3 large
    b = sub("abnB", lb)
    b["score_map"][5:8, 5:8, 5:8] = 2.0
    lc = np.zeros(shape, np.uint8)
    lc[5:10, 5:10, 5:10] = 1  # medium, missed
    sub("abnC", lc)
    for i, s in enumerate(subs):
        s["subject_score"] = float(s["score_map"][fg].max()) + 0.01 * i
    return subs


def test_lesion_metrics_fp_per_volume_and_localisation_hand_built(tmp_path):
    subs = hand_built_cohort()
    affine = np.array([[-1.0, 0, 0, 90], [0, 1, 0, -126], [0, 0, 1, -72], [0, 0, 0, 1]])
    for s in subs:
        s["affine"] = affine
    ev = build(subs)
    t = ev.threshold99()
    assert 0 < t < 1e-30  # lowest bin edge above 0
    assert math.isnan(ev.compute()["fp_per_volume"])  # pass 2 not done yet
    for s in subs:
        ev.add_components(s["name"], s["score_map"], s["label"], s["mask"])
    m = ev.compute()
    assert (m["n_lesions_small"], m["n_lesions_medium"], m["n_lesions_large"], m["n_lesions_excluded"]) == (1, 2, 1, 1)
    assert (m["ltpr99_small"], m["ltpr99_medium"], m["ltpr99_large"]) == (1.0, 0.0, 1.0)
    # FP components: normal1 2 + 1, abnA 1 (next to L2); the component on excluded L3 is matched
    assert m["n_fp_components"] == 4 and m["fp_per_volume"] == pytest.approx(4 / 6)
    assert m["localization99"] == pytest.approx(2 / 3) and m["n_localized99"] == 2
    rows = [r for r in ev.components if r["subject"] == "abnA"]
    assert sorted(r["matched_lesion"] for r in rows) == ["1", "3", "FP"]
    r1 = next(r for r in rows if r["matched_lesion"] == "1")
    assert r1["n_voxels"] == 3 and r1["peak_score"] == 1.0 and r1["mean_score"] == 1.0
    np.testing.assert_allclose(
        [r1["centroid_x_mm"], r1["centroid_y_mm"], r1["centroid_z_mm"]], affine[:3, :3] @ [6, 6, 7] + affine[:3, 3]
    )
    fp = next(r for r in rows if r["matched_lesion"] == "FP")
    assert fp["volume_mm3"] == 1.0
    # dice99 vs direct computation on abnormal subjects
    tp = fp_ = fn = 0
    for s in subs[3:]:
        pred = (s["score_map"] >= np.float32(t)) & s["mask"]
        g = (s["label"] > 0) & s["mask"]
        tp, fp_, fn = tp + np.sum(pred & g), fp_ + np.sum(pred & ~g), fn + np.sum(~pred & g)
    assert m["dice99"] == pytest.approx(2 * tp / (2 * tp + fp_ + fn))
    # report files
    paths = write_report(tmp_path, ev, m)
    data = json.loads((tmp_path / "metrics.json").read_text())
    assert set(ARCHITECTURE_KEYS) <= set(data)
    assert data["fp_per_volume"] == pytest.approx(4 / 6)
    with open(tmp_path / "lesions.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(ev.components) and sum(r["matched_lesion"] == "FP" for r in csv_rows) == 4
    for key in ("roc_pr_patient", "roc_pr_voxel", "overlay:abnA", "overlay:abnB", "overlay:abnC"):
        assert paths[key].stat().st_size > 1000, key
    assert not list(tmp_path.glob(".metrics.json.*"))  # atomic write left no temp file
    assert "| ltpr99_medium | 0.0 % |" in format_table(m)


def test_report_nan_becomes_null_and_end_to_end(tmp_path):
    import torch

    rng = np.random.default_rng(7)
    subs = random_cohort(rng, n_norm=3, n_abn=2, shape=(24, 24, 20))
    for s in subs:
        s["image"] = rng.random(s["score_map"].shape).astype(np.float32)
        s["score_map"] = torch.from_numpy(s["score_map"][None])  # [1, H, W, D] tensor input
        s["spacing"] = (1.0, 1.0, 1.2)
    m = evaluate_cohort(lambda: iter(subs), out_dir=tmp_path)
    data = json.loads((tmp_path / "metrics.json").read_text())
    for k in ARCHITECTURE_KEYS:
        v = data[k]
        assert v is None or (0.0 <= v <= 1.0 if k != "fp_per_volume" else v >= 0), (k, v)
    empty = [k for k in ("ltpr99_small", "ltpr99_medium", "ltpr99_large") if math.isnan(m[k])]
    assert empty and all(data[k] is None for k in empty)
    assert data["lesion_pass_complete"] is True and data["n_subjects"] == 5
    overlays = sorted(p.name for p in (tmp_path / "overlays").glob("*.png"))
    assert overlays == ["sub03.png", "sub04.png"]
    assert all((tmp_path / "overlays" / p).stat().st_size > 1000 for p in overlays)


def test_api_errors():
    ev = CohortEvaluator(mantissa_bits=4)
    z = np.zeros((3, 3, 3), np.float32)
    ev.add("a", z, None)
    with pytest.raises(ValueError):
        ev.add("a", z, None)
    with pytest.raises(ValueError):
        ev.add("nan", np.full((3, 3, 3), np.nan, np.float32))
    with pytest.raises(ValueError):
        ev.add("shape", z, np.zeros((3, 3, 2)))
    ev.add_components("a", z)
    with pytest.raises(RuntimeError):
        ev.add("late", z)
    with pytest.raises(KeyError):
        ev.add_components("unknown", z)
