"""Coarse-to-fine routing (Sec. 3.5, Eq. 6): anchors against the exact scorer and a brute force."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from scripts.scoring import c2f_scores, mutual_similarity_scores
from scripts.scoring.blocks import DEFAULT_BLOCK_ELEMENTS, DEFAULT_QUERY_TILE
from scripts.scoring.c2f import _C2FBank
from tests.helpers import float32_distance_tolerance, float64_brute_force


def make_tokens(b: int, n_c: int, h: int, d: int, seed: int, p_invalid: float = 0.3):
    """Fine children, coarse = normalised mean of its children (as depth pooling makes it), masks."""
    gen = torch.Generator().manual_seed(seed)
    fine = F.normalize(torch.randn(b, n_c, h, d, generator=gen), dim=-1)
    coarse = F.normalize(fine.mean(dim=2), dim=-1)
    fine_valid = torch.rand(b, n_c, h, generator=gen) > p_invalid
    fine_valid[:, 0, 0] = True
    coarse_valid = fine_valid.any(dim=2)  # what the inferer's masks give at delta = 0
    return coarse, fine, coarse_valid, fine_valid


def c2f_tiles(coarse, fine, coarse_valid=None, fine_valid=None, L=16):  # noqa: N803
    """The distance profiles behind :func:`c2f_scores`: ``(i, index, (coarse_d2, coarse_nn, fine_d2, fine_nn))``
    per query tile, ``[Q, B]`` / ``[Q, h, B]`` (self column ``+inf``; ``fine_nn``: ``parent * h + child``)."""
    yield from _C2FBank(coarse, fine, coarse_valid, fine_valid, L, DEFAULT_QUERY_TILE, DEFAULT_BLOCK_ELEMENTS).tiles(
        None
    )


def exhaustive_fine(fine, fine_valid, rho):
    b, n_c, h, d = fine.shape
    return mutual_similarity_scores(fine.reshape(b, n_c * h, d), fine_valid.reshape(b, -1), rho).view(b, n_c, h)


def brute_force_c2f(coarse, fine, coarse_valid, fine_valid, rho, L):  # noqa: N803
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


def test_tiny_candidate_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    """A candidate buffer of one query's routes: the fine search splits volumes and queries alike."""
    import scripts.scoring.c2f

    monkeypatch.setattr(scripts.scoring.c2f, "CANDIDATE_ELEMENTS", 1)
    coarse, fine, coarse_valid, fine_valid = make_tokens(9, 10, 3, 4, seed=8)
    _, fs = c2f_scores(coarse, fine, coarse_valid, fine_valid, rho=0.25, L=10)
    torch.testing.assert_close(fs, exhaustive_fine(fine, fine_valid, 0.25), atol=1e-4, rtol=0)


