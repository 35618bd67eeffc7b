"""The benchmark's reference scorers against an independent brute force: the MuSc-style baseline and the
prototype variants must compute the exact scores, or the speed ratios they report would compare
different things."""

from __future__ import annotations

import math

import pytest
import torch
from scripts.benchmarks.prototypes import FORMS, prototype_scores
from scripts.benchmarks.scoring_bench import effective_flops, musc_baseline, synthetic_bank
from scripts.scoring import mutual_similarity_scores


def brute_force(tokens: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
    """Eq. 1-2 over all tokens at once, in float64: every token's distance to every other token,
    the nearest per other volume, the mean of the ``k`` smallest of those; invalid tokens score 0."""
    b, n, d = tokens.shape
    flat = tokens.reshape(b * n, d).double()
    dist = torch.cdist(flat, flat)
    dist[:, ~valid.reshape(-1)] = math.inf  # invalid references are never the nearest
    per_volume = dist.view(b * n, b, n).min(dim=2).values  # [B N, B]
    own = torch.arange(b).repeat_interleave(n)
    per_volume[torch.arange(b * n), own] = math.inf  # a volume is not its own reference
    scores = per_volume.sort(dim=1).values[:, :k].mean(dim=1)
    scores[~valid.reshape(-1)] = 0.0
    return scores.view(b, n).float()


# (B, rho, K = max(1, floor(rho (B - 1))) worked out by hand): K > 1, and K clamped up to 1.
CASES = [(5, 0.5, 2), (6, 0.1, 1), (9, 0.4, 3)]


@pytest.mark.parametrize(("b", "rho", "k"), CASES)
def test_baseline_and_prototypes_match_the_exact_scorer(b: int, rho: float, k: int) -> None:
    tokens, valid = synthetic_bank(b, 48, 16, invalid=0.3, seed=3)
    expected = brute_force(tokens, valid, k)
    # The check can fail: a neighbour more or less changes the scores well beyond the tolerance.
    assert (brute_force(tokens, valid, k + 1) - expected).abs().max() > 1e-3

    assert (musc_baseline(tokens, valid, rho) - expected).abs().max() < 1e-4
    assert (mutual_similarity_scores(tokens, valid, rho) - expected).abs().max() < 1e-4
    for form in FORMS:
        for pack in (False, True):
            proto = prototype_scores(tokens, valid, rho, torch.float32, 16, 1 << 10, None, form, pack)
            assert (proto - expected).abs().max() < 1e-4, (form, pack)
    assert torch.all(expected[~valid] == 0)


def test_baseline_scores_only_the_requested_volumes() -> None:
    tokens, valid = synthetic_bank(5, 32, 8, invalid=0.2, seed=4)
    expected = brute_force(tokens, valid, 2)
    subset = musc_baseline(tokens, valid, 0.5, volumes=[1, 3])
    assert (subset[[1, 3]] - expected[[1, 3]]).abs().max() < 1e-4
    assert torch.all(subset[[0, 2, 4]] == 0)


def test_baseline_without_a_mask_scores_every_token() -> None:
    tokens, _ = synthetic_bank(4, 24, 8, seed=5)
    expected = brute_force(tokens, torch.ones(4, 24, dtype=torch.bool), 1)
    assert (musc_baseline(tokens, None, 0.1) - expected).abs().max() < 1e-4


def test_prototype_rejects_an_unknown_form() -> None:
    tokens, valid = synthetic_bank(3, 8, 4, seed=0)
    with pytest.raises(ValueError, match="form"):
        prototype_scores(tokens, valid, form="einsum")


def test_synthetic_bank_masks_about_the_asked_fraction() -> None:
    tokens, valid = synthetic_bank(4, 2000, 8, invalid=0.3, seed=1)
    assert torch.allclose(tokens.norm(dim=-1), torch.ones(4, 2000), atol=1e-5)
    assert valid[:, 0].all() and abs(1 - valid.float().mean().item() - 0.3) < 0.02
    assert synthetic_bank(2, 4, 3)[1] is None


def test_effective_flops_counts_valid_pairs_of_the_query_volumes() -> None:
    # 2 N_q N_r d over (query, other volume) pairs: volume 0 (2 tokens) against 3 + 1 others, ...
    assert effective_flops([2, 3, 1], 4, [0]) == 2 * 2 * (3 + 1) * 4
    assert effective_flops([2, 3, 1], 4, range(3)) == 2 * 4 * (2 * 4 + 3 * 3 + 1 * 5)
