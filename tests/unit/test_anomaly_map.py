"""Voxel maps from token scores (the mask's edge, smoothing) and the subject score."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scripts.anomaly_map import fuse_token_scores
from scripts.inferer import CS3FInferer
from tests.helpers import TinyEncoder, robust_z_peak


def test_normalized_edges_keep_the_valid_tokens_score() -> None:
    """Valid tokens score 1, invalid ones (outside the organ) 0: with zeros mixed in, foreground voxels
    next to the edge are damped; normalised, every voxel with a valid neighbour keeps exactly 1."""
    valid = torch.zeros(4, 4, 4, dtype=torch.bool)
    valid[:, :2] = True
    scores = valid.float()
    shape = (16, 16, 16)
    plain = fuse_token_scores({"axial/0": scores}, shape)
    normed = fuse_token_scores({"axial/0": scores}, shape, validity={"axial/0": valid})
    # the voxels some valid token reaches: the interpolated validity (the same upsampling) is > 0
    reached = fuse_token_scores({"axial/0": valid.float()}, shape)[0] > 1e-6
    inside = normed[0][reached]
    torch.testing.assert_close(inside, torch.ones_like(inside))
    assert float(plain[0][reached].min()) < 0.7  # the damping normalisation removes
    assert torch.equal(normed[0][~reached], torch.zeros_like(normed[0][~reached]))


def test_edge_option_through_the_inferer() -> None:
    volume, encoder = torch.rand(3, 1, 16, 16, 16), TinyEncoder(32)
    masks = torch.zeros(3, 1, 16, 16, 16)
    masks[:, :, :, :10] = 1
    plain, _ = CS3FInferer(q=4, d=8, rho=0.5)(volume, encoder, masks)
    normed, _ = CS3FInferer(q=4, d=8, rho=0.5, edge="normalized")(volume, encoder, masks)
    assert torch.equal(plain * (1 - masks), torch.zeros_like(plain))  # both are 0 outside the mask
    assert torch.equal(normed * (1 - masks), torch.zeros_like(normed))
    assert not torch.equal(plain, normed) and bool((normed >= plain - 1e-6).all())
    assert CS3FInferer(edge="normalized").describe()["edge"] == "normalized"


def test_smoothing_inside_the_mask_matches_scipy() -> None:
    """Normalised Gaussian smoothing against an independent scipy computation; constants are kept."""
    import numpy as np
    from scipy import ndimage
    from scripts.anomaly_map import smooth_map

    rng = np.random.default_rng(0)
    amap = rng.random((1, 20, 20, 20)).astype(np.float32)
    mask = np.zeros((1, 20, 20, 20), np.float32)
    mask[:, 3:17, 5:18, 2:12] = 1
    sigma, spacing = (1.5, 1.0, 2.0), (2.0, 3.0, 1.5)  # voxels; 3 mm / spacing
    got = smooth_map(torch.from_numpy(amap), 3.0, torch.from_numpy(mask), spacing)[0].numpy()
    num = ndimage.gaussian_filter(amap[0] * mask[0], sigma, mode="constant", truncate=4.0)
    den = ndimage.gaussian_filter(mask[0], sigma, mode="constant", truncate=4.0)
    want = np.where(mask[0] > 0, num / np.maximum(den, 1e-12), 0.0)
    # MONAI integrates the Gaussian over each voxel (erf), scipy samples it: close, not equal
    np.testing.assert_allclose(got, want, atol=0.02)
    assert np.all(got[mask[0] == 0] == 0)
    assert np.abs(got - amap[0] * mask[0]).max() > 0.2  # it did smooth
    constant = smooth_map(torch.from_numpy(mask * 0.7), 3.0, torch.from_numpy(mask), spacing)[0].numpy()
    np.testing.assert_allclose(constant[mask[0] > 0], 0.7, rtol=1e-5)  # no damping at the edge
    same = torch.from_numpy(amap)
    assert smooth_map(same, 0.0, torch.from_numpy(mask)) is same


def test_gaussian_filter_equals_monai_gaussian_smooth() -> None:
    """The banded-matrix filter against MONAI's separable conv3d: anisotropic sigmas, a kernel longer than an axis."""
    from monai.transforms import GaussianSmooth
    from scripts.anomaly_map import gaussian_filter

    volume = torch.rand(2, 11, 17, 6, generator=torch.Generator().manual_seed(0))
    for sigmas in ([1.0, 2.5, 3.0], [0.6, 0.6, 0.6], [4.0, 1.0, 2.0]):  # 4 sigma * 3 > 6 voxels on the last axis
        want = GaussianSmooth(sigma=sigmas)(volume)
        got = gaussian_filter(volume, sigmas)
        assert got.shape == volume.shape
        torch.testing.assert_close(got, torch.as_tensor(want), rtol=0, atol=2e-6)
    assert not torch.allclose(gaussian_filter(volume, [1.0, 1.0, 1.0]), volume, atol=0.05)  # it did smooth


