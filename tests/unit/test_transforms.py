"""Tokenization transforms: shapes, Eq. 4 normalisation, projections, validity, errors (the projection
matrix in a fresh process: tests/bundle/test_transforms_process.py)."""

from __future__ import annotations

import pytest
import torch
from monai.transforms import Compose
from scripts.transforms import (
    AXES,
    DepthPool,
    DepthPoold,
    MultiAxisSlice,
    MultiAxisSliced,
    RandomProjection,
    RandomProjectiond,
    TokenValidity,
    TokenValidityd,
    restore_axis,
    slices_first,
)


def test_multi_axis_slice_shapes_and_normalisation() -> None:
    volume = torch.rand(1, 20, 24, 28)
    slicer = MultiAxisSlice(size=16, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2))
    stacks = slicer(volume)
    assert {k: tuple(v.shape) for k, v in stacks.items()} == {
        "sagittal": (20, 3, 16, 16),
        "coronal": (24, 3, 16, 16),
        "axial": (28, 3, 16, 16),
    }
    # A constant slice maps to (c - mean) / std in each channel.
    const = torch.full((1, 16, 16, 16), 0.7)
    out = MultiAxisSlice(axes=["A"], size=16, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2))(const)["axial"]
    torch.testing.assert_close(out[0, :, 3, 3], torch.tensor([1.0, 1.5, 2.0]))
    # Slab of a range equals the same rows of the full stack.
    torch.testing.assert_close(slicer.slab(volume, "coronal", 5, 9), stacks["coronal"][5:9])


def test_slicing_follows_ras_axes() -> None:
    volume = torch.zeros(1, 6, 7, 8)
    volume[0, 2, :, :] = 1.0  # one sagittal plane (x = 2)
    stack = slices_first(volume, "sagittal")
    assert stack.shape == (6, 1, 7, 8)
    assert stack[2].sum() == 7 * 8 and stack[1].sum() == 0
    for axis in AXES:
        grid = slices_first(volume, axis)[:, 0]
        assert torch.equal(restore_axis(grid, axis), volume[0])


def test_dictionary_wrappers_compose() -> None:
    data = {"image": torch.rand(1, 8, 8, 8)}
    out = Compose([MultiAxisSliced("image", axes=("axial",), size=8, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2))])(data)
    assert out["image_axial"].shape == (8, 3, 8, 8)
    feats = {"f": torch.randn(8, 5, 4, 4)}
    pipe = Compose([DepthPoold("f", q=4), RandomProjectiond("f", in_channels=5, d=3, seed=1)])
    tokens = pipe(feats)["f"]
    assert tokens.shape == (2, 3, 4, 4)
    expected = RandomProjection(5, 3, 1, "f")(DepthPool(4)(feats["f"]))
    torch.testing.assert_close(tokens, expected)
    masks = TokenValidityd("mask", q=(2, 4, 8), grid=2)({"mask": torch.ones(1, 8, 8, 8)})
    assert masks["mask_valid_sagittal"].shape == (4, 2, 2)
    assert masks["mask_valid_axial"].shape == (1, 2, 2)


def test_depth_pool_is_mean_then_l2() -> None:
    feats = torch.randn(12, 7, 3, 3)
    pooled = DepthPool(4)(feats)
    assert pooled.shape == (3, 7, 3, 3)
    torch.testing.assert_close(pooled.norm(dim=1), torch.ones(3, 3, 3))
    manual = feats[4:8].mean(dim=0)
    torch.testing.assert_close(pooled[1], manual / manual.norm(dim=0, keepdim=True))


def test_depth_pool_divisibility_error_names_axis_count_and_fix() -> None:
    with pytest.raises(ValueError, match=r"q=5 does not divide the 12 slices along the coronal axis.*DivisiblePadd"):
        DepthPool(5, axis="coronal")(torch.randn(12, 4, 2, 2))


def test_projection_shape_and_error() -> None:
    out = RandomProjection(6, 4, seed=0)(torch.randn(3, 6, 5, 5))
    assert out.shape == (3, 4, 5, 5)
    with pytest.raises(ValueError, match=r"expected tokens \[M, 6"):
        RandomProjection(6, 4)(torch.randn(3, 5, 5, 5))


def test_token_validity_fraction() -> None:
    mask = torch.zeros(1, 8, 8, 8)
    mask[0, :, :4, :] = 1  # front half along the coronal dim
    validity = TokenValidity("axial", q=4, grid=4, delta=0.0)
    fraction = validity.fraction(mask)
    assert fraction.shape == (2, 4, 4)
    # Axial slices are [x, y]: patches with y < 4 are fully inside, others outside.
    assert torch.all(fraction[:, :, :2] == 1) and torch.all(fraction[:, :, 2:] == 0)
    mask2 = torch.zeros(1, 8, 8, 8)
    mask2[0, 0, 0, 0] = 1  # one voxel of a 2x2x4 token support (16 voxels)
    frac2 = TokenValidity("axial", q=4, grid=4).fraction(mask2)
    assert float(frac2[0, 0, 0]) == pytest.approx(1 / 16)
    assert bool(TokenValidity("axial", 4, 4, delta=0.0)(mask2)[0, 0, 0])
    assert not bool(TokenValidity("axial", 4, 4, delta=0.1)(mask2)[0, 0, 0])


def test_token_validity_is_strictly_above_delta() -> None:
    """Paper: a token is valid when its foreground fraction is > delta. A token whose fraction equals
    delta is invalid; at delta 0, background-only tokens (fraction exactly 0) are invalid."""
    mask = torch.zeros(1, 8, 8, 8)
    mask[0, 0, 0, 0] = 1  # token (0, 0, 0): 1 voxel of its 2x2x4 support, fraction 1/16 exactly
    mask[0, 4:6, 4:6, 4:8] = 1  # token (1, 2, 2): fully inside, fraction 1
    fraction = TokenValidity("axial", 4, 4).fraction(mask)
    assert float(fraction[0, 0, 0]) == 1 / 16 and float(fraction[1, 2, 2]) == 1
    array = TokenValidity("axial", 4, 4, delta=1 / 16)(mask)
    dictionary = TokenValidityd("m", q=[4], grid=4, axes=["axial"], delta=1 / 16)({"m": mask})
    dictionary = dictionary["m_valid_axial"]
    for valid in (array, dictionary):
        assert not bool(valid[0, 0, 0])  # fraction == delta
        assert bool(valid[1, 2, 2]) and int(valid.sum()) == 1
    at_zero = TokenValidity("axial", 4, 4, delta=0.0)(mask)
    assert bool(at_zero[0, 0, 0]) and bool(at_zero[1, 2, 2]) and int(at_zero.sum()) == 2
    assert not TokenValidity("axial", 4, 4, delta=0.0)(torch.zeros(1, 8, 8, 8)).any()  # background


def test_token_validity_binarises_the_mask() -> None:
    """A {0, 255} mask and a label mask give the fractions of their binary form (not 255x them)."""
    from scripts.transforms import TokenValidity

    gen = torch.Generator().manual_seed(0)
    binary = (torch.rand(1, 8, 8, 8, generator=gen) > 0.6).float()
    validity = TokenValidity("axial", 4, 2, delta=0.5)
    expected = validity.fraction(binary)
    assert 0 < float(expected.max()) <= 1
    for scaled in (binary * 255, binary * torch.randint(1, 4, binary.shape, generator=gen)):
        torch.testing.assert_close(validity.fraction(scaled), expected)
        assert torch.equal(validity(scaled), expected > 0.5)
