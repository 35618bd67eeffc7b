"""Coarse-to-fine routing (Sec. 3.5, Eq. 6): anchors against the exact scorer and a brute force."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from scripts.scoring import c2f_scores, c2f_tiles, mutual_similarity_scores


def make_tokens(b: int, n_c: int, h: int, d: int, seed: int, p_invalid: float = 0.3):
    """Fine children, coarse = normalised mean of its children (as depth pooling makes it), masks."""
    gen = torch.Generator().manual_seed(seed)
    fine = F.normalize(torch.randn(b, n_c, h, d, generator=gen), dim=-1)
    coarse = F.normalize(fine.mean(dim=2), dim=-1)
    fine_valid = torch.rand(b, n_c, h, generator=gen) > p_invalid
    fine_valid[:, 0, 0] = True
    coarse_valid = fine_valid.any(dim=2)  # what the inferer's masks give at delta = 0
    return coarse, fine, coarse_valid, fine_valid


def exhaustive_fine(fine, fine_valid, rho):
    b, n_c, h, d = fine.shape
    return mutual_similarity_scores(fine.reshape(b, n_c * h, d), fine_valid.reshape(b, -1), rho).view(
        b, n_c, h
    )


def brute_force_c2f(coarse, fine, coarse_valid, fine_valid, rho, L):
    """Eq. 6 + Eq. 2 transcribed with loops (float64): top-L routable coarse tokens, then their children."""
    b, n_c, h, _ = fine.shape
    k = max(1, math.floor(rho * (b - 1) + 1e-9))
    c, f = coarse.double(), fine.double()
    routable = fine_valid.any(dim=2)
    out = torch.zeros(b, n_c, h, dtype=torch.float64)
    for i in range(b):
        for r in range(n_c):
            profiles = [[] for _ in range(h)]
            for j in range(b):
                if j == i:
                    continue
                dist = torch.linalg.vector_norm(c[j] - c[i, r], dim=-1)
                dist[~routable[j]] = math.inf
                routed = dist.argsort()[: min(L, n_c)].tolist()
                for s in range(h):
                    cands = [
                        float(torch.linalg.vector_norm(f[i, r, s] - f[j, rr, t]))
                        for rr in routed
                        for t in range(h)
                        if fine_valid[j, rr, t]
                    ]
                    profiles[s].append(min(cands))
            for s in range(h):
                if fine_valid[i, r, s]:
                    out[i, r, s] = sum(sorted(profiles[s])[:k]) / k
    return out


@pytest.mark.parametrize(("b", "rho"), [(2, 0.1), (5, 0.5), (12, 0.3)])
def test_full_routing_equals_exhaustive_fine_with_masks(b: int, rho: float) -> None:
    n_c, h, d = 14, 3, 6
    coarse, fine, coarse_valid, fine_valid = make_tokens(b, n_c, h, d, seed=b)
    # Tiny tiles and blocks: many query tiles and reference groups.
    cs, fs = c2f_scores(coarse, fine, coarse_valid, fine_valid, rho, L=n_c, query_tile=4, block_elements=300)
    torch.testing.assert_close(fs, exhaustive_fine(fine, fine_valid, rho), atol=1e-4, rtol=0)
    torch.testing.assert_close(cs, mutual_similarity_scores(coarse, coarse_valid, rho), atol=1e-5, rtol=0)
    assert torch.all(fs[~fine_valid] == 0) and torch.all(cs[~coarse_valid] == 0)
    # L beyond N_c is clipped.
    _, fs_big = c2f_scores(coarse, fine, coarse_valid, fine_valid, rho, L=10 * n_c)
    torch.testing.assert_close(fs_big, fs, atol=1e-5, rtol=0)


def test_independent_coarse_and_fine_masks() -> None:
    """Coarse validity unrelated to fine validity (delta > 0 can do this): both anchors still hold."""
    b, n_c, h, d, rho = 6, 12, 4, 5, 0.4
    coarse, fine, _, fine_valid = make_tokens(b, n_c, h, d, seed=11, p_invalid=0.5)
    coarse_valid = torch.rand(b, n_c, generator=torch.Generator().manual_seed(3)) > 0.4
    coarse_valid[:, 0] = True
    fine_valid[:, 1] = False  # coarse tokens with no valid child at all (valid coarse or not)
    cs, fs = c2f_scores(coarse, fine, coarse_valid, fine_valid, rho, L=n_c, query_tile=5)
    torch.testing.assert_close(fs, exhaustive_fine(fine, fine_valid, rho), atol=1e-4, rtol=0)
    torch.testing.assert_close(cs, mutual_similarity_scores(coarse, coarse_valid, rho), atol=1e-5, rtol=0)
    for L in (1, 3):
        _, fs = c2f_scores(coarse, fine, coarse_valid, fine_valid, rho, L=L, query_tile=5, block_elements=200)
        expected = brute_force_c2f(coarse, fine, coarse_valid, fine_valid, rho, L)
        torch.testing.assert_close(fs.double(), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("L", [1, 2, 5])
def test_small_budgets_match_brute_force(L: int) -> None:
    b, n_c, h, d, rho = 5, 10, 3, 4, 0.5
    coarse, fine, coarse_valid, fine_valid = make_tokens(b, n_c, h, d, seed=20 + L)
    cs, fs = c2f_scores(coarse, fine, coarse_valid, fine_valid, rho, L=L, query_tile=3, block_elements=100)
    expected = brute_force_c2f(coarse, fine, coarse_valid, fine_valid, rho, L)
    torch.testing.assert_close(fs.double(), expected, atol=1e-4, rtol=0)
    # The coarse scores do not depend on L.
    torch.testing.assert_close(cs, mutual_similarity_scores(coarse, coarse_valid, rho), atol=1e-5, rtol=0)
    # A restricted search can only find farther neighbours: never below the exhaustive score.
    assert torch.all(fs >= exhaustive_fine(fine, fine_valid, rho) - 1e-5)


def test_fine_scores_never_increase_with_L() -> None:
    """Top-L sets are nested, so each approximate distance, hence the mean of the K smallest, is
    non-increasing in L; at L = N_c it reaches the exhaustive score."""
    b, n_c, h, d, rho = 7, 16, 2, 6, 0.34
    coarse, fine, coarse_valid, fine_valid = make_tokens(b, n_c, h, d, seed=5)
    previous = None
    for L in range(1, n_c + 1):
        _, fs = c2f_scores(coarse, fine, coarse_valid, fine_valid, rho, L=L)
        if previous is not None:
            assert torch.all(fs <= previous + 1e-5), L
        previous = fs
    torch.testing.assert_close(previous, exhaustive_fine(fine, fine_valid, rho), atol=1e-4, rtol=0)


def test_one_child_reduces_to_the_exact_scorer() -> None:
    """h = 1 (q_f = q_c): the nearest coarse token is the nearest fine token, so L = 1 is exact."""
    gen = torch.Generator().manual_seed(7)
    b, n, d = 6, 25, 8
    tokens = torch.randn(b, n, d, generator=gen)
    valid = torch.rand(b, n, generator=gen) > 0.3
    valid[:, 0] = True
    exact = mutual_similarity_scores(tokens, valid, rho=0.4)
    cs, fs = c2f_scores(tokens, tokens.unsqueeze(2), valid, valid.unsqueeze(2), rho=0.4, L=1)
    torch.testing.assert_close(fs[..., 0], exact, atol=1e-5, rtol=0)
    torch.testing.assert_close(cs, exact, atol=1e-5, rtol=0)


def test_nearest_indices_and_fp16_storage() -> None:
    b, n_c, h, d = 4, 9, 2, 16
    coarse, fine, coarse_valid, fine_valid = make_tokens(b, n_c, h, d, seed=9)
    flat = fine.reshape(b, n_c * h, d)
    for i, idx, (_, _, fine_d2, fine_nn) in c2f_tiles(coarse, fine, coarse_valid, fine_valid, L=n_c):
        assert i in range(b) and fine_d2.shape == (idx.numel(), h, b)
        dist = torch.cdist(fine[i, idx].reshape(-1, d), flat.reshape(-1, d)).view(-1, h, b, n_c * h)
        dist = dist.masked_fill(~fine_valid.reshape(1, 1, b, -1), math.inf)
        expected = dist.argmin(dim=-1)
        others = torch.arange(b) != i
        assert torch.equal(fine_nn[..., others], expected[..., others])
    cs16, fs16 = c2f_scores(coarse.half(), fine.half(), coarse_valid, fine_valid, L=3)
    cs, fs = c2f_scores(coarse, fine, coarse_valid, fine_valid, L=3)
    assert fs16.dtype == torch.float32
    torch.testing.assert_close(fs16, fs, atol=2e-3, rtol=0)
    torch.testing.assert_close(cs16, cs, atol=2e-3, rtol=0)


def test_permutation_equivariance_and_volume_subset() -> None:
    b, n_c, h, d = 6, 12, 3, 8
    coarse, fine, coarse_valid, fine_valid = make_tokens(b, n_c, h, d, seed=13)
    cs, fs = c2f_scores(coarse, fine, coarse_valid, fine_valid, rho=0.4, L=2)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    cs_p, fs_p = c2f_scores(coarse[perm], fine[perm], coarse_valid[perm], fine_valid[perm], rho=0.4, L=2)
    torch.testing.assert_close(fs_p, fs[perm], atol=1e-5, rtol=0)
    torch.testing.assert_close(cs_p, cs[perm], atol=1e-5, rtol=0)
    cs_v, fs_v = c2f_scores(coarse, fine, coarse_valid, fine_valid, rho=0.4, L=2, volumes=[1, 4])
    torch.testing.assert_close(fs_v[[1, 4]], fs[[1, 4]])
    assert torch.all(fs_v[[0, 2, 3, 5]] == 0) and torch.all(cs_v[[0, 2, 3, 5]] == 0)


def test_errors() -> None:
    coarse, fine, coarse_valid, fine_valid = make_tokens(3, 4, 2, 5, seed=0)
    with pytest.raises(ValueError, match="at least 2 volumes"):
        c2f_scores(coarse[:1], fine[:1])
    with pytest.raises(ValueError, match=r"fine tokens must be \[B, N_c, h, d\]"):
        c2f_scores(coarse, fine[:, :3])
    with pytest.raises(ValueError, match="L .* must be an int >= 1"):
        c2f_scores(coarse, fine, L=0)
    with pytest.raises(ValueError, match="fine_valid must be"):
        c2f_scores(coarse, fine, fine_valid=coarse_valid)
    fine_valid[1] = False
    with pytest.raises(ValueError, match=r"volume\(s\) \[1\] .* no valid fine token"):
        c2f_scores(coarse, fine, coarse_valid, fine_valid)
    coarse_valid[2] = False
    with pytest.raises(ValueError, match=r"volume\(s\) \[2\] .* no valid token"):
        c2f_scores(coarse, fine, coarse_valid)
    with pytest.raises(ValueError, match="not in the batch"):
        c2f_scores(coarse, fine, volumes=[3])


_PEAK_SCRIPT = textwrap.dedent(
    """
    import resource, sys, torch
    sys.path.insert(0, {root!r})
    from scripts.scoring import c2f_scores
    torch.set_num_threads(1)
    b, n_c, h, d = int(sys.argv[1]), 256, 4, 32
    fine = torch.randn(b, n_c, h, d)
    coarse = fine.mean(dim=2)
    c2f_scores(coarse[:2, :8], fine[:2, :8], L=2)  # warm-up: load kernels before the baseline
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    c2f_scores(coarse, fine, L=16, query_tile=128, block_elements=1 << 18)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) * 1024)
    """
)


def test_peak_memory_does_not_grow_with_batch() -> None:
    """Routing indices and candidates live per (query tile, reference group): the extra peak memory is
    the same at B = 4 and B = 40 (whole-batch routing indices alone would be B*N_c*B*L*8 B = 52 MiB)."""
    root = str(Path(__file__).resolve().parents[1])
    growth = {}
    for b in (4, 40):
        out = subprocess.run(
            [sys.executable, "-c", _PEAK_SCRIPT.format(root=root), str(b)],
            check=True,
            capture_output=True,
            text=True,
        )
        growth[b] = int(out.stdout.strip().splitlines()[-1])
    assert growth[40] <= growth[4] + 8 * 2**20, growth
