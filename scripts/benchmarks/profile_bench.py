"""Section 8: where scoring and encoding time goes (torch.profiler), and the prototype scorer variants.

* the exact scorer's top operators, with the configured threads and with one;
* the same call timed with the configured threads against one thread (interleaved);
* the prototype variants of :mod:`scripts.benchmarks.prototypes` against the exact scorer, on random
  tokens and on the real tokens of a bundle run of the memory section;
* the MuSc-style baseline against the exact scorer on those real tokens;
* the encoder's top operators on one slab.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch
from scripts.benchmarks.markdown import cell, missing, pct, table
from scripts.benchmarks.prototypes import render_variants, variant_rows
from scripts.benchmarks.scoring_bench import effective_flops, exact_scorer, musc_baseline, synthetic_bank
from scripts.benchmarks.settings import demo_config
from scripts.benchmarks.timing import paired, ratio, thread_counts, threads
from scripts.benchmarks.tokenize_bench import build_encoder
from scripts.benchmarks.values import rounded, significant
from torch.profiler import ProfilerActivity, profile


def real_bank(run_dir: str | Path | None) -> tuple[torch.Tensor, torch.Tensor, str] | None:
    """Real tokens from the token cache of a bundle run, for the variants' score error.

    Returns:
        ``(tokens [B, N, d] fp32, valid [B, N], key)`` of the (axis, layer) with the most tokens;
        ``None`` when the run has no readable cache of at least 2 volumes.
    """
    cache = Path(run_dir) / "tokens" if run_dir else None
    if cache is None or not cache.is_dir():
        return None
    try:
        entries = [torch.load(p, map_location="cpu", weights_only=True)["grids"] for p in sorted(cache.glob("*.pt"))]
    except Exception:  # a cache of another format: the real-token figures are left out
        return None
    if len(entries) < 2:
        return None
    key = max(entries[0], key=lambda k: entries[0][k][1].numel())
    tokens = torch.stack([e[key][0].reshape(-1, e[key][0].shape[-1]).float() for e in entries])
    valid = torch.stack([e[key][1].reshape(-1) for e in entries]).bool()
    return tokens, valid, key


def top_ops(prof: profile, limit: int = 10) -> list[dict]:
    """The ``limit`` operators with the most self CPU time."""
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return [
        {
            "op": e.key,
            "self_ms": rounded(e.self_cpu_time_total / 1000, 1),
            "self_pct": rounded(100 * e.self_cpu_time_total / total, 1),
            "calls": e.count,
        }
        for e in events[:limit]
    ]


def _activities(device: torch.device) -> list[ProfilerActivity]:
    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])


def _scoring_profiles(cfg: dict, device: torch.device) -> tuple[dict, list[dict]]:
    """Top operators of a whole-batch scorer call per thread count, and the 1-thread comparison."""
    b, n, d = cfg["profile"]["B"], cfg["profile"]["N"], cfg["d"]
    tokens, _ = synthetic_bank(b, n, d, 0.0, seed=7, device=device)
    full_call = exact_scorer(tokens, None, cfg["rho"], None)  # every volume queries: the bundle's call
    counts = thread_counts(device)
    ops = {}
    for count in counts:
        with threads(count):
            full_call()
            with profile(activities=_activities(device)) as prof:
                full_call()
        ops[str(count)] = top_ops(prof)
    if len(counts) == 1:
        return ops, []

    def one_thread() -> torch.Tensor:
        with threads(1):
            return full_call()

    tt, t1, _, _ = paired(full_call, one_thread, device, cfg["repeats"], cfg["case_s"])
    flops = effective_flops([n] * b, d, range(b))
    row = {
        "B": b,
        "N": n,
        "threads": counts[0],
        "s": significant(statistics.median(tt)),
        "gflops": significant(flops / statistics.median(tt) / 1e9),
        "s_1thread": significant(statistics.median(t1)),
        "gflops_1thread": significant(flops / statistics.median(t1) / 1e9),
        "speedup_1thread": significant(ratio(tt, t1), 3),
    }
    return ops, [row]


def _encoder_ops(cfg: dict, device: torch.device) -> tuple[dict, list[dict]]:
    """Top operators of one encoder forward on a slab at the first tokenize case's R."""
    demo = demo_config()
    size = cfg["tokenize"][0][1]
    encoder = build_encoder(demo["encoder_name"], size, device)
    x = torch.randn(demo["slab_size"], 3, size, size, device=device)
    encoder(x)
    with profile(activities=_activities(device)) as prof:
        encoder(x)
    return {"R": size, "slices": demo["slab_size"]}, top_ops(prof)