def test_smooth_mm_through_the_inferer_uses_the_voxel_size() -> None:
    from monai.data import MetaTensor
    from scripts.anomaly_map import smooth_map

    volume, encoder = torch.rand(3, 1, 16, 16, 16), TinyEncoder(32)
    plain, plain_scores = CS3FInferer(q=4, d=8, rho=0.5)(volume, encoder)
    affine = torch.diag(torch.tensor([2.0, 2.0, 4.0, 1.0]))
    volumes = [MetaTensor(v, affine=affine) for v in volume]
    smoothed, scores = CS3FInferer(q=4, d=8, rho=0.5, smooth_mm=4.0)(volumes, encoder)
    for i in range(3):  # sigma 4 mm = 2, 2 and 1 voxels
        torch.testing.assert_close(smoothed[i], smooth_map(plain[i], 4.0, spacing=(2.0, 2.0, 4.0)))
    assert bool((scores <= plain_scores + 1e-6).all()) and not torch.equal(scores, plain_scores)
    assert CS3FInferer(smooth_mm=2).describe()["smooth_mm"] == 2.0
    assert "smooth_mm" not in CS3FInferer().describe()


def test_robust_z_subject_score_matches_a_hand_computation() -> None:
    from scripts.anomaly_map import subject_score

    rng = np.random.default_rng(3)
    amap = rng.gamma(2.0, 0.1, size=(1, 12, 10, 9)).astype(np.float32)
    mask = np.zeros(amap.shape, bool)
    mask[:, 2:10, 1:9, 1:8] = True  # 448 voxels: an even count, where the lower median matters
    amap[~mask] = 0.0
    amap[0, 0, 0, 0] = 9.0  # outside the mask: neither the peak nor the level
    want = robust_z_peak(amap.astype(np.float64), mask)
    got = subject_score(torch.as_tensor(amap), torch.as_tensor(mask), "robust_z")
    assert got == pytest.approx(want, rel=1e-5) and got > 3.0
    assert subject_score(torch.as_tensor(amap), torch.as_tensor(mask)) == 9.0  # "max": the map's maximum
    # a subject whose whole map is raised and stretched keeps its robust-z score, not its maximum
    raised = torch.as_tensor(np.where(mask, 2.0 * amap + 0.3, 0.0))
    assert subject_score(raised, torch.as_tensor(mask), "robust_z") == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="subject_score must be one of"):
        subject_score(torch.as_tensor(amap), None, "mean")


def test_robust_z_subject_score_shifts_only_where_the_spread_is_zero() -> None:
    from scripts.anomaly_map import subject_score

    amap = torch.full((1, 4, 4, 4), 0.5)
    amap[0, 0, 0, :2] = torch.tensor([0.9, 0.7])  # 2 of 64 voxels differ: MAD 0
    assert subject_score(amap, statistic="robust_z") == pytest.approx(0.4)


def test_subject_score_through_the_inferer() -> None:
    from scripts.anomaly_map import subject_score

    volume, encoder = torch.rand(4, 1, 16, 16, 16), TinyEncoder(32)
    mask = torch.zeros(4, 1, 16, 16, 16)
    mask[:, :, 2:14, 2:14, 2:14] = 1
    plain, plain_scores = CS3FInferer(q=4, d=8, rho=0.5)(volume, encoder, mask)
    maps, z_scores = CS3FInferer(q=4, d=8, rho=0.5, subject_score="robust_z")(volume, encoder, mask)
    torch.testing.assert_close(maps, plain)  # the voxel maps stay as they are
    for i in range(4):
        assert float(plain_scores[i]) == pytest.approx(float(plain[i].max()))
        assert float(z_scores[i]) == pytest.approx(robust_z_peak(plain[i].numpy(), mask[i].numpy() > 0), rel=1e-5)
        assert float(z_scores[i]) == pytest.approx(subject_score(plain[i], mask[i], "robust_z"), rel=1e-6)
    assert CS3FInferer(subject_score="robust_z").describe()["subject_score"] == "robust_z"
    assert "subject_score" not in CS3FInferer().describe()
    with pytest.raises(ValueError, match="subject_score must be one of"):
        CS3FInferer(subject_score="z")
