"""Prototype scorer variants (measured by the profile section, never used by the bundle).

:func:`prototype_scores` computes the exact scores with the maths and tiling of
:func:`scripts.scoring.mutual_similarity_scores` (Eq. 1-2, query tiles, groups of G reference
volumes per GEMM, the K chosen distances recomputed in fp32), with options the shipped scorer does
not take: packing the valid references, other GEMM forms, a reduced-precision GEMM.
:func:`variant_rows` times each variant against the shipped scorer and reports its score error.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence

import torch
from scripts.benchmarks.markdown import table
from scripts.benchmarks.scoring_bench import exact_scorer, synthetic_bank
from scripts.benchmarks.settings import scoring_defaults
from scripts.benchmarks.timing import paired, ratio
from scripts.benchmarks.values import rounded, significant

FORMS = ("baddbmm", "addmm", "augmented")


def _references(
    t32: torch.Tensor, valid: torch.Tensor, pack: bool
) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(M, references [B, M, d], their validity, squared norms with +inf where invalid)``.

    Packed: each volume's valid tokens first (stable order), cut to the largest valid count, so that
    the GEMMs skip invalid references instead of computing them and discarding them through the norm.
    """
    d = t32.shape[-1]
    if pack:
        m = int(valid.sum(dim=1).max())
        order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)[:, :m]
        ref = torch.gather(t32, 1, order.unsqueeze(-1).expand(-1, -1, d))
        ref_valid = torch.gather(valid, 1, order)
    else:
        m, ref, ref_valid = t32.shape[1], t32, valid
    sq = ref.pow(2).sum(dim=-1).masked_fill(~ref_valid, float("inf"))
    return m, ref, ref_valid, sq


def _reference_operand(ref: torch.Tensor, sq: torch.Tensor, form: str, dtype: torch.dtype) -> torch.Tensor:
    """The ``[B * M, width]`` GEMM operand: the references, or ``[-2 r, |r|^2]`` for "augmented"."""
    b, m, d = ref.shape
    if form != "augmented":
        return ref.to(dtype).reshape(b * m, d)
    width = (d + 1 + 7) // 8 * 8  # inner dim padded to a multiple of 8 for the GEMM kernels
    flat = torch.zeros(b * m, width, dtype=dtype, device=ref.device)
    flat[:, :d] = (-2.0 * ref).reshape(b * m, d)
    flat[:, d] = sq.reshape(-1)
    return flat


def _query_operand(q: torch.Tensor, width: int, form: str, dtype: torch.dtype) -> torch.Tensor:
    """The queries as the GEMM's left operand: ``[q, 1, 0...]`` for "augmented" (picks up ``|r|^2``)."""
    if form != "augmented":
        return q.to(dtype)
    qg = torch.zeros(q.shape[0], width, dtype=dtype, device=q.device)
    qg[:, : q.shape[1]] = q
    qg[:, q.shape[1]] = 1.0
    return qg


