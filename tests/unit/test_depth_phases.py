"""Coarse tokens at more than one pooling phase (``depth_phases``): tokens, scores and maps against
independent computations (the volume rolled along the axis and tokenized again; the exact scorer on the
concatenated tokens; the maps rolled back by hand)."""

from __future__ import annotations

import pytest
import torch
from scripts.engine.identity import SCORING_ONLY
from scripts.errors import CS3FInputError
from scripts.inferer import CS3FInferer
from scripts.scoring import mutual_similarity_scores
from scripts.tokens import phase_shifts
from scripts.transforms.tokenization import AXES, axis_index
from tests.helpers import TinyEncoder


def _rolled_tokens(volume, mask, axis, shift, **kwargs):
    """Tokens of ``volume`` rolled by ``-shift`` slices along ``axis`` (one-phase tokenizer)."""
    dim = 1 + axis_index(axis)
    rolled, rolled_mask = (torch.roll(t, -shift, dims=dim) for t in (volume, mask))
    return CS3FInferer(axes=[axis], **kwargs).tokenize(rolled, TinyEncoder(32), rolled_mask)


def test_phase_shifts() -> None:
    assert phase_shifts(4, 1) == [0]
    assert phase_shifts(4, 2) == [0, 2]
    assert phase_shifts(6, 3) == [0, 2, 4]
    assert phase_shifts(5, 2) == [0, 2]


@pytest.mark.parametrize(("q", "phases", "slab_size"), [(4, 2, 4), (4, 2, 1000), (6, 3, 6), (4, 4, 8)])
def test_shifted_phases_are_the_rolled_volume_tokens(q: int, phases: int, slab_size: int) -> None:
    """Phase ``j`` of a grid is the one-phase tokens of the volume rolled by ``-s_j`` slices (streamed
    slab by slab or in one slab alike); its last token, which wraps round, is invalid."""
    torch.manual_seed(0)
    volume = torch.rand(1, 24, 24, 24)
    mask = (torch.rand(1, 24, 24, 24) > 0.4).float()
    kwargs = {"q": q, "d": 8, "seed": 3}
    tokens = CS3FInferer(depth_phases=phases, slab_size=slab_size, **kwargs).tokenize(volume, TinyEncoder(32), mask)
    for axis in AXES:
        for layer in (0, 1):
            grid = tokens.grids[f"{axis}/{layer}"]
            m = 24 // q
            assert grid.tokens.shape[0] == phases * m
            for j, shift in enumerate(phase_shifts(q, phases)):
                ref = _rolled_tokens(volume, mask, axis, shift, **kwargs).grids[f"{axis}/{layer}"]
                rows = slice(j * m, (j + 1) * m)
                torch.testing.assert_close(grid.tokens[rows], ref.tokens, atol=1e-5, rtol=1e-5)
                expected = ref.valid.clone()
                if shift:
                    expected[-1] = False
                assert torch.equal(grid.valid[rows], expected)


def _batch(n: int = 5, size: int = 16):
    torch.manual_seed(1)
    volumes = torch.rand(n, 1, size, size, size)
    masks = torch.zeros(n, 1, size, size, size)
    masks[:, :, 2:14, 1:15, 3:13] = 1
    return volumes, masks


def test_maps_equal_the_exact_scorer_on_all_phases() -> None:
    """Every token of every phase is scored (Eq. 1-2) against every phase of the other volumes; the map
    averages the usual tokens' map and the shifted tokens' map rolled back by ``q / 2`` slices."""
    volumes, masks = _batch()
    inferer = CS3FInferer(axes=["axial"], q=4, d=8, rho=0.5, depth_phases=2)
    maps, _ = inferer(volumes, TinyEncoder(32), masks)
    torch.testing.assert_close(maps, _expected_maps(volumes, masks), atol=1e-5, rtol=1e-5)


def _expected_maps(volumes, masks):
    """The maps by hand: one-phase tokens of the volume and of its roll, scored jointly, fused per phase."""
    plain = CS3FInferer(axes=["axial"], q=4, d=8, rho=0.5)
    encoder = TinyEncoder(32)
    phase0 = [plain.tokenize(v, encoder, m) for v, m in zip(volumes, masks, strict=True)]
    phase1 = [_rolled_tokens(v, m, "axial", 2, q=4, d=8) for v, m in zip(volumes, masks, strict=True)]
    per_volume = [dict() for _ in volumes]
    for key in phase0[0].grids:
        shape = phase0[0].grids[key].shape
        n = shape[0] * shape[1] * shape[2]
        tokens, valid = [], []
        for a, b in zip(phase0, phase1, strict=True):
            v = b.grids[key].valid.clone()
            v[-1] = False
            tokens.append(torch.cat([a.grids[key].tokens, b.grids[key].tokens]).flatten(0, 2))
            valid.append(torch.cat([a.grids[key].valid, v]).flatten())
        scores = mutual_similarity_scores(torch.stack(tokens), torch.stack(valid), rho=0.5)
        for i in range(len(volumes)):
            per_volume[i][key] = (scores[i, :n].reshape(shape), scores[i, n:].reshape(shape))
    out = []
    for i, grids in enumerate(per_volume):
        first = plain.voxel_map({k: g[0] for k, g in grids.items()}, (16, 16, 16))
        second = plain.voxel_map({k: g[1] for k, g in grids.items()}, (16, 16, 16))
        out.append((first + torch.roll(second, 2, dims=3)) / 2 * masks[i])  # axial: the last spatial dim
    return torch.stack(out)


def test_one_phase_is_the_paper() -> None:
    volumes, masks = _batch(4)
    encoder = TinyEncoder(32)
    a, sa = CS3FInferer(q=4, d=8, rho=0.5)(volumes, encoder, masks)
    b, sb = CS3FInferer(q=4, d=8, rho=0.5, depth_phases=1)(volumes, encoder, masks)
    assert torch.equal(a, b) and torch.equal(sa, sb)
    assert "depth_phases" not in CS3FInferer().describe()  # the paper's record and cache key are unchanged


def test_record_cache_key_and_errors() -> None:
    assert CS3FInferer(q=4, depth_phases=2).describe()["depth_phases"] == 2
    assert "depth_phases" not in SCORING_ONLY  # it makes other tokens: a cache made without it is not reused
    with pytest.raises(ValueError, match="variant C only"):
        CS3FInferer(q=4, variant="MS", q_fine=2, depth_phases=2)
    with pytest.raises(ValueError, match="exceeds the depth pooling q=4"):
        CS3FInferer(q=(4, 8, 8), depth_phases=5)
    assert CS3FInferer(q=[4, 4, 4], depth_phases="2").describe()["depth_phases"] == 2
    for bad, message in [
        ({"depth_phases": 0}, "depth_phases"),
        ({"depth_phases": 8}, "exceeds the depth pooling q=4"),
        (
            {"variant": "MS", "q_fine": [2, 2, 2], "depth_phases": 2},
            "add --depth_phases 1, or use the configs/multiscale",
        ),
    ]:
        with pytest.raises(CS3FInputError, match=message):
            CS3FInferer(**{"q": [4, 4, 4], **bad})
