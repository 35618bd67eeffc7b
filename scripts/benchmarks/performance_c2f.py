"""The ``c2f`` section of ``python -m scripts.benchmarks performance``: :func:`scripts.scoring.c2f_scores` against
exhaustive fine scoring for each routing budget ``L`` (time, Eq. 9's operation-count ratio, Spearman and mean
relative excess of the fine scores), on random and structured tokens, and on an F/MS run's real tokens."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from scripts.benchmarks.common import interleaved, significant


def theoretical_speedup(h: int, L: int, n_coarse: int) -> float:  # noqa: N803
    """Operation-count reduction of C2F over exhaustive fine matching (Eq. 9), ``h^2 / (1 + L h^2 / N_c)``."""
    return h**2 / (1 + min(L, n_coarse) * h**2 / n_coarse)


def synthetic_tokens(b: int, n_coarse: int, h: int, d: int, kind: str, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """``(coarse [b, N_c, d], fine [b, N_c, h, d])`` unit tokens, coarse = normalised mean of the children.

    ``random``: no structure, the worst case for routing; ``structured``: a smooth template shared by all
    volumes (the h children of a region alike) plus per-volume noise, what routing relies on.
    """
    gen = torch.Generator().manual_seed(seed)
    if kind == "random":
        fine = torch.randn(b, n_coarse, h, d, generator=gen)
    else:
        field = torch.randn(1, d, n_coarse + 4, generator=gen)
        region = F.normalize(F.avg_pool1d(field, 5, stride=1).transpose(1, 2).unsqueeze(2), dim=-1)
        template = F.normalize(region + 0.5 * torch.randn(1, n_coarse, h, d, generator=gen), dim=-1)
        fine = template + 0.8 * F.normalize(torch.randn(b, n_coarse, h, d, generator=gen), dim=-1)
    fine = F.normalize(fine, dim=-1)
    return F.normalize(fine.mean(dim=2), dim=-1), fine


def cache_c2f_bank(cache: str | Path, key: str) -> tuple[torch.Tensor, ...]:
    """``(coarse, fine [B, N_c, h, d], coarse_valid, fine_valid)`` of one grid of an F/MS run's cache."""
    from scripts.tokens import FINE_SUFFIX, children_last

    volumes = []
    for path in sorted(Path(cache).glob("*.pt")):
        grids = torch.load(path, map_location="cpu", weights_only=True)["grids"]
        (tc, vc), (tf, vf) = grids[key], grids[key + FINE_SUFFIX]
        h = tf.shape[0] // tc.shape[0]
        volumes.append((tc.reshape(-1, tc.shape[-1]), children_last(tf, h), vc.reshape(-1), children_last(vf, h)))
    return tuple(torch.stack(part) for part in zip(*volumes, strict=True))


def bench_c2f(
    B: int = 24,  # noqa: N803
    n_coarse: int = 2048,
    h: int = 4,
    d: int = 128,
    Ls: Sequence[int] = (1, 4, 16, 64),  # noqa: N803
    repeats: int = 1,
    device: str | torch.device = "cpu",
    tokens: str = "random",
    bank: tuple[torch.Tensor, ...] | None = None,
    rho: float = 0.1,
    query_volumes: int | None = 2,
) -> dict:
    """C2F against exhaustive fine scoring on synthetic ``tokens`` or a ``bank`` of :func:`cache_c2f_bank`.

    ``query_volumes`` volumes are scored against all ``B``; the time for all ``B`` is ``setup + (t - setup)
    B / query_volumes``, ``setup`` timed by a call scoring no volume. Times: minimum over ``repeats`` rounds.
    """
    from scipy.stats import spearmanr
    from scripts.scoring import c2f_scores, mutual_similarity_scores

    device = torch.device(device)
    if bank is None:
        coarse, fine = synthetic_tokens(B, n_coarse, h, d, tokens)
        cv, fv = torch.ones(fine.shape[:2], dtype=torch.bool), torch.ones(fine.shape[:3], dtype=torch.bool)
    else:
        (coarse, fine, cv, fv), tokens = bank, "real"
    coarse, fine, cv, fv = (t.to(device) for t in (coarse, fine, cv.bool(), fv.bool()))
    b, n, h, d = fine.shape
    flat, flat_valid = fine.reshape(b, n * h, d), fv.reshape(b, n * h)
    nq = b if query_volumes is None else max(1, min(query_volumes, b))
    scorers = {
        "exhaustive": lambda v: mutual_similarity_scores(flat, flat_valid, rho, volumes=v),
        "coarse": lambda v: mutual_similarity_scores(coarse, cv, rho, volumes=v),
        **{L: (lambda v, L=L: c2f_scores(coarse, fine, cv, fv, rho, L=L, volumes=v)[1]) for L in Ls},  # noqa: N803
    }
    fns = [
        fn for s in scorers.values() for fn in ((lambda s=s: s([])) if nq < b else None, lambda s=s: s(list(range(nq))))
    ]
    times, outs = interleaved(fns, device, repeats, warmup=False)
    seconds = {}
    for k, name in enumerate(scorers):
        setups = times[2 * k] or [0.0] * len(times[2 * k + 1])
        seconds[name] = min(s + max(0.0, t - s) * b / nq for s, t in zip(setups, times[2 * k + 1], strict=True))
    query_valid = flat_valid[:nq].reshape(-1)
    exact = outs[1][:nq].reshape(-1)[query_valid]
    runs = []
    for k, L in enumerate(Ls):  # noqa: N806
        approx = outs[2 * (k + 2) + 1][:nq].reshape(-1)[query_valid]
        speedup, theory = seconds["exhaustive"] / seconds[L], theoretical_speedup(h, L, n)
        spearman = float(spearmanr(approx.double().cpu(), exact.double().cpu()).statistic)
        excess = float(((approx - exact) / exact.clamp_min(1e-12)).mean())
        run = {"L": L, "c2f_s": significant(seconds[L]), "speedup": significant(speedup, 3)}
        run |= {"eq9": significant(theory, 3), "speedup_over_eq9": significant(speedup / theory, 3)}
        runs.append(run | {"spearman": significant(spearman, 4), "score_excess": significant(excess, 3)})
    params = {"tokens": tokens, "B": b, "n_coarse": n, "n_valid_coarse": round(float(cv.sum(1).float().mean()), 1)}
    params |= {"h": h, "d": d, "rho": rho, "query_volumes_timed": nq, "threads": torch.get_num_threads()}
    times = {"exhaustive_s": significant(seconds["exhaustive"]), "coarse_s": significant(seconds["coarse"])}
    return {"params": params, **times, "runs": runs}


def bench_c2f_section(cfg: dict, device: torch.device, cache: str | Path | None, key: str) -> list[dict]:
    """:func:`bench_c2f` on random and structured tokens, and on ``cache``'s grid ``key`` if it has one."""
    params = {**cfg["c2f"], "d": cfg["d"], "rho": cfg["rho"], "device": device}
    results = [bench_c2f(**params, tokens=kind) for kind in ("random", "structured")]
    if cache and any(Path(cache).glob("*.pt")):
        shared = {k: params[k] for k in ("Ls", "repeats", "rho", "device")}
        results.append(bench_c2f(**shared, bank=cache_c2f_bank(cache, key)))
    return results
