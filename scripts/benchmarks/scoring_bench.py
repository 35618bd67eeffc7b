"""Sections 2-3: exact scorer throughput against the GEMM roofline, and the MuSc-style baseline.

The exact scorer is :func:`scripts.scoring.mutual_similarity_scores`. Its effective GFLOP/s count
``2 N_q N_r d`` per (query volume, other volume) pair of *valid* tokens. The baseline, written here,
is the straightforward peer method (``torch.cdist`` per reference volume); the two are timed
interleaved on the same tokens, and their scores must agree.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from scripts.benchmarks.gemm import roof, roofline_probe
from scripts.benchmarks.markdown import missing, pct, table
from scripts.benchmarks.timing import interleaved, ratio
from scripts.benchmarks.values import rounded, significant


def synthetic_bank(
    b: int, n: int, d: int, invalid: float = 0.0, seed: int = 0, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Random token bank, like L2-normalised, randomly projected features.

    Args:
        b, n, d: volumes, tokens per volume, token dimension.
        invalid: about this fraction of tokens is marked invalid (token 0 of every volume stays
            valid, so no volume is empty); 0 returns no mask.
        seed: generator seed.
        device: where the tensors go.

    Returns:
        ``(tokens [B, N, d] of unit norm, valid [B, N] bool or None)``.
    """
    gen = torch.Generator().manual_seed(seed)
    tokens = F.normalize(torch.randn(b, n, d, generator=gen), dim=-1)
    valid = None
    if invalid > 0:
        valid = torch.rand(b, n, generator=gen) >= invalid
        valid[:, 0] = True
        valid = valid.to(device)
    return tokens.to(device), valid


def musc_baseline(
    tokens: torch.Tensor, valid: torch.Tensor | None = None, rho: float = 0.1, volumes: Sequence[int] | None = None
) -> torch.Tensor:
    """A straightforward MuSc-style mutual scorer, the peer baseline (not tiled, not clever).

    For each query volume: ``torch.cdist`` to every other volume's valid tokens, min over reference
    tokens, sort the ``B - 1`` profile, mean of the ``K = max(1, floor(rho (B - 1)))`` smallest.
    Invalid tokens neither query nor are matched and score 0 (the contract of the exact scorer).

    Args:
        tokens: ``[B, N, d]`` token bank.
        valid: ``[B, N]`` validity mask (``None``: all valid).
        rho: neighbour ratio.
        volumes: query volumes to score (``None``: all); the others keep 0.

    Returns:
        ``[B, N]`` float32 scores.
    """
    b, n, _ = tokens.shape
    # K is written out here rather than taken from scripts.scoring, so that the baseline checks the
    # scorer's K rule too; the epsilon keeps the floor exact where rho * (B - 1) is a binary
    # approximation of an integer (0.29 * 100 = 28.999...).
    k = max(1, math.floor(rho * (b - 1) + 1e-9))
    if valid is None:
        valid = torch.ones(b, n, dtype=torch.bool, device=tokens.device)
    scores = torch.zeros(b, n, dtype=torch.float32, device=tokens.device)
    for i in range(b) if volumes is None else volumes:
        queries = tokens[i][valid[i]].float()
        profile = torch.stack(
            [torch.cdist(queries, tokens[j][valid[j]].float()).min(dim=1).values for j in range(b) if j != i], dim=1
        )
        scores[i, valid[i]] = profile.sort(dim=1).values[:, :k].mean(dim=1)
    return scores


def exact_scorer(
    tokens: torch.Tensor, valid: torch.Tensor | None, rho: float, volumes: list[int] | None, precision: str = "fp32"
) -> Callable[[], torch.Tensor]:
    """A call of the exact scorer on fixed inputs, for timing (``precision``: its distance pass)."""
    from scripts.scoring import mutual_similarity_scores

    return lambda: mutual_similarity_scores(tokens, valid, rho, volumes=volumes, precision=precision)


def mixed_pass(device: torch.device) -> str:
    """The reduced-precision pass timed beside fp32: ``auto``'s choice on ``device``, else bf16."""
    from scripts.mixed_precision import resolve_precision

    used = resolve_precision("auto", device)
    return "bf16" if used == "fp32" else used


