"""Section 4: coarse-to-fine routing against exhaustive fine scoring, from :mod:`scripts.benchmarks.c2f`."""

from __future__ import annotations

import torch
from scripts.benchmarks.c2f import bench_c2f
from scripts.benchmarks.markdown import joined, missing, table
from scripts.benchmarks.values import jsonable

# Random tokens are the worst case for routing (no structure to follow); the structured bank shares
# an anatomy across volumes, which is what routing relies on. Both are reported.
KINDS = {"result": "random", "result_structured": "structured"}


def bench_c2f_section(cfg: dict, device: torch.device) -> dict:
    """:func:`scripts.benchmarks.c2f.bench_c2f` on random and on structured tokens.

    Args:
        cfg: the mode's configuration; ``cfg["c2f"]`` holds ``B``, ``n_coarse``, ``h``, ``d``, ``Ls``,
            ``repeats``.
        device: where to score.

    Returns:
        ``params`` and one ``bench_c2f`` result per key of :data:`KINDS`.
    """
    params = {k: cfg["c2f"][k] for k in ("B", "n_coarse", "h", "d", "Ls", "repeats")}
    out: dict = {"params": params}
    for key, kind in KINDS.items():
        out[key] = jsonable(bench_c2f(**params, device=str(device), tokens=kind))
    return out


def render(c2f: dict | None) -> list[str]:
    """Markdown of section 4: per token kind, the scalar figures and the per-L table."""
    md = ["## 4. C2F vs exhaustive fine", ""]
    if not c2f or "params" not in c2f:
        return md + missing(c2f)
    for key in KINDS:
        result = c2f[key]
        scalars = [[k, v] for k, v in result.items() if not isinstance(v, dict | list)]
        md += [f"From `scripts.benchmarks.c2f.bench_c2f` ({joined(result['params'])}):", ""]
        if scalars:
            md += [table(["figure", "value"], scalars), ""]
        runs = result["runs"]
        if runs:
            headers = list(runs[0])
            md += [table(headers, [[row.get(h) for h in headers] for row in runs]), ""]
    return md
