"""Coarse-to-fine routing vs exhaustive fine scoring: time and agreement (paper Sec. 3.6, Eq. 8-9).

``bench_c2f`` scores one synthetic token bank two ways, the exact exhaustive scorer on the fine tokens
(:func:`scripts.scoring.mutual_similarity_scores`, Eq. 8) and :func:`scripts.scoring.c2f_scores` for
each routing budget ``L`` (Eq. 9), and reports per ``L``:

* ``c2f_s`` and ``speedup = exhaustive_s / c2f_s`` next to the operation-count reduction of Eq. 9,
  ``h^2 / (1 + L h^2 / N_c)`` (``theoretical``), and their ratio;
* agreement with exhaustive: Spearman rank correlation of the fine scores, the fraction of
  (fine query, reference volume) pairs whose routed nearest fine token is the exhaustive one
  (``nn_match``), and the mean relative score excess (``score_excess``; routed distances are never
  smaller than exhaustive ones).

Both scorers do the same work for every query volume, so a subset of ``query_volumes`` query volumes
is timed (all ``B`` volumes remain references) and the time for all ``B`` is ``setup + (t - setup) *
B / query_volumes``, with ``setup`` (norms, masks, buffers: once per call) timed by a call that scores
no volume; the result says which was done. ``tokens="random"`` draws unit-norm fine tokens (no structure:
a worst case for routing); ``"structured"`` shares an anatomy template across volumes (each fine
token = template + per-volume noise, children of one coarse region correlated), which is what
routing relies on. Coarse tokens are the normalised mean of their children, as depth pooling makes
them.

Usage: ``python -m scripts.benchmarks c2f --B 24 --n_coarse 2048 --h 4 --Ls 1,4,16,64``, or on the real
tokens an F/MS bundle run cached: ``python -m scripts.benchmarks c2f --cache OUT/tokens --key axial/0``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from scripts.scoring import (
    DEFAULT_BLOCK_ELEMENTS,
    c2f_scores,
    c2f_tiles,
    mutual_similarity_scores,
    nearest_distance_profile,
)

__all__ = ["bench_c2f", "load_bank", "synthetic_tokens", "theoretical_speedup"]


def theoretical_speedup(h: int, L: int, n_coarse: int) -> float:  # noqa: N803
    """Operation-count reduction of C2F over exhaustive fine matching, ``h^2 / (1 + L h^2 / N_c)``."""
    return h**2 / (1 + min(L, n_coarse) * h**2 / n_coarse)


def synthetic_tokens(
    b: int, n_coarse: int, h: int, d: int, kind: str = "random", noise: float = 0.8, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(coarse [b, N_c, d], fine [b, N_c, h, d])`` unit-norm tokens (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "random":
        fine = torch.randn(b, n_coarse, h, d, generator=gen)
    elif kind == "structured":
        # A smooth "anatomy" along the token order (neighbouring regions alike), shared by all volumes;
        # the h children of a region share its vector; each volume adds its own noise.
        field = torch.randn(1, d, n_coarse + 4, generator=gen)
        region = F.avg_pool1d(field, 5, stride=1).transpose(1, 2).unsqueeze(2)  # [1, N_c, 1, d]
        template = F.normalize(
            F.normalize(region, dim=-1) + 0.5 * torch.randn(1, n_coarse, h, d, generator=gen), dim=-1
        )
        fine = template + noise * F.normalize(torch.randn(b, n_coarse, h, d, generator=gen), dim=-1)
    else:
        raise ValueError(f"tokens must be 'random' or 'structured', got {kind!r}")
    fine = F.normalize(fine, dim=-1)
    return F.normalize(fine.mean(dim=2), dim=-1), fine


def load_bank(folder: str | Path, key: str = "axial/0") -> tuple[torch.Tensor, ...]:
    """``(coarse, fine, coarse_valid, fine_valid)`` of one axis x layer from a bundle run's token cache.

    ``folder`` is the ``tokens/`` folder of an F/MS run (:mod:`scripts.storage.cache` entries, one ``.pt`` per
    volume, holding the ``"{axis}/{layer}"`` and ``"{axis}/{layer}/fine"`` grids); the fine grids are
    regrouped as the ``h`` depth children of each coarse token, as the inferer does.
    """
    from scripts.tokens import FINE_SUFFIX, children_last

    coarse, fine, coarse_valid, fine_valid = [], [], [], []
    for path in sorted(Path(folder).glob("*.pt")):
        grids = torch.load(path, map_location="cpu", weights_only=True)["grids"]
        if key + FINE_SUFFIX not in grids:
            raise ValueError(f"{path} has no {key + FINE_SUFFIX!r} grid: use the tokens of an F/MS run")
        (tc, vc), (tf, vf) = grids[key], grids[key + FINE_SUFFIX]
        h = tf.shape[0] // tc.shape[0]
        coarse.append(tc.reshape(-1, tc.shape[-1]))
        coarse_valid.append(vc.reshape(-1))
        fine.append(children_last(tf, h))
        fine_valid.append(children_last(vf, h))
    if len(coarse) < 2:
        raise ValueError(f"need at least 2 cached volumes in {folder}, found {len(coarse)}")
    return tuple(torch.stack(t) for t in (coarse, fine, coarse_valid, fine_valid))


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a.double().cpu().numpy(), b.double().cpu().numpy()).statistic)


def _timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """``(seconds, output)`` of one call of ``fn``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


