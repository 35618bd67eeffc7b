"""Exact scorer vs an independent brute-force transcription of Eq. 1-2."""

from __future__ import annotations

import math

import pytest
import torch
from scripts.scoring import mutual_similarity_scores, num_neighbours
from tests.helpers import float32_distance_tolerance, float64_brute_force


def brute_force_scores(tokens: torch.Tensor, valid: torch.Tensor, rho: float) -> torch.Tensor:
    """Eq. 1-2 with plain loops over volumes and tokens (float64)."""
    b, n, _ = tokens.shape
    k = max(1, math.floor(rho * (b - 1) + 1e-9))
    t = tokens.double()
    out = torch.zeros(b, n, dtype=torch.float64)
    for i in range(b):
        for a in range(n):
            if not valid[i, a]:
                continue
            profile = []
            for j in range(b):
                if j == i:
                    continue
                best = min(float(torch.linalg.vector_norm(t[i, a] - t[j, c])) for c in range(n) if valid[j, c])
                profile.append(best)
            profile.sort()
            out[i, a] = sum(profile[:k]) / k
    return out


@pytest.mark.parametrize("b", [2, 3, 12, 13])
def test_matches_brute_force_with_masks(b: int) -> None:
    gen = torch.Generator().manual_seed(b)
    n, d = 9, 5
    tokens = torch.randn(b, n, d, generator=gen)
    valid = torch.rand(b, n, generator=gen) > 0.3
    valid[:, 0] = True  # every volume keeps at least one valid token
    for rho in (0.1, 0.3, 1.0):
        expected = brute_force_scores(tokens, valid, rho)
        # Tiny tiles force many query tiles and reference groups.
        got = mutual_similarity_scores(tokens, valid, rho=rho, query_tile=4, block_elements=40)
        torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=0)
        assert torch.all(got[~valid] == 0)


@pytest.mark.parametrize(
    ("b", "rho", "k"),
    [
        (2, 0.1, 1),
        (13, 0.05, 1),  # floor(0.6) = 0: at least one neighbour
        (12, 0.3, 3),  # floor(3.3), not rounded up
        (101, 0.29, 29),  # 0.29 * 100 is 28.999... in binary
        # B - 1 other volumes, not B: floor(rho * B) would give 2, 3, 3, 5, 4
        (2, 1.0, 1),
        (3, 1.0, 2),
        (6, 0.5, 2),
        (10, 0.5, 4),
        (20, 0.2, 3),
    ],
)
def test_k_rule(b: int, rho: float, k: int) -> None:
    """K = max(1, floor(rho (B - 1))), by num_neighbours and in the scorer's output."""
    assert num_neighbours(b, rho) == k
    # Volume 0 has one token at the origin, volume j one token at distance j: its sorted profile of
    # nearest cross-subject distances is 1, 2, ..., B - 1, and its score the mean of 1..K = (K + 1) / 2.
    tokens = torch.zeros(b, 1, 2)
    tokens[:, 0, 0] = torch.arange(b, dtype=torch.float32)
    got = float(mutual_similarity_scores(tokens, rho=rho)[0, 0])
    assert got == pytest.approx((k + 1) / 2, abs=1e-3)
    assert float(brute_force_scores(tokens, torch.ones(b, 1, dtype=torch.bool), rho)[0, 0]) == (k + 1) / 2


def test_k_rule_rejects_rho_outside_0_1() -> None:
    for rho in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="rho"):
            num_neighbours(10, rho)


def test_fp16_tokens_accumulate_in_fp32() -> None:
    gen = torch.Generator().manual_seed(0)
    tokens = torch.nn.functional.normalize(torch.randn(6, 40, 16, generator=gen), dim=-1)
    exact = mutual_similarity_scores(tokens)
    half = mutual_similarity_scores(tokens.half())
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, exact, atol=2e-3, rtol=0)


