"""Nyúl histogram standardisation against a hand computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scripts.transforms.intensity import NyulStandardize, NyulStandardized, nyul_landmarks


def _volume(scale: float = 1.0, shift: float = 0.0, seed: int = 0) -> torch.Tensor:
    """A foreground of 1000 voxels with values 1..1000 (shuffled), on a zero background."""
    values = np.random.default_rng(seed).permutation(np.arange(1, 1001, dtype=np.float64))
    image = np.zeros((1, 20, 10, 10))
    image[0, :10] = values.reshape(10, 10, 10) * scale + shift
    return torch.as_tensor(image)


def test_landmarks_are_foreground_percentiles() -> None:
    marks = nyul_landmarks(_volume(), None, 1.0, 99.0)
    expected = np.percentile(np.arange(1, 1001), [1, 10, 20, 30, 40, 50, 60, 70, 80, 90, 99])
    np.testing.assert_allclose(marks, expected)


def test_fit_and_map_by_hand() -> None:
    nyul = NyulStandardize(pc_low=1.0, pc_high=99.0, s_min=0.0, s_max=1.0)
    standard = nyul.fit([(_volume(), None), (_volume(2.0, 10.0, seed=1), None)])
    # Linear histograms: after [p1, p99] -> [0, 1] both give the same landmarks, so their mean is that.
    marks = np.percentile(np.arange(1, 1001), [1, 10, 20, 30, 40, 50, 60, 70, 80, 90, 99])
    np.testing.assert_allclose(standard, (marks - marks[0]) / (marks[-1] - marks[0]), atol=1e-12)
    a, b = nyul(_volume()), nyul(_volume(2.0, 10.0))
    torch.testing.assert_close(a[:, :10], b[:, :10])  # one tissue, one value, whatever the scanner gain
    # A voxel halfway between the 20th and 30th percentile lands halfway between their standard values.
    # (The probe voxel lies outside the mask, so it does not move the landmarks it is mapped by.)
    image = _volume().clone()
    mask = image > 0
    image[0, 15, 0, 0] = (marks[2] + marks[3]) / 2
    got = float(nyul(image, mask)[0, 15, 0, 0])
    assert got == pytest.approx((standard[2] + standard[3]) / 2, abs=1e-6)
    # Beyond the outer landmarks the outer segments are extended (no clamping).
    image[0, 15, 0, 0] = marks[-1] + (marks[-1] - marks[-2])
    assert float(nyul(image, mask)[0, 15, 0, 0]) == pytest.approx(2 * standard[-1] - standard[-2], abs=1e-6)


def test_dict_form_uses_the_mask_and_is_deterministic() -> None:
    image = _volume()
    mask = (image > 0).float()
    nyul = NyulStandardized("image", mask_key="mask")
    nyul.fit([{"image": image, "mask": mask}, {"image": _volume(3.0, seed=2), "mask": mask}])
    first = nyul({"image": image, "mask": mask})["image"]
    second = nyul({"image": image.clone(), "mask": mask})["image"]
    assert torch.equal(first, second) and first.dtype == torch.float32 and first.shape == image.shape
    array = NyulStandardize(nyul.standardize.standard)(image.numpy(), mask.numpy())
    assert isinstance(array, np.ndarray) and np.allclose(array, first.numpy())
    # Loading in worker processes learns the very same scale.
    rows = [{"image": image, "mask": mask}, {"image": _volume(3.0, seed=2), "mask": mask}]
    in_workers = NyulStandardized("image", mask_key="mask")
    in_workers.fit(rows, transform=lambda d: {**d, "image": d["image"] * 1.0}, num_workers=2)
    assert np.array_equal(in_workers.standardize.standard, nyul.standardize.standard)


def test_errors() -> None:
    with pytest.raises(RuntimeError, match="fit"):
        NyulStandardize()(_volume())
    with pytest.raises(ValueError, match="non-constant"):
        NyulStandardize().fit([(torch.ones(1, 4, 4, 4) * 3, torch.ones(1, 4, 4, 4))])
    with pytest.raises(ValueError, match="pc_low"):
        NyulStandardize(pc_low=20.0)


def test_the_shipped_standard_scale_is_the_one_learned_from_the_mni152_t1_template() -> None:
    """MNI152_T1_STANDARD, recomputed from nilearn's template and brain mask (1 mm) by fit."""
    from nilearn import datasets
    from scripts.transforms.intensity import MNI152_T1_STANDARD

    template = np.asarray(datasets.load_mni152_template(resolution=1).dataobj, dtype=np.float32)
    mask = np.asarray(datasets.load_mni152_brain_mask(resolution=1).dataobj) > 0
    learned = NyulStandardize().fit([(template[None], mask[None])])
    np.testing.assert_allclose(learned, MNI152_T1_STANDARD, atol=5e-5, rtol=0)  # shipped to 4 decimals
