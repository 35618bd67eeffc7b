"""Mixed-precision scoring against the exact fp32 scorer and the MuSc-style baseline, side by side.

Three scorers on the same tokens, timed interleaved in one process (fp32, mixed, baseline, fp32,
...): :func:`scripts.scoring.mutual_similarity_scores` with ``precision="fp32"`` (the reference), the
same with the reduced-precision pass (``"auto"`` resolved on the device, or the one asked for), and
:func:`scripts.benchmarks.scoring_bench.musc_baseline` (``torch.cdist`` per reference volume). Cases:
random unit tokens (the acceptance case B = 24, N = 2048, d = 128) and the real tokens of a bundle
run's token cache (every (axis, layer), and their total). Speedups are medians of the per-round ratios;
``max |mixed - fp32|`` is the largest score difference over all tokens.

Usage: ``python -m scripts.benchmarks mixed [--cache eval/tokens] [--B 24 --N 2048] [--threads 1]``;
the harness runs it as its ``mixed`` section on the tokens of its 2B bundle run.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch
from scripts.benchmarks.markdown import missing, table
from scripts.benchmarks.scoring_bench import musc_baseline, synthetic_bank
from scripts.benchmarks.timing import interleaved, ratio, threads
from scripts.benchmarks.values import jsonable, significant


def _case(name: str, tokens: torch.Tensor, valid: torch.Tensor | None, cfg: dict, device: torch.device) -> dict:
    """One row: the three scorers timed interleaved on ``tokens``, their ratios and score differences."""
    from scripts.mixed_precision import resolve_precision
    from scripts.scoring import mutual_similarity_scores

    rho = cfg["rho"]
    precision = cfg.get("precision", "auto")
    used = resolve_precision(precision, device)
    if used == "fp32":  # auto chose fp32 here: still measure bf16, labelled as not the default
        used = "bf16"
    fns = [
        lambda: mutual_similarity_scores(tokens, valid, rho),
        lambda: mutual_similarity_scores(tokens, valid, rho, precision=used),
        lambda: musc_baseline(tokens, valid, rho),
    ]
    (t32, tmix, tbase), (s32, smix, sbase) = interleaved(fns, device, cfg["repeats"], cfg["case_s"], warmup=False)
    return {
        "case": name,
        "B": tokens.shape[0],
        "N": tokens.shape[1],
        "valid_frac": significant(1.0 if valid is None else float(valid.float().mean()), 3),
        "precision": used,
        "auto": resolve_precision("auto", device),
        "fp32_s": significant(statistics.median(t32)),
        "mixed_s": significant(statistics.median(tmix)),
        "baseline_s": significant(statistics.median(tbase)),
        "baseline_over_fp32": significant(ratio(tbase, t32), 3),
        "baseline_over_mixed": significant(ratio(tbase, tmix), 3),
        "fp32_over_mixed": significant(ratio(t32, tmix), 3),
        "max_abs_diff_mixed_fp32": float((smix - s32).abs().max()),
        "max_abs_diff_baseline_fp32": float((sbase - s32).abs().max()),
        "repeats": len(t32),
        "times": {"fp32": t32, "mixed": tmix, "baseline": tbase},
    }


def cache_banks(cache: str | Path, keys: str = "all") -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(key, tokens [B, N, d] fp32, valid [B, N])`` of every (axis, layer) in a bundle run's token
    cache (``keys="largest"``: the one with the most tokens)."""
    entries = [torch.load(p, map_location="cpu", weights_only=True)["grids"] for p in sorted(Path(cache).glob("*.pt"))]
    if len(entries) < 2:
        raise ValueError(f"{cache}: a token cache of at least 2 volumes is needed, found {len(entries)}")
    names = list(entries[0])
    if keys == "largest":
        names = [max(names, key=lambda k: entries[0][k][1].numel())]
    return [
        (
            k,
            torch.stack([e[k][0].reshape(-1, e[k][0].shape[-1]).float() for e in entries]),
            torch.stack([e[k][1].reshape(-1) for e in entries]).bool(),
        )
        for k in names
    ]