def bench_profile(cfg: dict, device: torch.device, real_run: str | Path | None = None) -> dict:
    """Profiles and prototype variants (see the module docstring).

    Args:
        cfg: the mode's configuration (``profile`` holds the scoring case's ``B`` and ``N``).
        device: where to run.
        real_run: output folder of a bundle run whose token cache gives the real tokens (``None``
            or no cache: random tokens only).

    Returns:
        The section's dict (``scoring_ops``, ``threads``, ``variants``, ``real_tokens_check``,
        ``encoder_ops`` and the cases they were measured on).
    """
    from scripts.scoring import mutual_similarity_scores

    b, n, rho = cfg["profile"]["B"], cfg["profile"]["N"], cfg["rho"]
    scoring_ops, thread_rows = _scoring_profiles(cfg, device)
    volumes = list(range(min(b, 4)))  # a few query volumes keep the variants' timing short
    real = real_bank(real_run)
    exact_real, real_check = None, None
    if real is not None:
        real = (real[0].to(device), real[1].to(device), real[2])
        rt, rv, key = real
        exact_real = mutual_similarity_scores(rt, rv, rho)
        real_check = {
            "tokens": key,
            "B": rt.shape[0],
            "N": rt.shape[1],
            "valid_frac": rounded(float(rv.float().mean()), 3),
            "max_abs_diff_baseline": float((exact_real - musc_baseline(rt, rv, rho)).abs().max()),
        }
    encoder_case, encoder_ops = _encoder_ops(cfg, device)
    return {
        "scoring_case": {"B": b, "N": n, "d": cfg["d"], "query_volumes": b},
        "scoring_ops": scoring_ops,
        "threads": thread_rows,
        "variants_query_volumes": len(volumes),
        "variants": variant_rows(cfg, device, volumes, real, exact_real),
        "real_tokens_check": real_check,
        "encoder_case": encoder_case,
        "encoder_ops": encoder_ops,
    }


def _ops_table(ops: list[dict]) -> str:
    return table(
        ["op", "self ms", "self %", "calls"], [[o["op"], o["self_ms"], o["self_pct"], o["calls"]] for o in ops]
    )


def render(prof: dict | None) -> list[str]:
    """Markdown of section 8."""
    md = ["## 8. Profiles and prototype variants", ""]
    if not prof or "scoring_ops" not in prof:
        return md + missing(prof)
    sc = prof["scoring_case"]
    for count, ops in prof["scoring_ops"].items():
        md += [
            f"Exact scorer, B={sc['B']}, N={sc['N']}, d={sc['d']}, all volumes querying, {count} "
            "thread(s), torch.profiler self CPU time:",
            "",
            _ops_table(ops),
            "",
        ]
    if prof.get("threads"):
        keys = ["B", "N", "threads", "s", "gflops", "s_1thread", "gflops_1thread", "speedup_1thread"]
        headers = ["B", "N", "threads", "s", "GFLOP/s", "s (1 thread)", "GFLOP/s (1 thread)", "1-thread speedup"]
        md += [
            "Same call with the configured threads vs one thread (interleaved):",
            "",
            table(headers, [[r[k] for k in keys] for r in prof["threads"]]),
            "",
        ]
    md += render_variants(prof["variants"], prof.get("variants_query_volumes"))
    if prof.get("real_tokens_check"):
        rc = prof["real_tokens_check"]
        md += [
            f"Baseline vs exact scorer on real tokens ({rc['tokens']}, B={rc['B']}, N={rc['N']}, "
            f"{pct(rc.get('valid_frac'))} valid): max abs diff {cell(rc['max_abs_diff_baseline'])}.",
            "",
        ]
    ec = prof["encoder_case"]
    return md + [
        f"Encoder forward, one slab of {ec['slices']} slices at R={ec['R']}, self CPU time:",
        "",
        _ops_table(prof["encoder_ops"]),
        "",
    ]
