"""Voxel maps from token scores: the edge of the mask, with and without normalised interpolation."""

from __future__ import annotations

import torch

from scripts.anomaly_map import fuse_token_scores
from scripts.inferer import CS3FInferer
from tests.helpers import TinyEncoder


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