def _total(rows: list[dict], name: str) -> dict:
    """A row summing the times of ``rows`` round by round (the whole cache scored once per scorer)."""
    rounds = min(r["repeats"] for r in rows)
    sums = {s: [sum(r["times"][s][i] for r in rows) for i in range(rounds)] for s in ("fp32", "mixed", "baseline")}
    return {
        "case": name,
        "B": rows[0]["B"],
        "N": sum(r["N"] for r in rows),
        "valid_frac": None,
        "precision": rows[0]["precision"],
        "auto": rows[0]["auto"],
        "fp32_s": significant(statistics.median(sums["fp32"])),
        "mixed_s": significant(statistics.median(sums["mixed"])),
        "baseline_s": significant(statistics.median(sums["baseline"])),
        "baseline_over_fp32": significant(ratio(sums["baseline"], sums["fp32"]), 3),
        "baseline_over_mixed": significant(ratio(sums["baseline"], sums["mixed"]), 3),
        "fp32_over_mixed": significant(ratio(sums["fp32"], sums["mixed"]), 3),
        "max_abs_diff_mixed_fp32": max(r["max_abs_diff_mixed_fp32"] for r in rows),
        "max_abs_diff_baseline_fp32": max(r["max_abs_diff_baseline_fp32"] for r in rows),
        "repeats": rounds,
    }


def bench_mixed(cfg: dict, device: torch.device, cache: str | Path | None = None) -> dict:
    """The section: random unit tokens at ``cfg["mixed"]`` (``B``, ``N``, ``d``) and, with ``cache``,
    every (axis, layer) of its real tokens and their total.

    Args:
        cfg: ``rho``, ``repeats``, ``case_s`` and ``mixed`` (``B``, ``N``, ``d``, optional ``keys``,
            ``precision``).
        device: where to score.
        cache: a bundle run's token cache folder (``None``: random tokens only).
    """
    m = cfg["mixed"]
    case_cfg = {"rho": cfg["rho"], "repeats": cfg["repeats"], "case_s": cfg["case_s"], **m}
    tokens, _ = synthetic_bank(m["B"], m["N"], m["d"], seed=m["B"] * 1000 + m["N"], device=device)
    rows = [_case("random unit tokens", tokens, None, case_cfg, device)]
    note = None
    if cache is not None and Path(cache).is_dir():
        real = [
            _case(f"real {key}", t.to(device), v.to(device), case_cfg, device)
            for key, t, v in cache_banks(cache, m.get("keys", "all"))
        ]
        rows += real + ([_total(real, "real, all keys")] if len(real) > 1 else [])
        note = f"real tokens: {cache}"
    for row in rows:
        row.pop("times", None)
    return {"rows": rows, "rho": cfg["rho"], "threads": torch.get_num_threads(), "real": note}


_HEADERS = [
    "case",
    "B",
    "N",
    "valid",
    "pass",
    "fp32 s",
    "mixed s",
    "baseline s",
    "baseline / fp32",
    "baseline / mixed",
    "fp32 / mixed",
    "max abs diff mixed-fp32",
    "max abs diff baseline-fp32",
    "reps",
]


def render(section: dict | None) -> list[str]:
    """Markdown of the section."""
    md = ["## 2b. Mixed-precision scoring (exact where it matters) vs fp32 vs the MuSc-style baseline", ""]
    if not section or "rows" not in section:
        return md + missing(section)
    rows = [
        [
            r["case"],
            r["B"],
            r["N"],
            r["valid_frac"],
            r["precision"] + ("" if r["precision"] == r["auto"] else f" (auto: {r['auto']})"),
            r["fp32_s"],
            r["mixed_s"],
            r["baseline_s"],
            r["baseline_over_fp32"],
            r["baseline_over_mixed"],
            r["fp32_over_mixed"],
            r["max_abs_diff_mixed_fp32"],
            r["max_abs_diff_baseline_fp32"],
            r["repeats"],
        ]
        for r in section["rows"]
    ]
    return md + [
        "The three scorers timed interleaved in one process on the same tokens (rho = "
        f"{section['rho']}, {section['threads']} thread(s)); ratios are medians of per-round ratios. "
        "`pass`: the reduced-precision distance pass of the mixed scorer (candidates within its error "
        "bound decided exactly in fp32). " + (section["real"] or "No real tokens (no token cache)."),
        "",
        table(_HEADERS, rows),
        "",
    ]


def main(
    B: int = 24,  # noqa: N803 - the paper's B
    N: int = 2048,  # noqa: N803 - the paper's N
    d: int = 128,
    cache: str | None = None,
    keys: str = "all",
    repeats: int = 3,
    rho: float = 0.1,
    threads_: int | None = None,
    device: str = "cpu",
    precision: str = "auto",
) -> dict:
    """The command ``python -m scripts.benchmarks mixed``: print the table and the JSON result."""
    cfg = {
        "rho": rho,
        "repeats": repeats,
        "case_s": float("inf"),
        "mixed": {"B": B, "N": N, "d": d, "keys": keys, "precision": precision},
    }
    with threads(threads_):
        result = bench_mixed(cfg, torch.device(device), cache)
    print("\n".join(render(result)))
    print(json.dumps(jsonable(result), indent=1))
    return result