def effective_flops(counts: Sequence[int], d: int, query_volumes: Iterable[int]) -> int:
    """``2 N_q N_r d`` summed over every (query volume, other volume) pair, valid tokens only."""
    total = sum(counts)
    return sum(2 * counts[i] * (total - counts[i]) * d for i in query_volumes)


def _query_volumes(b: int, n: int, cfg: dict, gemm: dict | None) -> tuple[list[int] | None, str | None]:
    """The query volumes to time at (B, N) within the budget (``None``: all) and why fewer, if so."""
    full_est = effective_flops([n] * b, cfg["d"], range(b)) / ((roof(gemm, n) or 50.0) * 1e9)
    if full_est <= cfg["budget_s"]:
        return None, None
    volumes = list(range(max(1, min(b, int(cfg["budget_s"] // (full_est / b))))))
    note = (
        f"B={b}, N={n}: all {b} volumes would take ~{full_est:.0f} s per call at the roofline "
        f"(budget {cfg['budget_s']} s): timed {len(volumes)} query volume(s) against all {b} "
        f"references (`volumes=`): the per-volume order of a torchrun rank, which computes both "
        f"directions of each pair (no pair-symmetric saving), so these GFLOP/s are those of a "
        f"sharded run; a whole-batch call does half the GEMMs"
    )
    return volumes, note


def _case(
    b: int,
    n: int,
    invalid: float,
    volumes: list[int] | None,
    cfg: dict,
    gemm: dict | None,
    device: torch.device,
    baseline: bool,
) -> dict:
    """One (B, N, invalid fraction) row: scorer, roofline probe and baseline timed interleaved."""
    d, rho = cfg["d"], cfg["rho"]
    tokens, valid = synthetic_bank(b, n, d, invalid, seed=b * 1000 + n, device=device)
    counts = valid.sum(dim=1).tolist() if valid is not None else [n] * b
    qv = list(range(b)) if volumes is None else volumes
    flops = effective_flops(counts, d, qv)
    probe, probe_flops = roofline_probe(n, cfg, device)
    base = (lambda: musc_baseline(tokens, valid, rho, volumes)) if baseline else None
    # A call estimated above a second needs no warm-up: its one-off costs are noise against it.
    warm = effective_flops([n] * b, d, qv) / ((roof(gemm, n) or 50.0) * 1e9) < 1.0
    mixed = exact_scorer(tokens, valid, rho, volumes, mixed_pass(device))
    (ts, tp, tb, tm), (out_s, _, out_b, out_m) = interleaved(
        [exact_scorer(tokens, valid, rho, volumes), probe, base, mixed],
        device,
        cfg["repeats"],
        cfg["case_s"],
        warmup=warm,
        min_times=[0.0, cfg["min_time"], 0.0, 0.0],
    )
    t = statistics.median(ts)
    bf16 = roof(gemm, n, "bfloat16")
    row = {
        "B": b,
        "N": n,
        "d": d,
        "invalid": invalid,
        "valid_frac": rounded(sum(counts) / (b * n)),
        "query_volumes": len(qv),
        "gflop": significant(flops / 1e9),
        "scorer_s": significant(t),
        "gflops": significant(flops / t / 1e9),
        "roofline_fp32": significant(probe_flops / statistics.median(tp) / 1e9),
        # The fraction of the roofline measured in the same rounds is robust to load changes.
        "frac_roofline": significant(
            statistics.median((flops / a) / (probe_flops / p) for a, p in zip(ts, tp, strict=True)), 3
        ),
        "frac_roofline_bf16": significant(flops / t / 1e9 / bf16, 3) if bf16 else None,
        "repeats": len(ts),
        "mixed_s": significant(statistics.median(tm)),
        "mixed_speedup": significant(ratio(ts, tm), 3),
        "max_abs_diff_mixed": float((out_m - out_s).abs().max()),
    }
    if baseline:
        rows_q = torch.tensor(qv, device=device)
        row["baseline_s"] = significant(statistics.median(tb))
        row["speedup_vs_baseline"] = significant(ratio(tb, ts), 3)
        row["mixed_speedup_vs_baseline"] = significant(ratio(tb, tm), 3)
        row["max_abs_diff"] = float((out_s[rows_q] - out_b[rows_q]).abs().max())
    return row


def bench_scoring(cfg: dict, device: torch.device, gemm: dict | None, with_baseline: bool) -> dict:
    """Exact scorer throughput (and the baseline, interleaved) for every (B, N, mask) case.

    Args:
        cfg: the mode's configuration (``d``, ``rho``, ``score_b``, ``score_n``, ``invalid``,
            ``budget_s``, ``case_s``, ``repeats``, ``min_time``, ``tile``).
        device: where to score.
        gemm: section 1's result, for the time estimates (``None``: 50 GFLOP/s assumed).
        with_baseline: also time the baseline and compare scores.

    Returns:
        ``rows`` (one per case), ``notes`` (cases timed on a subset of query volumes), ``budget_s``, ``rho``.
    """
    cases = sorted(((b, n) for b in cfg["score_b"] for n in cfg["score_n"]), key=lambda c: c[0] * c[1])
    rows, notes = [], []
    for b, n in cases:
        volumes, note = _query_volumes(b, n, cfg, gemm)
        notes += [note] if note else []
        for invalid in (0.0, cfg["invalid"]):
            rows.append(_case(b, n, invalid, volumes, cfg, gemm, device, with_baseline))
    return {"rows": rows, "notes": notes, "budget_s": cfg["budget_s"], "rho": cfg["rho"]}


def baseline_summary(scoring: dict) -> dict:
    """The baseline section: worst agreement and the speedup range over the scoring cases."""
    rows = scoring.get("rows", [])
    speedups = [r["speedup_vs_baseline"] for r in rows]
    return {
        "max_abs_diff": max(r["max_abs_diff"] for r in rows) if rows else None,
        "speedup_min": min(speedups) if rows else None,
        "speedup_median": statistics.median(speedups) if rows else None,
        "description": "torch.cdist per reference volume, min, sort the B-1 profile, mean of K smallest",
    }


_HEADERS = [
    "B",
    "N",
    "invalid",
    "query vols",
    "GFLOP",
    "scorer s",
    "GFLOP/s",
    "% fp32 roof",
    "% bf16 roof",
    "baseline s",
    "speedup",
    "max abs diff",
    "mixed s",
    "mixed speedup",
    "mixed max abs diff",
    "reps",
]


def render(scoring: dict | None) -> list[str]:
    """Markdown of sections 2-3."""
    md = ["## 2-3. Exact scoring throughput and the MuSc-style baseline", ""]
    if not scoring or "rows" not in scoring:
        return md + missing(scoring)
    rows = [
        [
            r["B"],
            r["N"],
            pct(r["invalid"]),
            r["query_volumes"],
            r["gflop"],
            r["scorer_s"],
            r["gflops"],
            pct(r["frac_roofline"]),
            pct(r["frac_roofline_bf16"]),
            r.get("baseline_s"),
            r.get("speedup_vs_baseline"),
            r.get("max_abs_diff"),
            r.get("mixed_s"),
            r.get("mixed_speedup_vs_baseline"),
            r.get("max_abs_diff_mixed"),
            r["repeats"],
        ]
        for r in scoring["rows"]
    ]
    md += [
        "Effective GFLOP/s count `2 N_q N_r d` over every (query volume, other volume) pair of *valid* "
        "tokens. `invalid` = fraction of tokens masked out. Baseline = `torch.cdist` per reference "
        f"volume, min, sort, mean of K (rho = {scoring['rho']}); speedup = baseline time / scorer time "
        "(median of interleaved pairs); max |diff| = largest score difference between the two. `mixed`: "
        "the same exact scorer with its reduced-precision distance pass (score_precision auto's choice, "
        "bf16 where auto is fp32), timed in the same rounds; mixed speedup = baseline time / mixed time; "
        "mixed max abs diff = largest score difference from the fp32 scorer.",
        "",
        table(_HEADERS, rows),
        "",
    ]
    return md + [f"- {note}" for note in scoring["notes"]] + ([""] if scoring["notes"] else [])
