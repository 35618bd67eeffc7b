"""Sections 6-7: peak memory of bundle runs at B and 2B volumes, and seconds per volume and stage.

Both come from the same runs (:mod:`scripts.benchmarks.bundle_runs`): the first B and 2B subjects of
one cohort, each in a fresh output folder, then again on their token caches (no encoder phase). The
memory target compares the growth of the peak RSS with the growth of the token bank.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from scripts.benchmarks.bundle_runs import bundle_runs, cohort, subset
from scripts.benchmarks.markdown import cell, joined, missing, table
from scripts.benchmarks.settings import demo_config, scoring_defaults
from scripts.benchmarks.values import rounded

STAGES = ("load", "tokenize", "score", "write")


def predicted_extras(run: dict) -> dict:
    """Memory the workflow holds beside the bank that may grow with B, in MB, from a run's geometry.

    Follows the exact scorer's pair layout: the ``[tile, M]`` distance block, the two volumes' fp32
    reference copies, the pair-symmetric ``[B, M, K]`` top-K store (fp32 distance + int16 index),
    and the kept token scores. Upper bounds: ``M`` is taken as the whole largest grid.
    """
    from scripts.scoring import num_neighbours

    block, tile = scoring_defaults()
    n, d = run["n_volumes"] or 0, run["d"] or 128
    per_key = [math.prod(shape) for shape in run["grids"].values()] or [0]
    m = max(per_key)
    rows = max(1, min(tile, max(64, block // max(1, m))))
    k = num_neighbours(max(n, 2), run.get("rho") or 0.1)
    return {
        "score_block_mb": rows * m * 4 / 2**20,
        "reference_copies_mb": 2 * m * d * 4 / 2**20,
        "topk_store_mb": n * m * k * 6 / 2**20,
        "token_scores_mb": n * sum(per_key) * 4 / 2**20,
    }


def _lowest_peak_runs(jobs: list, sizes: tuple[int, int], cfg: dict, device: torch.device) -> dict[int, dict]:
    """Fresh runs at each size, repeated; per size the run with the lowest peak RSS.

    The encoding runs' peak moves from run to run (when the peak comes, the DataLoader's prefetch
    queue holds a varying number of image+mask batches); the lowest peak has the least transient on
    top of what the run must hold. ``peaks_mb`` lists every repeat's peak.
    """
    mem = cfg["memory"]
    overrides, parallel = dict(mem.get("overrides", {})), bool(mem.get("parallel"))
    runs = dict(zip(sizes, bundle_runs(jobs, overrides, device, parallel), strict=True))
    for _ in range(int(mem.get("repeats", 1)) - 1):
        again = dict(zip(sizes, bundle_runs(jobs, overrides, device, parallel), strict=True))
        for n, run in again.items():
            runs[n].setdefault("peaks_mb", [runs[n]["peak_rss_mb"]]).append(run["peak_rss_mb"])
            if run["peak_rss_mb"] < runs[n]["peak_rss_mb"]:
                run["peaks_mb"] = runs[n]["peaks_mb"]
                runs[n] = run
    return runs


def _growth_ratio(growth: float | None, bank_growth: float) -> float | None:
    return rounded(growth / bank_growth, 3) if growth is not None and bank_growth > 0 else None


def _memory_section(runs: dict[int, dict], cached: dict[int, dict], desc: dict, overrides: dict) -> dict:
    b, b2 = sorted(runs)
    rss_growth = runs[b2]["peak_rss_mb"] - runs[b]["peak_rss_mb"]
    bank_growth = runs[b2]["bank_mb"] - runs[b]["bank_mb"]
    cached_growth = cached[b2]["peak_rss_mb"] - cached[b]["peak_rss_mb"] if cached else None
    e1, e2 = predicted_extras(runs[b]), predicted_extras(runs[b2])

    def listed(rs: dict[int, dict]) -> list[dict]:
        return [{"B": n, **{k: v for k, v in r.items() if k != "grids"}} for n, r in rs.items()]

    return {
        "cohort": desc,
        "overrides": overrides,
        "runs": listed(runs),
        "runs_cached": listed(cached),
        "rss_growth_cached_mb": rounded(cached_growth, 1),
        "ratio_cached": _growth_ratio(cached_growth, bank_growth),
        "rss_growth_mb": round(rss_growth, 1),
        "bank_growth_mb": round(bank_growth, 2),
        "excess_mb": round(rss_growth - bank_growth, 1),
        "ratio": _growth_ratio(rss_growth, bank_growth),
        "predicted_extra_growth_mb": {k: round(e2[k] - e1[k], 2) for k in e1},
        "note": "peak RSS of the bundle's main process (VmHWM in run.json; VmHWM polled from /proc as a "
        "check); DataLoader workers are separate processes",
    }


def _e2e_section(runs: dict[int, dict], desc: dict, overrides: dict, cfg: dict) -> dict:
    rows = []
    for n, r in runs.items():
        t = r["timings_s"]
        row = {"B": n, **{s: rounded(t.get(s, 0.0) / n, 3) for s in STAGES}}
        row["total"] = rounded(sum(t.get(s, 0.0) for s in STAGES) / n, 3)
        row["wall"] = rounded(r["wall_s"] / n, 3)
        rows.append(row)
    e2e = {"cohort": desc, "overrides": overrides, "rows": rows}
    largest = max(runs)
    demo = demo_config()["demo"]
    demo_b = int(demo.get("n_normal", 20)) + int(demo.get("n_abnormal", 12))
    if cfg["memory"].get("demo") and demo_b > largest:
        last = rows[-1]
        score = last["score"] * (demo_b - 1) / (largest - 1)  # per-volume scoring work grows as B - 1
        e2e["extrapolated"] = {
            "B": demo_b,
            "score": rounded(score, 3),
            "total": rounded(last["load"] + last["tokenize"] + score + last["write"], 3),
            "note": f"score s/volume scaled from B={largest} by (B-1); other stages are per volume",
        }
    return e2e


def bench_bundle(cfg: dict, device: torch.device, out: Path) -> tuple[dict, dict]:
    """Bundle runs on the first B and 2B subjects of one cohort.

    Args:
        cfg: the mode's configuration; ``cfg["memory"]``: ``b``, ``demo``, ``shape``, ``overrides``,
            ``repeats``, ``parallel``, ``cached`` (default true: also re-run on the token caches).
        device: the bundle's device.
        out: output folder (cohort, subsets, runs).

    Returns:
        ``(memory section, e2e section)``.
    """
    b = cfg["memory"]["b"]
    sizes = (b, 2 * b)
    overrides = dict(cfg["memory"].get("overrides", {}))
    source, desc = cohort(cfg, out, 2 * b)
    jobs = [(subset(source, n, out / "subsets" / f"B{n}"), out / "runs" / f"B{n}") for n in sizes]
    runs = _lowest_peak_runs(jobs, sizes, cfg, device)
    cached = {}
    if cfg["memory"].get("cached", True):
        # A second memory measurement whose peak excludes the encoder phase; the difference between
        # the two pairs shows the run-to-run noise.
        parallel = bool(cfg["memory"].get("parallel"))
        cached = dict(zip(sizes, bundle_runs(jobs, overrides, device, parallel, fresh=False), strict=True))
    return _memory_section(runs, cached, desc, overrides), _e2e_section(runs, desc, overrides, cfg)


def _run_rows(memory: dict) -> list[list]:
    rows = []
    for r in memory["runs"]:
        peaks = r.get("peaks_mb")
        tokens = "encoded" + (f" (lowest of {len(peaks)} runs: {peaks})" if peaks else "")
        rows.append([r["B"], tokens, r["peak_rss_mb"], r.get("vmhwm_mb"), r["bank_mb"], r["wall_s"]])
    for r in memory.get("runs_cached", []):
        tokens = f"from cache ({r.get('encoded_volumes')} encoded)"
        rows.append([r["B"], tokens, r["peak_rss_mb"], r.get("vmhwm_mb"), r["bank_mb"], r["wall_s"]])
    return rows


def render_memory(memory: dict | None) -> list[str]:
    """Markdown of section 6."""
    md = ["## 6. Peak memory of a bundle run at B and 2B", ""]
    if not memory or "runs" not in memory:
        return md + missing(memory)
    extras = ", ".join(f"{k} +{v} MB" for k, v in memory["predicted_extra_growth_mb"].items())
    md += [
        f"Cohort: {joined(memory['cohort'])}; overrides {memory['overrides'] or 'none'}. {memory['note']}.",
        "",
        table(
            ["B", "tokens", "peak RSS MB (run.json)", "VmHWM MB (polled)", "token bank MB", "wall s"], _run_rows(memory)
        ),
        "",
        f"Encoding runs: RSS growth B -> 2B **{memory['rss_growth_mb']} MB**; token-bank growth "
        f"**{memory['bank_growth_mb']} MB** (ratio {cell(memory['ratio'])}; beyond the bank: "
        f"{memory['excess_mb']} MB). Predicted growth of what the workflow holds beside the bank: {extras}.",
        "",
    ]
    if memory.get("runs_cached"):
        md += [
            "Re-run on the token caches (no encoder phase): RSS growth "
            f"**{memory.get('rss_growth_cached_mb')} MB** (ratio {cell(memory.get('ratio_cached'))}).",
            "",
        ]
    return md


def render_e2e(e2e: dict | None) -> list[str]:
    """Markdown of section 7."""
    md = ["## 7. End to end, seconds per volume and stage (run.json)", ""]
    if not e2e or "rows" not in e2e:
        return md + missing(e2e)
    md += [
        table(
            ["B", *STAGES, "total (stages)", "wall (incl. start-up)"],
            [[r["B"], *(r[s] for s in STAGES), r["total"], r["wall"]] for r in e2e["rows"]],
        ),
        "",
    ]
    if "extrapolated" in e2e:
        x = e2e["extrapolated"]
        md += [
            f"Demo cohort size B={x['B']}: score ~{x['score']} s/volume, total ~{x['total']} s/volume ({x['note']}).",
            "",
        ]
    return md
