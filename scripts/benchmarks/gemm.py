"""Section 1, the GEMM roofline: GFLOP/s of the matrix shapes the exact scorer multiplies.

Three forms per reference size N and dtype: one ``[tile, d] x [d, N]`` product, the batched
``baddbmm`` over a group of G reference volumes (G from the scorer's block budget), and the same
group as one 2-D ``addmm``. The best fp32 rate at an N is the roofline the scoring section divides by.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from scripts.benchmarks.markdown import missing, table
from scripts.benchmarks.settings import scoring_defaults
from scripts.benchmarks.timing import median_time, thread_counts, threads
from scripts.benchmarks.values import significant


def group_size(n: int, tile: int, cfg: dict) -> int:
    """Reference volumes per GEMM group, as the scorer sizes it (capped by the largest batch used)."""
    block, _ = scoring_defaults()
    return max(1, min(block // (n * tile), max(cfg["score_b"]) - 1))


def _dtypes(device: torch.device) -> list[torch.dtype]:
    # fp16 GEMMs are emulated (slow) on most CPUs; they only make sense on a GPU.
    return [torch.float32, torch.bfloat16] + ([torch.float16] if device.type == "cuda" else [])


def _forms(n: int, g: int, cfg: dict, dtype: torch.dtype, device: torch.device) -> dict:
    """``{form name: (call, flops)}`` of the three GEMM forms at one (N, G, dtype)."""
    d, tile = cfg["d"], cfg["tile"]
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(tile, d, generator=gen).to(device, dtype)
    refs = torch.randn(g, n, d, generator=gen).to(device, dtype)
    norms = torch.randn(g, 1, n, generator=gen).to(device, dtype)
    flat, flat_norms = refs.reshape(g * n, d), norms.reshape(1, g * n)
    return {
        "mm [tile,d]x[d,N]": (lambda: q @ refs[0].t(), 2 * tile * n * d),
        "baddbmm [G,tile,N]": (
            lambda: torch.baddbmm(norms, q.expand(g, -1, -1), refs.transpose(1, 2), alpha=-2.0),
            2 * g * tile * n * d,
        ),
        "addmm [tile,G*N]": (lambda: torch.addmm(flat_norms, q, flat.t(), alpha=-2.0), 2 * g * tile * n * d),
    }


def bench_gemm(cfg: dict, device: torch.device) -> dict:
    """GFLOP/s of the scorer's GEMM shapes at every configured N, dtype, form and thread count.

    Args:
        cfg: the mode's configuration (``d``, ``tile``, ``gemm_n``, ``score_b``, ``repeats``,
            ``min_time``).
        device: where to multiply.

    Returns:
        ``rows`` (one per measurement) and ``roofline``: ``{str(N): {dtype[_1thread]: best GFLOP/s}}``.
    """
    block, _ = scoring_defaults()
    rows = []
    roofline: dict[str, dict[str, float]] = {}
    counts = thread_counts(device)
    for n in cfg["gemm_n"]:
        g = group_size(n, cfg["tile"], cfg)
        best = roofline.setdefault(str(n), {})
        for dtype in _dtypes(device):
            name = str(dtype).replace("torch.", "")
            for form, (fn, flops) in _forms(n, g, cfg, dtype, device).items():
                for count in counts:
                    with threads(count):
                        gflops = flops / median_time(fn, device, cfg["repeats"], cfg["min_time"]) / 1e9
                    rows.append(
                        {"form": form, "N": n, "G": g, "dtype": name, "threads": count, "gflops": significant(gflops)}
                    )
                    key = name if count == counts[0] else f"{name}_1thread"
                    best[key] = max(best.get(key, 0.0), round(gflops, 1))
    return {"tile": cfg["tile"], "d": cfg["d"], "block_elements": block, "rows": rows, "roofline": roofline}


def roofline_probe(n: int, cfg: dict, device: torch.device) -> tuple[Callable[[], object], int]:
    """``(call, flops)`` of the fp32 GEMM of the scorer's shape that runs fastest here.

    One ``addmm [tile, d] x [d, G*N]`` with the norm row; the scoring section times it interleaved
    with each case, so the fraction of the roofline is measured under the same load.
    """
    d, tile = cfg["d"], cfg["tile"]
    g = group_size(n, tile, cfg)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(tile, d, generator=gen).to(device)
    refs = torch.randn(g * n, d, generator=gen).to(device)
    norms = torch.randn(1, g * n, generator=gen).to(device)
    return (lambda: torch.addmm(norms, q, refs.t(), alpha=-2.0)), 2 * tile * g * n * d


def roof(gemm: dict | None, n: int, dtype: str = "float32") -> float | None:
    """Roofline GFLOP/s of ``dtype`` at the measured N nearest to ``n`` (``None`` when not measured)."""
    if not gemm or not gemm.get("roofline"):
        return None
    nearest = min(gemm["roofline"], key=lambda k: abs(int(k) - n))
    return gemm["roofline"][nearest].get(dtype)


def render(gemm: dict | None) -> list[str]:
    """Markdown of section 1."""
    md = ["## 1. GEMM roofline", ""]
    if not gemm or "rows" not in gemm:
        return md + missing(gemm)
    return md + [
        f"GFLOP/s of the scorer's shapes (d = {gemm['d']}, query tile {gemm['tile']}, G = reference "
        f"volumes per group from the scorer's block budget {gemm['block_elements']} elements). The "
        "roofline of a case is the best form at its N.",
        "",
        table(
            ["form", "N", "G", "dtype", "threads", "GFLOP/s"],
            [[r["form"], r["N"], r["G"], r["dtype"], r["threads"], r["gflops"]] for r in gemm["rows"]],
        ),
        "",
    ]