def test_permutation_equivariance() -> None:
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randn(7, 20, 8, generator=gen)
    valid = torch.rand(7, 20, generator=gen) > 0.2
    valid[:, 0] = True
    perm = torch.randperm(7, generator=gen)
    base = mutual_similarity_scores(tokens, valid, rho=0.3)
    permuted = mutual_similarity_scores(tokens[perm], valid[perm], rho=0.3)
    torch.testing.assert_close(permuted, base[perm], atol=1e-5, rtol=0)


def test_duplicated_volume_scores_zero_when_k_is_one() -> None:
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randn(5, 30, 8, generator=gen)
    tokens[3] = tokens[1]
    scores = mutual_similarity_scores(tokens, rho=0.1)  # K = 1
    assert torch.all(scores[1] == 0) and torch.all(scores[3] == 0)
    assert torch.all(scores[0] > 0.1)


def test_errors() -> None:
    with pytest.raises(ValueError, match="at least 2 volumes"):
        mutual_similarity_scores(torch.randn(1, 4, 3))
    valid = torch.ones(3, 4, dtype=torch.bool)
    valid[2] = False
    with pytest.raises(ValueError, match=r"\[2\].*no valid token"):
        mutual_similarity_scores(torch.randn(3, 4, 3), valid)
    with pytest.raises(ValueError, match="valid must be"):
        mutual_similarity_scores(torch.randn(3, 4, 3), torch.ones(3, 5, dtype=torch.bool))


