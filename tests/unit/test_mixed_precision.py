"""Exact-where-it-matters mixed-precision scoring: the error bound against float64, and the scores against
an independent float64 brute force (random tokens, real tokens, near-ties built on purpose)."""

from __future__ import annotations

import math

import pytest
import scripts.mixed_precision as mp
import scripts.scoring as scoring
import torch
from scripts.mixed_precision import LowPrecisionBlocks, resolve_precision, spec_of
from scripts.scoring import mutual_similarity_scores
from tests.helpers import float64_brute_force as brute_force


def _hard_tokens(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens that stress the bound: norms from 0.05 to 20, near-duplicates at 1e-4 .. 1e-2, exact
    duplicates, one dominant component, and a masked-out part."""
    gen = torch.Generator().manual_seed(seed)
    b, n, d = 6, 64, 32
    tokens = torch.nn.functional.normalize(torch.randn(b, n, d, generator=gen), dim=-1)
    tokens *= torch.logspace(math.log10(0.05), math.log10(20.0), n).view(1, n, 1)
    for j, eps in zip(range(1, b), (1e-4, 1e-3, 1e-2, 0.0, 3e-4), strict=True):
        tokens[j, : n // 2] = tokens[0, : n // 2] + eps * torch.randn(n // 2, d, generator=gen)
    tokens[2, -4:, 0] = 50.0  # one dominant component
    valid = torch.rand(b, n, generator=gen) > 0.2
    valid[:, 0] = True
    return tokens, valid


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", ["bf16", "tf32"])
def test_every_block_value_is_within_its_bound(precision: str, device: str) -> None:
    """|o - h| <= a_t sqrt(2 h) + b_t + w |o| for every pair, with either token as the query, against
    float64 (tf32 runs as fp32 on the CPU: there the check covers its code path; on a GPU, the TF32
    tensor cores themselves)."""
    tokens, valid = (x.to(device) for x in _hard_tokens())
    b, n, _ = tokens.shape
    half = (tokens.pow(2).sum(-1) / 2).masked_fill(~valid, math.inf)
    low = LowPrecisionBlocks(spec_of(precision), lambda v: tokens[v], lambda v, p: tokens[v, p], half)
    w = low.spec.u_out / (1 - low.spec.u_out)
    workspace = low.workspace(n * n)
    t64 = tokens.double()
    checked = 0
    for a in range(b):
        left = low.left(a, tokens[a])
        for c in range(b):
            raw = low.block(left, a, slice(0, n), c, tokens[c], workspace)
            o = low.values(raw).double()
            h = torch.cdist(t64[a], t64[c]).pow(2) / 2
            ok = valid[a].unsqueeze(1) & valid[c].unsqueeze(0)
            err = (o - h).abs()
            for side, slope, offset in (
                ("row", low.slope[a].unsqueeze(1), low.offset[a].unsqueeze(1)),
                ("column", low.slope[c].unsqueeze(0), low.offset[c].unsqueeze(0)),
            ):
                bound = slope.double() * (2 * h).sqrt() + offset.double() + w * o
                assert bool((err <= bound)[ok].all()), (precision, a, c, side, float((err - bound)[ok].max()))
            checked += int(ok.sum())
    assert checked > 10_000


@pytest.mark.parametrize(
    ("b", "n", "d", "invalid", "rho", "seed"),
    [(5, 48, 16, 0.3, 0.5, 3), (9, 64, 16, 0.0, 0.4, 4), (12, 200, 32, 0.3, 0.3, 5), (24, 128, 128, 0.0, 0.1, 6)],
)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", ["bf16", "tf32"])
def test_scores_equal_the_float64_brute_force_on_random_tokens(b, n, d, invalid, rho, seed, precision, device) -> None:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.nn.functional.normalize(torch.randn(b, n, d, generator=gen), dim=-1)
    valid = None
    if invalid:
        valid = torch.rand(b, n, generator=gen) >= invalid
        valid[:, 0] = True
    expected = brute_force(tokens, valid, rho)
    on = (lambda x: x) if device == "cpu" else (lambda x: None if x is None else x.to(device))
    got = _mixed(on(tokens), on(valid), rho, precision).cpu()
    assert (got.double() - expected).abs().max() < 1e-6
    reference = mutual_similarity_scores(on(tokens), on(valid), rho).cpu()
    assert (got - reference).abs().max() < 1e-5


def _mixed(tokens, valid, rho, precision, **kwargs) -> torch.Tensor:  # noqa: ANN001, ANN003
    """The mixed scorer with ``precision`` (tf32 forced on the CPU, where it runs in fp32)."""
    if precision == "bf16" or tokens.is_cuda:
        return mutual_similarity_scores(tokens, valid, rho, precision="bf16", **kwargs)
    original = scoring.resolve_precision
    scoring.resolve_precision = lambda p, device: p
    try:
        return mutual_similarity_scores(tokens, valid, rho, precision="tf32", **kwargs)
    finally:
        scoring.resolve_precision = original


def test_near_ties_built_on_purpose_are_decided_exactly() -> None:
    """Ties far below bf16's resolution: two tokens of a volume at distances 0.2 and 0.2 + 1e-6 from a
    query, and the K-th and (K+1)-th nearest volumes 1e-6 apart; near-duplicates at 1e-5. The mixed
    scorer must pick as float64 does (the bf16 values of the rivals are equal)."""
    gen = torch.Generator().manual_seed(7)
    b, n, d = 8, 32, 64
    tokens = torch.nn.functional.normalize(torch.randn(b, n, d, generator=gen), dim=-1)
    q = tokens[0, 0]
    u = torch.nn.functional.normalize(torch.randn(2, d, generator=gen), dim=-1)
    u = u - (u @ q).unsqueeze(1) * q  # orthogonal to q: |q + s u| - |q| is second order, use directions
    u = torch.nn.functional.normalize(u, dim=-1)
    # in volume 1 two rivals at 0.2 and 0.2 + 1e-6; volumes 2..7 nearest at 0.3 + j * 1e-6 (K = 1 here
    # for rho 0.1 and B = 8: the nearest volume is volume 1; with rho 0.3, K = 2: volumes 1 and 2 ...)
    tokens[1, 3] = q + 0.2 * u[0]
    tokens[1, 9] = q + (0.2 + 1e-6) * u[1]
    for j in range(2, b):
        tokens[j, 5] = q + (0.3 + (b - j) * 1e-6) * u[j % 2]
    # near-duplicates of other tokens
    tokens[3, 10:20] = tokens[4, 10:20] + 1e-5 * torch.randn(10, d, generator=gen)
    for rho in (0.1, 0.3, 0.5):
        expected = brute_force(tokens, None, rho)
        got = _mixed(tokens, None, rho, "bf16")
        assert (got.double() - expected).abs().max() < 1e-6, rho
        assert (got - mutual_similarity_scores(tokens, None, rho)).abs().max() < 1e-5, rho


def test_orders_and_fallback_give_identical_exact_scores(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whole batch (pair-symmetric), each volume alone (a torchrun rank's share) and the per-volume
    order forced by a tiny store budget give bit-identical scores; with a store of K values only,
    tokens fall back to a full search, and the scores stay exact."""
    gen = torch.Generator().manual_seed(3)
    b, n, d = 9, 40, 16
    tokens = torch.randn(b, n, d, generator=gen)
    tokens[4] = tokens[1]  # exact duplicates: zeros must survive every order
    valid = torch.rand(b, n, generator=gen) > 0.3
    valid[:, 0] = True
    valid[4] = valid[1]
    groups = [0, 1, 2, 3, 4, 5, 0, 7, 8]  # volumes 0 and 6: one subject
    expected = brute_force(tokens, valid, 0.4, groups)
    for precision in ("bf16", "tf32"):
        kwargs = {"query_tile": 8, "block_elements": 1 << 10, "groups": groups}
        together = _mixed(tokens, valid, 0.4, precision, **kwargs)
        alone = sum(_mixed(tokens, valid, 0.4, precision, volumes=[i], **kwargs) for i in range(b))
        assert torch.equal(together, alone), precision
        assert (together.double() - expected).abs().max() < 1e-6
    fallbacks = []
    symmetric = scoring._scores_mixed_symmetric
    monkeypatch.setattr(scoring, "_store_width", lambda ks: max(ks))
    monkeypatch.setattr(scoring, "_scores_mixed_symmetric", lambda *a: fallbacks.append(symmetric(*a)) or fallbacks[-1])
    got = _mixed(tokens, valid, 0.4, "bf16", groups=groups)
    assert fallbacks and fallbacks[0] > 0
    assert (got.double() - expected).abs().max() < 1e-6


def test_scores_equal_the_brute_force_on_real_tokens(tiny_cohort) -> None:  # noqa: ANN001
    """Tokens of a real (tiny) cohort through the default encoder: every (axis, layer)."""
    from monai.transforms import LoadImage
    from scripts.encoders import build_encoder
    from scripts.inferer import CS3FInferer
    from scripts.tokens import batch_of

    encoder = build_encoder("efficientnet_lite0", input_size=32)
    inferer = CS3FInferer(q=(8, 8, 8), rho=0.4)
    load = LoadImage(image_only=True, ensure_channel_first=True)
    images = sorted((tiny_cohort / "images").glob("*.nii.gz"))
    bank = []
    for path in images:
        volume = load(path)
        volume = (volume - volume.min()) / (volume.max() - volume.min())
        mask = load(tiny_cohort / "masks" / path.name)
        bank.append(inferer.tokenize(volume, encoder, mask))
    for key in bank[0].grids:
        tokens, valid = batch_of(bank, key)
        expected = brute_force(tokens, valid, 0.4)
        got = mutual_similarity_scores(tokens, valid, 0.4, precision="bf16")
        assert (got.double() - expected).abs().max() < 1e-6, key
        assert (got - mutual_similarity_scores(tokens, valid, 0.4)).abs().max() < 1e-5, key


def test_resolve_precision(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mp, "cpu_has_native_bf16", lambda: True)
    assert resolve_precision("auto", "cpu") == "bf16"
    assert resolve_precision(" FP32 ", "cpu") == "fp32"
    assert resolve_precision("auto", "cuda") == "fp32"  # not measured on a GPU yet
    assert resolve_precision("tf32", "cuda") == "tf32"
    monkeypatch.setattr(mp, "cpu_has_native_bf16", lambda: False)
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="CUDA"):
        resolve_precision("tf32", "cpu")
    with pytest.raises(ValueError, match="score_precision"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="fp16"):
        mutual_similarity_scores(torch.rand(3, 4, 2), precision="fp16")


def test_auto_takes_the_reduced_pass_only_for_large_enough_volumes(monkeypatch: pytest.MonkeyPatch) -> None:
    """auto: fp32 while no volume has AUTO_MIN_TOKENS valid tokens (per-call costs dominate there)."""
    monkeypatch.setattr(mp, "cpu_has_native_bf16", lambda: True)
    passes = []
    low_blocks = scoring._low_blocks
    monkeypatch.setattr(scoring, "_low_blocks", lambda pairs, p: passes.append(p) or low_blocks(pairs, p))
    gen = torch.Generator().manual_seed(0)
    small = torch.nn.functional.normalize(torch.randn(4, scoring.AUTO_MIN_TOKENS - 1, 8, generator=gen), dim=-1)
    mutual_similarity_scores(small, None, 0.5, precision="auto")
    assert passes == []
    large = torch.nn.functional.normalize(torch.randn(3, scoring.AUTO_MIN_TOKENS, 8, generator=gen), dim=-1)
    got = mutual_similarity_scores(large, None, 0.5, precision="auto")
    assert passes == ["bf16"] and (got.double() - brute_force(large, None, 0.5)).abs().max() < 1e-6