def _group_minima(
    qg: torch.Tensor, flat: torch.Tensor, sq: torch.Tensor, g0: int, g1: int, m: int, form: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest squared distance (up to the constant ``|q|^2``) and its index in volumes ``g0:g1``.

    Returns ``([Q, G] values, [Q, G] indices)``; the min runs along the contiguous last dim.
    """
    g, nq = g1 - g0, qg.shape[0]
    if form == "baddbmm":
        refs = flat[g0 * m : g1 * m].view(g, m, -1)
        d2 = torch.baddbmm(sq[g0:g1].unsqueeze(1).to(qg.dtype), qg.expand(g, -1, -1), refs.transpose(1, 2), alpha=-2.0)
        best = d2.min(dim=-1)  # [G, Q]
        return best.values.t().float(), best.indices.t()
    refs = flat[g0 * m : g1 * m].t()
    if form == "augmented":
        d2 = qg @ refs
    elif qg.dtype == torch.float32:
        d2 = torch.addmm(sq[g0:g1].reshape(1, -1), qg, refs, alpha=-2.0)
    else:
        d2 = torch.add(sq[g0:g1].reshape(1, -1), (qg @ refs).float(), alpha=-2.0)
    best = d2.view(nq, g, m).min(dim=-1)
    return best.values.float(), best.indices


def prototype_scores(
    tokens: torch.Tensor,
    valid: torch.Tensor | None = None,
    rho: float = 0.1,
    gemm_dtype: torch.dtype = torch.float32,
    query_tile: int = 1024,
    block_elements: int = 1 << 24,
    volumes: Sequence[int] | None = None,
    form: str = "baddbmm",
    pack: bool = False,
) -> torch.Tensor:
    """Prototype exact scorer for the optimisation proposals (see the module docstring).

    Args:
        tokens, valid, rho, volumes: as :func:`scripts.scoring.mutual_similarity_scores`.
        gemm_dtype: dtype of the distance GEMM. The K chosen distances are recomputed in fp32, so a
            reduced precision only changes *which* neighbour is chosen.
        query_tile: queries per tile.
        block_elements: budget of one ``[G, Q, M]`` distance block; sets the group size G.
        form: ``"baddbmm"`` (the scorer's batched ``baddbmm(|r|^2, q, r^T)`` per group), ``"addmm"``
            (one 2-D ``[Q, d] x [d, G*M]`` product per group) or ``"augmented"`` (the norm folded into
            the GEMM as ``[q, 1] . [-2 r, |r|^2]``, so no pass broadcasts the norms into the output).
        pack: GEMMs over valid references only (see :func:`_references`).

    Returns:
        ``[B, N]`` float32 scores, 0 for invalid tokens and volumes not in ``volumes``.

    Raises:
        ValueError: unknown ``form``.
    """
    from scripts.scoring import num_neighbours

    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    b, n, _ = tokens.shape
    k = num_neighbours(b, rho)
    valid = torch.ones(b, n, dtype=torch.bool, device=tokens.device) if valid is None else valid
    t32 = tokens.float()
    m, ref, _, sq = _references(t32, valid, pack)
    flat = _reference_operand(ref, sq, form, gemm_dtype)
    scores = torch.zeros(b, n, dtype=torch.float32, device=tokens.device)
    for i in range(b) if volumes is None else volumes:
        query_index = torch.nonzero(valid[i]).flatten()
        for start in range(0, query_index.numel(), query_tile):
            idx = query_index[start : start + query_tile]
            q = t32[i, idx]
            qg = _query_operand(q, flat.shape[1], form, gemm_dtype)
            group = max(1, block_elements // (m * idx.numel()))
            profile = torch.full((idx.numel(), b), float("inf"), device=tokens.device)
            nearest = torch.zeros((idx.numel(), b), dtype=torch.long, device=tokens.device)
            for lo, hi in ((0, i), (i + 1, b)):  # every volume but the query's own
                for g0 in range(lo, hi, group):
                    g1 = min(g0 + group, hi)
                    profile[:, g0:g1], nearest[:, g0:g1] = _group_minima(qg, flat, sq, g0, g1, m, form)
            chosen = profile.topk(k, dim=1, largest=False).indices
            refs_k = ref[chosen, nearest.gather(1, chosen)]
            scores[i, idx] = (q.unsqueeze(1) - refs_k).norm(dim=-1).mean(dim=1)
    return scores


# The scorer's block before its current default (a 64 MiB fp32 distance block).
PREVIOUS_BLOCK = 1 << 24
UNPACKED = "unpacked, block_elements=2^24 (the scorer before packing)"
PREVIOUS_DEFAULT = "scorer, block_elements=2^24 (previous default)"
# label -> (form, GEMM dtype, pack, block elements; None: the scorer's default)
PROTOTYPES = {
    UNPACKED: ("baddbmm", torch.float32, False, PREVIOUS_BLOCK),
    "one addmm per group": ("addmm", torch.float32, True, None),
    "norms folded into the GEMM (augmented)": ("augmented", torch.float32, True, None),
    "augmented, bf16 GEMM": ("augmented", torch.bfloat16, True, None),
    "augmented, fp16 GEMM": ("augmented", torch.float16, True, None),
}


def variant_fn(label: str, rho: float) -> Callable[[torch.Tensor, torch.Tensor, list[int] | None], torch.Tensor]:
    """``(tokens, valid, volumes) -> scores`` of the variant ``label``."""
    from scripts.scoring import mutual_similarity_scores

    block, tile = scoring_defaults()
    if label == PREVIOUS_DEFAULT:
        return lambda t, v, q: mutual_similarity_scores(t, v, rho, tile, PREVIOUS_BLOCK, volumes=q)
    form, dtype, pack, blk = PROTOTYPES[label]
    return lambda t, v, q: prototype_scores(t, v, rho, dtype, tile, blk or block, q, form, pack)


def variant_labels(device: torch.device) -> list[str]:
    """The variants measured on ``device`` (an fp16 GEMM is only worth trying on a GPU)."""
    labels = [UNPACKED, PREVIOUS_DEFAULT, *list(PROTOTYPES)[1:]]
    return labels if device.type == "cuda" else [x for x in labels if "fp16" not in x]


def _real_figures(
    fn: Callable, real: tuple, exact: torch.Tensor, rho: float, reps: int, cfg: dict, device: torch.device
) -> dict:
    """A variant against the exact scorer on real tokens (all volumes): speed and score error."""
    from scripts.scoring import mutual_similarity_scores

    rt, rv, key = real
    tr, tv, _, approx = paired(
        lambda: mutual_similarity_scores(rt, rv, rho),
        lambda: fn(rt, rv, None),
        device,
        reps,
        cfg["case_s"],
        warmup=False,
    )
    return {
        "real_tokens": f"{key} of the B={rt.shape[0]} bundle run, N={rt.shape[1]}",
        "scorer_s_real": significant(statistics.median(tr)),
        "speedup_real": significant(ratio(tr, tv), 3),
        "max_abs_diff_real": float((exact - approx).abs().max()),
        "max_rel_diff_real": float(((exact - approx).abs() / exact.abs().clamp_min(1e-6)).max()),
    }


def variant_rows(
    cfg: dict, device: torch.device, volumes: list[int], real: tuple | None, exact_real: torch.Tensor | None
) -> list[dict]:
    """Each variant timed interleaved with the exact scorer, and its largest score difference.

    Args:
        cfg: the mode's configuration (``d``, ``rho``, ``invalid``, ``profile``, ``case_s``, repeats).
        device: where to score.
        volumes: query volumes of the random-token comparison.
        real: ``(tokens, valid, key)`` of a bundle run, or ``None``.
        exact_real: the exact scores of ``real``.

    Returns:
        One dict per variant of :func:`variant_labels`.
    """
    b, n, rho = cfg["profile"]["B"], cfg["profile"]["N"], cfg["rho"]
    # Masked random tokens (like a masked bank), so that packing shows.
    tokens, valid = synthetic_bank(b, n, cfg["d"], cfg["invalid"], seed=8, device=device)
    scorer = exact_scorer(tokens, valid, rho, volumes)
    reps = cfg.get("variant_repeats", cfg["repeats"])
    rows = []
    for label in variant_labels(device):
        fn = variant_fn(label, rho)
        ts, tp, out_s, out_p = paired(scorer, lambda fn=fn: fn(tokens, valid, volumes), device, reps, cfg["case_s"])
        row = {
            "variant": label,
            "B": b,
            "N": n,
            "scorer_s": rounded(statistics.median(ts), 4),
            "variant_s": rounded(statistics.median(tp), 4),
            "speedup": rounded(ratio(ts, tp), 2),
            "max_abs_diff_random": float((out_s[volumes] - out_p[volumes]).abs().max()),
        }
        if real is not None:
            row.update(_real_figures(fn, real, exact_real, rho, reps, cfg, device))
        rows.append(row)
    return rows


def render_variants(variants: list[dict], query_volumes: int | None) -> list[str]:
    """The variants table of the profile section."""
    keys = ["variant", "scorer_s", "variant_s", "speedup", "max_abs_diff_random"]
    keys += ["scorer_s_real", "speedup_real", "max_abs_diff_real", "max_rel_diff_real"]
    headers = ["variant", "scorer s", "variant s", "speedup", "max abs diff"]
    headers += ["scorer s (real)", "speedup (real)", "max abs diff (real)", "max rel diff (real)"]
    return [
        "Scorer variants (the previous scorer and `prototype_scores`; speedup = scorer time / variant "
        "time, > 1: the variant is faster than the shipped scorer; interleaved with the exact scorer "
        f"on the same random tokens with 30 % invalid, {query_volumes} query volume(s); and on the real "
        "tokens of the 2B bundle run, all volumes):",
        "",
        table(headers, [[v.get(k) for k in keys] for v in variants]),
        "",
    ]
