"""Token validity (Remark 1) on masks that are not 0/1."""

from __future__ import annotations

import torch


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