@dataclass
class _Bank:
    """Coarse and fine tokens with their masks, and the fine tokens flattened per volume."""

    coarse: torch.Tensor  # [B, N_c, d]
    fine: torch.Tensor  # [B, N_c, h, d]
    coarse_valid: torch.Tensor  # [B, N_c]
    fine_valid: torch.Tensor  # [B, N_c, h]
    kind: str

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(B, N_c, h, d)``."""
        return tuple(self.fine.shape)  # type: ignore[return-value]

    @property
    def flat(self) -> torch.Tensor:
        b, n, h, d = self.shape
        return self.fine.reshape(b, n * h, d)

    @property
    def flat_valid(self) -> torch.Tensor:
        b, n, h, _ = self.shape
        return self.fine_valid.reshape(b, n * h)


def _make_bank(
    size: tuple[int, int, int, int], tokens: str, seed: int, bank: tuple | None, device: torch.device
) -> _Bank:
    """The bank to score: a given one (masks optional) or synthetic tokens of ``size = (B, N_c, h, d)``."""
    if bank is None:
        coarse, fine = (t.to(device) for t in synthetic_tokens(*size, kind=tokens, seed=seed))
        coarse_valid = fine_valid = None
    else:
        coarse, fine, coarse_valid, fine_valid = (*bank, None, None)[:4]
        coarse, fine, tokens = coarse.to(device), fine.to(device), "given bank"
    b, n, h, _ = fine.shape
    cv = torch.ones(b, n, dtype=torch.bool) if coarse_valid is None else coarse_valid.bool()
    fv = torch.ones(b, n, h, dtype=torch.bool) if fine_valid is None else fine_valid.bool()
    return _Bank(coarse, fine, cv.to(device), fv.to(device), tokens)


def _time_all(
    scorers: dict[str, Callable[[list[int]], object]], n_query: int, b: int, repeats: int, device: torch.device
) -> tuple[dict[str, float], dict[str, object]]:
    """Seconds for all ``b`` query volumes per scorer (minimum over rounds), and each one's output.

    Every scorer is timed once per round and rounds are interleaved, so that a change of machine load
    between rounds hits all of them alike. The time for all ``b`` volumes is the once-per-call setup
    (timed by a call scoring no volume) plus the per-volume part scaled from the ``n_query`` measured.
    """
    volumes = list(range(n_query))
    seconds: dict[str, float] = {}
    outputs: dict[str, object] = {}
    for _ in range(max(1, repeats)):
        for name, score in scorers.items():
            setup = _timed(lambda score=score: score([]), device)[0] if n_query < b else 0.0
            t, outputs[name] = _timed(lambda score=score: score(volumes), device)
            seconds[name] = min(seconds.get(name, float("inf")), setup + max(0.0, t - setup) * b / n_query)
    return seconds, outputs


def _exact_nearest(bank: _Bank, n_query: int, block_elements: int) -> list[torch.Tensor]:
    """Exhaustive nearest fine token per (fine query, reference volume), ``[N_c h, B]`` per query volume."""
    flat, flat_valid = bank.flat, bank.flat_valid
    # Squared norms in the form nearest_distance_profile takes: fp32, +inf where invalid (never nearest).
    f32 = flat.float()
    norms = torch.einsum("...d,...d->...", f32, f32).masked_fill(~flat_valid, float("inf"))
    return [nearest_distance_profile(f32[i], flat, norms, i, block_elements)[1] for i in range(n_query)]


def _nn_match(bank: _Bank, L: int, exact_nn: list[torch.Tensor], block_elements: int) -> float:  # noqa: N803
    """Fraction of (valid fine query, other volume) pairs whose routed nearest token is the exhaustive one."""
    b, _, h, _ = bank.shape
    flat_valid = bank.flat_valid
    matched = total = 0
    tiles = c2f_tiles(
        bank.coarse,
        bank.fine,
        bank.coarse_valid,
        bank.fine_valid,
        L=L,
        block_elements=block_elements,
        volumes=list(range(len(exact_nn))),
    )
    for i, idx, (_, _, _, fine_nn) in tiles:
        rows = (idx.unsqueeze(1) * h + torch.arange(h, device=idx.device)).reshape(-1)
        ok = flat_valid[i, rows]
        others = torch.arange(b, device=flat_valid.device) != i
        same = fine_nn.reshape(-1, b)[ok][:, others] == exact_nn[i][rows][ok][:, others]
        matched += int(same.sum())
        total += same.numel()
    return matched / max(1, total)


def _run_figures(
    L: int,  # noqa: N803
    c2f_s: float,
    exhaustive_s: float,
    approx: torch.Tensor,
    exact: torch.Tensor,
    nn_match: float,
    n_coarse: int,
    h: int,
) -> dict:
    """Time and agreement of one routing budget ``L`` (scores of the valid fine queries timed)."""
    speedup = exhaustive_s / c2f_s
    theory = theoretical_speedup(h, L, n_coarse)
    return {
        "L": int(L),
        "c2f_s": round(c2f_s, 4),
        "speedup": round(speedup, 2),
        "theoretical": round(theory, 2),
        "speedup_over_theory": round(speedup / theory, 3),
        "spearman": round(_spearman(approx, exact), 5),
        "nn_match": round(nn_match, 5),
        "score_excess": round(float(((approx - exact) / exact.clamp_min(1e-12)).mean()), 5),
    }


def _params(bank: _Bank, rho: float, device: torch.device, repeats: int, n_query: int) -> dict:
    b, n_coarse, h, d = bank.shape
    times = f"seconds for all {b} query volumes"
    return {
        "B": b,
        "n_coarse": n_coarse,
        "n_valid_coarse": round(float(bank.coarse_valid.sum(dim=1).float().mean()), 1),
        "h": h,
        "d": d,
        "rho": rho,
        "tokens": bank.kind,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "query_volumes_timed": n_query,
        "times": f"{times}, scaled from {n_query} measured + setup" if n_query < b else times,
    }


def bench_c2f(
    B: int = 24,  # noqa: N803
    n_coarse: int = 2048,
    h: int = 4,
    d: int = 128,
    Ls: Sequence[int] = (1, 4, 16, 64),  # noqa: N803
    repeats: int = 1,
    device: str | torch.device = "cpu",
    *,
    rho: float = 0.1,
    query_volumes: int | None = 2,
    tokens: str = "random",
    bank: tuple[torch.Tensor, ...] | None = None,
    threads: int | None = None,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
    seed: int = 0,
) -> dict:
    """Time and agreement of C2F against exhaustive fine scoring (see the module docstring).

    Args:
        B, n_coarse, h, d: batch size, coarse tokens per volume ``N_c``, fine children per coarse
            token, token dimension (ignored when ``bank`` is given).
        Ls: routing budgets to measure.
        repeats: timing rounds, every scorer once per round (the minimum is kept).
        device: where the bank lives and is scored.
        rho: neighbour ratio (``K`` rule of Eq. 2).
        query_volumes: number of query volumes timed and compared (``None``: all ``B``); times are
            scaled to all ``B``.
        tokens: ``"random"`` or ``"structured"`` (see :func:`synthetic_tokens`).
        bank: real tokens instead, ``(coarse [B, N_c, d], fine [B, N_c, h, d][, coarse_valid,
            fine_valid])`` as :func:`scripts.scoring.c2f_scores` takes them. Eq. 9 is evaluated at
            ``N_c`` (all coarse tokens): both scorers skip invalid queries but run their GEMMs over
            every reference token (invalid ones masked), so that is the operation count measured.
        threads: ``torch.set_num_threads`` for the run (restored afterwards); ``None`` leaves it.
        block_elements: scorer block budget.
        seed: token seed.

    Returns:
        ``{"params": ..., "exhaustive_s": ..., "coarse_exact_s": ..., "runs": [per-L dicts]}``; times are
        seconds for scoring all ``B`` volumes.
    """
    device = torch.device(device)
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        bk = _make_bank((B, n_coarse, h, d), tokens, seed, bank, device)
        B, n_coarse, h, d = bk.shape  # noqa: N806
        n_query = B if query_volumes is None else max(1, min(int(query_volumes), B))
        cv, fv = bk.coarse_valid, bk.fine_valid
        scorers: dict[str, Callable[[list[int]], object]] = {
            "exhaustive": lambda v: mutual_similarity_scores(
                bk.flat, bk.flat_valid, rho, block_elements=block_elements, volumes=v
            ),
            "coarse": lambda v: mutual_similarity_scores(bk.coarse, cv, rho, block_elements=block_elements, volumes=v),
        }
        for L in Ls:  # noqa: N806
            scorers[f"L={L}"] = lambda v, L=L: c2f_scores(  # noqa: N803
                bk.coarse, bk.fine, cv, fv, rho, L=L, block_elements=block_elements, volumes=v
            )
        seconds, outputs = _time_all(scorers, n_query, B, repeats, device)
        query_valid = bk.flat_valid[:n_query].reshape(-1)
        exact = outputs["exhaustive"][:n_query].reshape(-1)[query_valid]
        exact_nn = _exact_nearest(bk, n_query, block_elements)
        runs = []
        for L in Ls:  # noqa: N806
            approx = outputs[f"L={L}"][1][:n_query].reshape(-1)[query_valid]
            nn_match = _nn_match(bk, L, exact_nn, block_elements)
            runs.append(_run_figures(L, seconds[f"L={L}"], seconds["exhaustive"], approx, exact, nn_match, n_coarse, h))
        return {
            "params": _params(bk, rho, device, repeats, n_query),
            "exhaustive_s": round(seconds["exhaustive"], 4),
            "coarse_exact_s": round(seconds["coarse"], 4),
            "runs": runs,
        }
    finally:
        torch.set_num_threads(previous_threads)


def format_table(result: dict) -> str:
    """A plain-text table of :func:`bench_c2f`'s result."""
    p = result["params"]
    lines = [
        f"B={p['B']} N_c={p['n_coarse']} (valid {p['n_valid_coarse']}) h={p['h']} d={p['d']} "
        f"tokens={p['tokens']} device={p['device']} "
        f"threads={p['threads']}; {p['times']}",
        f"exhaustive fine: {result['exhaustive_s']:.2f} s   coarse only (exact): {result['coarse_exact_s']:.2f} s",
        f"{'L':>4} {'C2F s':>9} {'speedup':>8} {'Eq.9':>7} {'ratio':>6} {'spearman':>9} {'NN match':>9} {'excess':>8}",
    ]
    for r in result["runs"]:
        lines.append(
            f"{r['L']:>4} {r['c2f_s']:>9.2f} {r['speedup']:>8.2f} {r['theoretical']:>7.2f} "
            f"{r['speedup_over_theory']:>6.2f} {r['spearman']:>9.4f} {r['nn_match']:>9.4f} "
            f"{r['score_excess']:>8.4f}"
        )
    return "\n".join(lines)


def main(cache: str | None = None, key: str = "axial/0", **kwargs) -> dict:
    """The ``c2f`` command: print the table and the JSON result.

    Args:
        cache: a token cache folder of an F/MS run (real tokens, see :func:`load_bank`); ``None``:
            synthetic tokens.
        key: the ``"{axis}/{layer}"`` grid of the cache to use.
        kwargs: passed to :func:`bench_c2f`.

    Returns:
        :func:`bench_c2f`'s result.
    """
    import json

    if cache is not None:
        kwargs["bank"] = load_bank(cache, key)
    result = bench_c2f(**kwargs)
    print(format_table(result))
    print(json.dumps(result, indent=2))
    return result