def nearest_distance_profile(queries, tokens, ref_sq_norms, exclude, block_elements, index=None):
    """``(d2 [Q, B], nearest [Q, B])``: each query's nearest squared distance (``+inf`` for ``exclude``) in
    every volume from :func:`scripts.scoring.blocks.reference_blocks`, and that token's position in ``N``."""
    from scripts.scoring.blocks import reference_blocks

    b, nq = tokens.shape[0], queries.shape[0]
    group = max(1, block_elements // max(1, ref_sq_norms.shape[1] * nq))
    profile = torch.full((nq, b), float("inf"))
    nearest = torch.zeros((nq, b), dtype=torch.long)
    for start, stop, d2 in reference_blocks(queries, tokens, ref_sq_norms, exclude, group, None, index):
        best = d2.min(dim=-1)
        profile[:, start:stop] = best.values.t()
        at = best.indices if index is None else index[start:stop].gather(1, best.indices)
        nearest[:, start:stop] = at.t()
    return profile + queries.pow(2).sum(dim=1).unsqueeze(1), nearest


def test_packing_reads_valid_references_only() -> None:
    """The GEMM reads each volume's valid tokens first, in order, padded by never-nearest rows."""
    from scripts.scoring.blocks import pack_valid, sq_norms

    gen = torch.Generator().manual_seed(7)
    tokens = torch.randn(4, 10, 6, generator=gen)
    valid = torch.rand(4, 10, generator=gen) > 0.5
    valid[:, 3] = True
    valid[2] = False
    valid[2, 3] = True  # one volume with a single valid token
    norms = sq_norms(tokens, valid)
    index, packed = pack_valid(valid, norms)
    counts = valid.sum(dim=1)
    assert index.shape == (4, int(counts.max()))
    for b in range(4):
        c = int(counts[b])
        assert index[b, :c].tolist() == torch.nonzero(valid[b]).flatten().tolist()
        assert torch.isinf(packed[b, c:]).all() and torch.isfinite(packed[b, :c]).all()
    queries = torch.randn(5, 6, generator=gen)
    # Packed and unpacked profiles agree, and nearest positions index the original N axis.
    d2, nearest = nearest_distance_profile(queries, tokens, norms, 1, 1 << 10)
    d2_packed, nearest_packed = nearest_distance_profile(queries, tokens, packed, 1, 1 << 10, index=index)
    torch.testing.assert_close(d2_packed, d2)
    assert torch.equal(nearest_packed[:, [0, 2, 3]], nearest[:, [0, 2, 3]])
    assert torch.isinf(d2_packed[:, 1]).all()
    assert valid[torch.tensor([0, 2, 3]).expand(5, 3), nearest_packed[:, [0, 2, 3]]].all()
    # Fully valid banks are read in place.
    all_valid = torch.ones(4, 10, dtype=torch.bool)
    assert pack_valid(all_valid, sq_norms(tokens, all_valid))[0] is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_pair_symmetric_order_equals_per_volume_scores_with_half_the_gemms(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """All volumes at once share one GEMM per volume pair; each volume scored alone (a rank's share)
    reads the same canonical blocks, so the scores are bit-identical and cost twice the GEMMs."""
    import scripts.scoring.exact as scoring

    gen = torch.Generator().manual_seed(3)
    b, n, d = 7, 40, 6
    tokens = torch.randn(b, n, d, generator=gen).to(dtype)
    tokens[4] = tokens[1]  # a duplicate: exact zeros must survive both orders
    valid = torch.rand(b, n, generator=gen) > 0.4
    valid[:, 0] = True
    valid[4] = valid[1]
    calls = {"n": 0}
    block = scoring._PairBlocks.block

    def counted(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        calls["n"] += 1
        return block(self, *args, **kwargs)

    monkeypatch.setattr(scoring._PairBlocks, "block", counted)
    original = tokens.clone()
    for rho in (0.2, 0.5):
        together = mutual_similarity_scores(tokens, valid, rho=rho, query_tile=8, block_elements=1 << 12)
        symmetric_calls, calls["n"] = calls["n"], 0
        alone = sum(
            mutual_similarity_scores(tokens, valid, rho=rho, query_tile=8, block_elements=1 << 12, volumes=[i])
            for i in range(b)
        )
        assert torch.equal(together, alone)
        assert symmetric_calls > 0 and calls["n"] == 2 * symmetric_calls
        calls["n"] = 0
        expected = brute_force_scores(tokens.float(), valid, rho)
        torch.testing.assert_close(together.double(), expected, atol=1e-4, rtol=0)
    assert torch.all(together[4][valid[4]] <= together[1].max())
    assert torch.equal(tokens, original)  # read only: fp32 blocks are views of the caller's tokens


# ------------------------------------------------------------------ against an independent float64 brute force
@pytest.mark.parametrize(
    ("b", "n", "d", "invalid", "rho", "seed"),
    [(5, 48, 16, 0.3, 0.5, 3), (9, 64, 16, 0.0, 0.4, 4), (12, 200, 32, 0.3, 0.3, 5), (24, 128, 128, 0.0, 0.1, 6)],
)
def test_scores_equal_the_float64_brute_force_on_random_tokens(b, n, d, invalid, rho, seed) -> None:  # noqa: ANN001
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.nn.functional.normalize(torch.randn(b, n, d, generator=gen), dim=-1)
    valid = None
    if invalid:
        valid = torch.rand(b, n, generator=gen) >= invalid
        valid[:, 0] = True
    got = mutual_similarity_scores(tokens, valid, rho)
    expected = float64_brute_force(tokens, valid, rho)
    torch.testing.assert_close(got.double(), expected, atol=float32_distance_tolerance(tokens), rtol=0)


def test_near_ties_built_on_purpose_stay_within_the_float32_bound() -> None:
    """Rivals 1e-6 apart (two tokens of a volume, and the K-th and (K+1)-th nearest volumes), and
    near-duplicates at 1e-5: whichever rival the fp32 GEMM picks, the score is within the bound."""
    gen = torch.Generator().manual_seed(7)
    b, n, d = 8, 32, 64
    tokens = torch.nn.functional.normalize(torch.randn(b, n, d, generator=gen), dim=-1)
    q = tokens[0, 0]
    u = torch.nn.functional.normalize(torch.randn(2, d, generator=gen), dim=-1)
    u = torch.nn.functional.normalize(u - (u @ q).unsqueeze(1) * q, dim=-1)  # directions orthogonal to q
    tokens[1, 3] = q + 0.2 * u[0]
    tokens[1, 9] = q + (0.2 + 1e-6) * u[1]
    for j in range(2, b):
        tokens[j, 5] = q + (0.3 + (b - j) * 1e-6) * u[j % 2]
    tokens[3, 10:20] = tokens[4, 10:20] + 1e-5 * torch.randn(10, d, generator=gen)
    for rho in (0.1, 0.3, 0.5):
        expected = float64_brute_force(tokens, None, rho)
        got = mutual_similarity_scores(tokens, None, rho)
        torch.testing.assert_close(got.double(), expected, atol=float32_distance_tolerance(tokens), rtol=0)


def test_orders_give_identical_exact_scores_with_subjects() -> None:
    """Whole batch (pair-symmetric), each volume alone (a torchrun rank's share) and the per-volume
    order forced by a tiny store budget give bit-identical scores, scans of one subject left out."""
    gen = torch.Generator().manual_seed(3)
    b, n, d = 9, 40, 16
    tokens = torch.randn(b, n, d, generator=gen)
    tokens[4] = tokens[1]  # exact duplicates: zeros must survive every order
    valid = torch.rand(b, n, generator=gen) > 0.3
    valid[:, 0] = True
    valid[4] = valid[1]
    groups = [0, 1, 2, 3, 4, 5, 0, 7, 8]  # volumes 0 and 6: one subject
    kwargs = {"query_tile": 8, "block_elements": 1 << 10, "groups": groups}
    together = mutual_similarity_scores(tokens, valid, 0.4, **kwargs)
    alone = sum(mutual_similarity_scores(tokens, valid, 0.4, volumes=[i], **kwargs) for i in range(b))
    assert torch.equal(together, alone)
    expected = float64_brute_force(tokens, valid, 0.4, groups)
    torch.testing.assert_close(together.double(), expected, atol=float32_distance_tolerance(tokens), rtol=0)


def test_scores_equal_the_brute_force_on_real_tokens(tiny_cohort) -> None:  # noqa: ANN001
    """Tokens of a real (tiny) cohort through the default encoder: every (axis, layer)."""
    from monai.transforms import LoadImage
    from scripts.encoders import build_encoder
    from scripts.inferer import CS3FInferer
    from scripts.tokens import batch_of

    encoder = build_encoder("efficientnet_lite0", input_size=32)
    inferer = CS3FInferer(q=(8, 8, 8), rho=0.4)
    load = LoadImage(image_only=True, ensure_channel_first=True)
    bank = []
    for path in sorted((tiny_cohort / "images").glob("*.nii.gz")):
        volume = load(path)
        volume = (volume - volume.min()) / (volume.max() - volume.min())
        bank.append(inferer.tokenize(volume, encoder, load(tiny_cohort / "masks" / path.name)))
    for key in bank[0].grids:
        tokens, valid = batch_of(bank, key)
        expected = float64_brute_force(tokens, valid, 0.4)
        got = mutual_similarity_scores(tokens, valid, 0.4)
        torch.testing.assert_close(got.double(), expected, atol=float32_distance_tolerance(tokens), rtol=0, msg=key)


def test_score_precision_accepts_auto_and_fp32_only() -> None:
    """Scores are fp32 on every device; ``auto`` and ``fp32`` are the accepted spellings."""
    from scripts.scoring.scorer import check_precision, resolve_precision

    assert resolve_precision("auto", "cpu") == resolve_precision(" FP32 ", "cuda") == "fp32"
    assert check_precision(" Auto ") == "auto"
    for name in ("bf16", "tf32", "fp16"):
        with pytest.raises(ValueError, match="score_precision"):
            check_precision(name)