def test_candidate_buffer_follows_the_block_on_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU keeps its cache-sized buffer whatever the block; a GPU's grows with the block, and a
    buffer holding every candidate at once gives the same scores as the CPU's."""
    import scripts.scoring.c2f
    from scripts.scoring.c2f import CANDIDATE_ELEMENTS, _candidate_elements

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert _candidate_elements(cpu, 1 << 27) == CANDIDATE_ELEMENTS
    assert _candidate_elements(gpu, 1 << 27) == 1 << 27
    assert _candidate_elements(gpu, 1 << 10) == CANDIDATE_ELEMENTS
    coarse, fine, coarse_valid, fine_valid = make_tokens(9, 10, 3, 4, seed=8)
    monkeypatch.setattr(scripts.scoring.c2f, "CANDIDATE_ELEMENTS", 12)  # one route's children per step
    cs_small, fs_small = c2f_scores(coarse, fine, coarse_valid, fine_valid, rho=0.25, L=3)
    monkeypatch.setattr(scripts.scoring.c2f, "CANDIDATE_ELEMENTS", 1 << 20)  # everything in one step
    cs_big, fs_big = c2f_scores(coarse, fine, coarse_valid, fine_valid, rho=0.25, L=3)
    torch.testing.assert_close(cs_big, cs_small, atol=0, rtol=0)
    torch.testing.assert_close(fs_big, fs_small, atol=1e-6, rtol=0)


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
    for L in (1, 3):  # noqa: N806
        _, fs = c2f_scores(coarse, fine, coarse_valid, fine_valid, rho, L=L, query_tile=5, block_elements=200)
        expected = brute_force_c2f(coarse, fine, coarse_valid, fine_valid, rho, L)
        torch.testing.assert_close(fs.double(), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("L", [1, 2, 5])
def test_small_budgets_match_brute_force(L: int) -> None:  # noqa: N803
    b, n_c, h, d, rho = 5, 10, 3, 4, 0.5
    coarse, fine, coarse_valid, fine_valid = make_tokens(b, n_c, h, d, seed=20 + L)
    cs, fs = c2f_scores(coarse, fine, coarse_valid, fine_valid, rho, L=L, query_tile=3, block_elements=100)
    expected = brute_force_c2f(coarse, fine, coarse_valid, fine_valid, rho, L)
    torch.testing.assert_close(fs.double(), expected, atol=1e-4, rtol=0)
    # The coarse scores do not depend on L.
    torch.testing.assert_close(cs, mutual_similarity_scores(coarse, coarse_valid, rho), atol=1e-5, rtol=0)
    # A restricted search can only find farther neighbours: never below the exhaustive score.
    assert torch.all(fs >= exhaustive_fine(fine, fine_valid, rho) - 1e-5)


def test_fine_scores_never_increase_with_L() -> None:  # noqa: N802
    """Top-L sets are nested, so each approximate distance, hence the mean of the K smallest, is
    non-increasing in L; at L = N_c it reaches the exhaustive score."""
    b, n_c, h, d, rho = 7, 12, 2, 6, 0.34
    coarse, fine, coarse_valid, fine_valid = make_tokens(b, n_c, h, d, seed=5)
    previous = None
    for L in range(1, n_c + 1):  # noqa: N806
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


# ---------------------------------------------------------------------------------------------------
# CS3FInferer variants (Sec. 4: CS3F-C, CS3F-F, CS3F-MS)


def test_fine_tokens_are_the_q_fine_tokens_of_the_same_slabs() -> None:
    from scripts.inferer import CS3FInferer
    from tests.helpers import TinyEncoder

    volume, encoder = torch.rand(1, 16, 16, 24), TinyEncoder(32)
    mask = torch.zeros(1, 16, 16, 24)
    mask[:, 3:13, 2:14, 5:20] = 1
    ms = CS3FInferer(q=(8, 4, 8), q_fine=(2, 4, 1), d=8, variant="MS", slab_size=8)
    encoder.max_batch = 0
    tokens = ms.tokenize(volume, encoder, mask)
    assert encoder.max_batch == 8  # one pass of q_c-slabs serves both scales
    coarse_only = CS3FInferer(q=(8, 4, 8), d=8).tokenize(volume, encoder, mask)
    fine_only = CS3FInferer(q=(2, 4, 1), d=8).tokenize(volume, encoder, mask)
    assert [k for k in tokens.grids if not k.endswith("/fine")] == list(coarse_only.grids)
    for key, grid in coarse_only.grids.items():
        torch.testing.assert_close(tokens.grids[key].tokens, grid.tokens)
        fine = tokens.grids[key + "/fine"]
        torch.testing.assert_close(fine.tokens, fine_only.grids[key].tokens, atol=1e-5, rtol=1e-5)
        assert torch.equal(fine.valid, fine_only.grids[key].valid)
    assert tokens.grids["axial/0/fine"].tokens.shape == (24, 8, 8, 8)  # M * h = 3 * 8
    assert ms.describe()["variant"] == "MS" and ms.describe()["q_fine"] == [2, 4, 1]
    assert ms.describe()["L"] == 16
    assert CS3FInferer(q_fine=(2, 2, 2)).describe()["q_fine"] is None  # C does not use fine tokens


def test_variants_score_and_fuse() -> None:
    """F/MS coarse scores are CS3F-C's; with L >= N_c the fine grids are exhaustive q_fine scores; MS
    map = mean of the C and F maps."""
    from scripts.inferer import CS3FInferer
    from tests.helpers import TinyEncoder

    vols, _ = blob_cohort_small()
    masks = (vols > 0.2).float()
    encoder = TinyEncoder(32)
    kwargs = {"axes": ["coronal", "axial"], "d": 8, "rho": 0.34}
    full = CS3FInferer(q=4, q_fine=2, variant="F", L=1000, **kwargs)
    bank = [full.tokenize(v, encoder, m) for v, m in zip(vols, masks, strict=True)]
    scores = full.score(bank)
    coarse_ref = CS3FInferer(q=4, **kwargs)
    fine_ref = CS3FInferer(q=2, **kwargs)
    coarse_bank = [coarse_ref.tokenize(v, encoder, m) for v, m in zip(vols, masks, strict=True)]
    c_scores = coarse_ref.score(coarse_bank)
    fine_bank = [fine_ref.tokenize(v, encoder, m) for v, m in zip(vols, masks, strict=True)]
    f_scores = fine_ref.score(fine_bank)

    # Every scorer against the float64 brute force of its own tokens, not two float32 scorers against
    # each other: they sum the GEMM distances in different orders, so between near-equal reference
    # tokens they may pick different ones, each within float32 resolution of the true distance.
    def float64_scores(tokens_of, key):
        tokens = torch.stack([t.grids[key].tokens.reshape(-1, t.grids[key].tokens.shape[-1]) for t in tokens_of])
        valid = torch.stack([t.grids[key].valid.reshape(-1) for t in tokens_of])
        return float64_brute_force(tokens, valid, kwargs["rho"]), float32_distance_tolerance(tokens)

    tolerances = []
    for key in c_scores[0]:
        c_ref, c_tol = float64_scores(coarse_bank, key)
        f_ref, f_tol = float64_scores(fine_bank, key)
        tolerances.append(f_tol)
        for i in range(len(vols)):
            assert set(scores[i]) == set(c_scores[i]) | {k + "/fine" for k in c_scores[i]}
            for got, ref, tol in (
                (scores[i][key], c_ref[i], c_tol),
                (c_scores[i][key], c_ref[i], c_tol),
                (scores[i][key + "/fine"], f_ref[i], f_tol),
                (f_scores[i][key], f_ref[i], f_tol),
            ):
                torch.testing.assert_close(got.double().reshape(-1), ref, atol=tol, rtol=0)
    shape, mask = bank[0].spatial_shape, masks[0]
    c_map = full.voxel_map(scores[0], shape, mask, variant="C")
    f_map = full.voxel_map(scores[0], shape, mask)
    axis_max: dict[str, float] = {}
    ms_map = full.voxel_map(scores[0], shape, mask, axis_max=axis_max, variant="MS")
    torch.testing.assert_close(c_map, coarse_ref.voxel_map(c_scores[0], shape, mask))
    # A voxel value is a weighted mean of token scores, each within its tolerance of float64.
    f_tol = 2 * max(tolerances)
    torch.testing.assert_close(f_map, fine_ref.voxel_map(f_scores[0], shape, mask), atol=f_tol, rtol=0)
    torch.testing.assert_close(ms_map, (c_map + f_map) / 2, atol=1e-6, rtol=0)
    assert set(axis_max) == {"coronal", "axial"} and max(axis_max.values()) >= float(ms_map.max()) - 1e-6
    # A routed search with L = 1 never scores below the exhaustive one.
    routed = CS3FInferer(q=4, q_fine=2, variant="MS", L=1, **kwargs).score(bank)
    assert all(torch.all(routed[0][k] >= scores[0][k] - 1e-5) for k in scores[0] if k.endswith("/fine"))
    # One rank's share of the queries (all volumes stay references): the same scores for those.
    for inferer, tokens, reference in ((full, bank, scores), (coarse_ref, coarse_bank, c_scores)):
        share = inferer.score(tokens, queries=[2, 0])
        assert share[1] == {} and share[3] == {}
        for i in (0, 2):
            assert set(share[i]) == set(reference[i])
            assert all(torch.equal(share[i][k], reference[i][k]) for k in share[i])


def blob_cohort_small():
    from tests.helpers import blob_cohort

    return blob_cohort(4, 8, abnormal=(1,), seed=4)


def test_variant_errors() -> None:
    from scripts.inferer import CS3FInferer
    from tests.helpers import TinyEncoder

    with pytest.raises(ValueError, match="on the coronal axis q_c=8 is not a multiple of q_f=3"):
        CS3FInferer(q=8, q_fine=(2, 3, 2), variant="MS")
    CS3FInferer(axes=["axial"], q=8, q_fine=(3, 3, 2), variant="F")  # unused axes are not checked
    with pytest.raises(ValueError, match="variant 'F' needs q_fine"):
        CS3FInferer(variant="f")
    with pytest.raises(ValueError, match="variant must be one of"):
        CS3FInferer(variant="fine")
    with pytest.raises(ValueError, match="L .* must be an int >= 1"):
        CS3FInferer(q_fine=2, variant="MS", L=0)
    coarse_bank = [CS3FInferer(axes=["axial"], q=4).tokenize(torch.rand(1, 8, 8, 8), TinyEncoder(32))] * 2
    ms = CS3FInferer(axes=["axial"], q=4, q_fine=2, variant="MS")
    with pytest.raises(ValueError, match="needs fine token grids, missing 'axial/0/fine'"):
        ms.score(coarse_bank)
    with pytest.raises(ValueError, match="fuses .* but the axial axis has only \\['coarse'\\]"):
        ms.voxel_map({"axial/0": torch.zeros(2, 8, 8)}, (8, 8, 8))
    with pytest.raises(ValueError, match="needs '\\{axis\\}/\\{layer\\}/fine' scores"):
        ms.voxel_map({"axial/0": torch.zeros(2, 8, 8)}, (8, 8, 8), variant="F")


@pytest.mark.parametrize(("variant", "inside"), [("F", 0.5), ("MS", 0.9)])
def test_end_to_end_blobs_fine_variants(variant: str, inside: float) -> None:
    """F/MS through ``__call__`` on the blob cohort: the blob is where the map is hot.

    Subject ranking is not asserted: on this cohort (blobs 8 voxels across, larger than a coarse token,
    and 30 % per-subject texture noise) fine tokens see more normal variation than coarse ones, so the
    subject maximum of some normal volumes beats the blob volumes under F and MS while C ranks them
    first - the false-positive side of the trade-off of paper Sec. 4.5.1 (see docs/multiscale.md).
    """
    from scripts.inferer import CS3FInferer
    from tests.helpers import TinyEncoder, blob_cohort

    vols, blobs = blob_cohort(8, 32, abnormal=(2, 5))
    maps, scores = CS3FInferer(q=4, q_fine=2, variant=variant, L=4, d=32, rho=0.1)(vols, TinyEncoder(32))
    assert maps.shape == vols.shape and scores.shape == (8,) and torch.all(torch.isfinite(maps))
    for i in (2, 5):
        top5 = torch.quantile(maps[i].flatten(), 0.95)
        assert (maps[i][blobs[i]] >= top5).float().mean() > inside


def test_multiscale_overlay_configures_the_inferer() -> None:
    from monai.bundle import ConfigParser

    root = Path(__file__).resolve().parents[2] / "configs"
    parser = ConfigParser()
    parser.read_config([str(root / "inference.json")])
    base = parser.get_parsed_content("inferer")
    assert (base.variant, base.describe()["q"]) == ("C", [8, 8, 8])
    for override, expected in ((None, "MS"), ("F", "F")):
        parser = ConfigParser()
        parser.read_config([str(root / "inference.json"), str(root / "multiscale.json")])
        if override is not None:
            parser["variant"] = override
        inferer = parser.get_parsed_content("inferer")
        assert inferer.variant == expected and inferer.L == 16
        assert inferer.describe()["q_fine"] == [2, 2, 2] and inferer.describe()["q"] == [8, 8, 8]
    # The overlay changes the variant only: after the lung overlay it keeps the lung's token depths,
    # encoder stages (the encoder's default, not the brain default's stride-8 stage) and smoothing.
    parser = ConfigParser()
    parser.read_config([str(root / f) for f in ("inference.json", "lung_ct.json", "multiscale.json")])
    lung = parser.get_parsed_content("inferer")
    assert lung.variant == "MS" and lung.describe()["q"] == [8, 14, 14] and lung.smooth_mm == 0.0
    assert parser.get_parsed_content("layers") is None
