"""CS3FInferer: streaming tokenization, fusion, masking, batch invariances, end to end on blobs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.inferers import Inferer
from scripts.inferer import CS3FInferer
from scripts.scoring import mutual_similarity_scores
from tests.helpers import TinyEncoder, blob_cohort


def test_is_a_monai_inferer_and_token_shapes() -> None:
    inferer = CS3FInferer(q=(4, 8, 2), d=16)
    assert isinstance(inferer, Inferer)
    tokens = inferer.tokenize(torch.rand(1, 16, 16, 16), TinyEncoder(32))
    assert {k: g.tokens.shape for k, g in tokens.grids.items()} == {
        "sagittal/0": (4, 8, 8, 16),
        "sagittal/1": (4, 4, 4, 16),
        "coronal/0": (2, 8, 8, 16),
        "coronal/1": (2, 4, 4, 16),
        "axial/0": (8, 8, 8, 16),
        "axial/1": (8, 4, 4, 16),
    }
    assert tokens.num_tokens() == 4 * 64 + 4 * 16 + 2 * 64 + 2 * 16 + 8 * 64 + 8 * 16


def test_streaming_slabs_give_identical_tokens_and_bound_encoder_batch() -> None:
    volume, encoder = torch.rand(1, 24, 24, 24), TinyEncoder(32)
    one_slab = CS3FInferer(q=4, d=8, slab_size=1000).tokenize(volume, encoder)
    encoder.max_batch = 0
    streamed = CS3FInferer(q=4, d=8, slab_size=5).tokenize(volume, encoder)  # rounds to 4 slices
    assert encoder.max_batch == 4  # never more than one slab of raw features at a time
    for key, grid in one_slab.grids.items():
        torch.testing.assert_close(streamed.grids[key].tokens, grid.tokens)


def test_tokens_equal_manual_pipeline() -> None:
    """One axis x layer computed by hand from the encoder: slice, pool, normalise, project."""
    from scripts.transforms import projection_matrix

    volume, encoder = torch.rand(1, 8, 12, 16), TinyEncoder(32)
    tokens = CS3FInferer(axes=["coronal"], q=(1, 4, 1), d=6, seed=7).tokenize(volume, encoder)
    slices = volume[0].permute(1, 0, 2)[:, None]  # coronal slices [12, 1, 8(x), 16(z)]
    slices = F.interpolate(slices, size=(32, 32), mode="bilinear", align_corners=False)
    slices = (slices.expand(-1, 3, -1, -1) - 0.5) / 0.25
    feats = encoder(slices)[1]  # [12, 12, 4, 4]
    pooled = F.normalize(feats.reshape(3, 4, 12, 4, 4).mean(1), dim=1)
    expected = torch.einsum("mcuv,cd->muvd", pooled, projection_matrix(12, 6, 7, "coronal/1"))
    torch.testing.assert_close(tokens.grids["coronal/1"].tokens, expected, atol=1e-5, rtol=1e-5)


def test_voxel_map_fusion_and_mask() -> None:
    inferer = CS3FInferer(axes=["sagittal", "axial"], q=4)
    # Constant token grids: the map is the mean over layers, then over axes.
    scores = {
        "sagittal/0": torch.full((2, 4, 4), 1.0),
        "sagittal/1": torch.full((2, 2, 2), 3.0),
        "axial/0": torch.full((2, 4, 4), 6.0),
    }
    mask = torch.zeros(1, 8, 8, 8)
    mask[0, 2:6, 2:6, 2:6] = 1
    amap = inferer.voxel_map(scores, (8, 8, 8), mask)
    assert amap.shape == (1, 8, 8, 8)
    assert torch.allclose(amap[0, 3, 3, 3], torch.tensor(4.0))  # ((1 + 3) / 2 + 6) / 2
    assert torch.all(amap[mask == 0] == 0)
    # A hot token lands on the voxels it covers, in the right orientation.
    grid = torch.zeros(2, 4, 4)
    grid[1, 0, 3] = 1.0  # axial block 1 (z 4..7), x patch 0 (x 0..1), y patch 3 (y 6..7)
    hot = inferer.voxel_map({"axial/0": grid}, (8, 8, 8))
    peak = torch.nonzero(hot[0] == hot.max())
    assert torch.all(peak[:, 0] <= 1) and torch.all(peak[:, 1] >= 6) and torch.all(peak[:, 2] >= 4)


def test_scores_use_the_exact_scorer_and_masks_invalidate_tokens() -> None:
    inferer = CS3FInferer(axes=["axial"], q=4, d=8, rho=0.5)
    encoder = TinyEncoder(32)
    vols = torch.rand(4, 1, 8, 8, 8)
    masks = torch.ones(4, 1, 8, 8, 8)
    masks[:, :, :, :, :4] = 0  # first axial block of tokens outside the mask
    bank = [inferer.tokenize(v, encoder, m) for v, m in zip(vols, masks, strict=True)]
    scored = inferer.score(bank)
    key = "axial/0"
    tokens = torch.stack([b.grids[key].tokens.reshape(-1, 8) for b in bank])
    valid = torch.stack([b.grids[key].valid.reshape(-1) for b in bank])
    assert valid.float().mean() == 0.5
    expected = mutual_similarity_scores(tokens, valid, rho=0.5)
    torch.testing.assert_close(torch.stack([s[key].reshape(-1) for s in scored]), expected)
    assert torch.all(scored[0][key][0] == 0)


def test_score_reads_a_buffered_bank_in_place_and_leaves_others_alone() -> None:
    """A bank in a BatchBuffer is scored without a stacked copy; any other bank is not modified."""
    from scripts.tokens import BatchBuffer, batch_of

    inferer = CS3FInferer(axes=["axial", "coronal"], q=4, d=8, rho=0.5)
    encoder = TinyEncoder(32)
    vols = torch.rand(4, 1, 8, 8, 8)
    plain = [inferer.tokenize(v, encoder) for v in vols]
    buffered = [inferer.tokenize(v, encoder) for v in vols]
    buffer = BatchBuffer(len(buffered))
    for vt in buffered:
        buffer.add(vt)
    for key in plain[0].grids:
        tokens, valid = batch_of(buffered, key)
        assert tokens.data_ptr() == buffered[0].grids[key].tokens.data_ptr()  # a view: no copy
        assert valid.data_ptr() == buffered[0].grids[key].valid.data_ptr()
        stacked, _ = batch_of(plain, key)
        assert torch.equal(stacked, tokens)
    before = {k: [vt.grids[k].tokens for vt in plain] for k in plain[0].grids}
    a, b = inferer.score(plain), inferer.score(buffered)
    for key, tensors in before.items():
        assert all(vt.grids[key].tokens is t for vt, t in zip(plain, tensors, strict=True))
        expected = mutual_similarity_scores(torch.stack([t.reshape(-1, 8) for t in tensors]), rho=0.5)
        torch.testing.assert_close(torch.stack([s[key].reshape(-1) for s in a]), expected)
        assert all(torch.equal(x[key], y[key]) for x, y in zip(a, b, strict=True))


def test_batch_buffer_rows() -> None:
    """BatchBuffer copies each volume into the next row and re-points its grids there."""
    from scripts.tokens import BatchBuffer

    inferer = CS3FInferer(axes=["axial"], q=4, d=8)
    encoder = TinyEncoder(32)
    bank = [inferer.tokenize(v, encoder) for v in torch.rand(3, 1, 8, 8, 8)]
    values = [{k: g.tokens.clone() for k, g in vt.grids.items()} for vt in bank]
    buffer = BatchBuffer(capacity=4)
    assert all(buffer.add(vt) is vt for vt in bank)
    for key in bank[0].grids:
        base = bank[0].grids[key].tokens._base
        assert base.shape == (4, *values[0][key].shape)
        for row, (vt, v) in enumerate(zip(bank, values, strict=True)):
            assert vt.grids[key].tokens.data_ptr() == base[row].data_ptr()
            assert torch.equal(vt.grids[key].tokens, v[key])
    other = inferer.tokenize(torch.rand(1, 8, 8, 12), encoder)  # another grid: left as it is
    kept = other.grids["axial/0"].tokens
    assert buffer.add(other).grids["axial/0"].tokens is kept and buffer.count == 3
    fourth, fifth = (inferer.tokenize(v, encoder) for v in torch.rand(2, 1, 8, 8, 8))
    buffer.add(fourth)
    kept = fifth.grids["axial/0"].tokens
    assert buffer.add(fifth).grids["axial/0"].tokens is kept  # beyond capacity
    # Scored in place: the same scores as the stacked originals.
    expected = mutual_similarity_scores(torch.stack([v["axial/0"].reshape(-1, 8) for v in values]), rho=0.5)
    scored = CS3FInferer(axes=["axial"], q=4, d=8, rho=0.5).score(bank)
    torch.testing.assert_close(torch.stack([s["axial/0"].reshape(-1) for s in scored]), expected)


def test_batch_permutation_and_duplicate() -> None:
    vols, _ = blob_cohort(5, 16, abnormal=())
    vols[3] = vols[1]
    inferer = CS3FInferer(q=4, d=16, rho=0.1)
    maps, scores = inferer(vols, TinyEncoder(32))
    assert torch.all(maps[1] == 0) and torch.all(maps[3] == 0)  # K = 1: its twin explains it exactly
    perm = torch.tensor([4, 2, 0, 3, 1])
    maps_p, scores_p = inferer(vols[perm], TinyEncoder(32))
    torch.testing.assert_close(maps_p, maps[perm], atol=1e-5, rtol=0)
    torch.testing.assert_close(scores_p, scores[perm], atol=1e-5, rtol=0)


def test_errors() -> None:
    inferer = CS3FInferer(q=5)
    with pytest.raises(ValueError, match="q=5 does not divide the 16 slices along the sagittal axis"):
        inferer.tokenize(torch.rand(1, 16, 16, 16), TinyEncoder(32))
    inferer = CS3FInferer(axes=["axial"], q=4)
    with pytest.raises(ValueError, match="at least 2 volumes"):
        inferer(torch.rand(1, 1, 8, 8, 8), TinyEncoder(32))
    with pytest.raises(ValueError, match="token grids do not agree for axial/0"):
        inferer([torch.rand(1, 8, 8, 8), torch.rand(1, 8, 8, 12)], TinyEncoder(32))
    # Different in-plane sizes are fine when the grids agree (slices are resized to R x R).
    maps, scores = inferer([torch.rand(1, 8, 8, 8), torch.rand(1, 12, 10, 8)], TinyEncoder(32))
    assert [tuple(m.shape) for m in maps] == [(1, 8, 8, 8), (1, 12, 10, 8)] and scores.shape == (2,)
    with pytest.raises(ValueError, match="unknown axis"):
        CS3FInferer(axes=["oblique"])
    masks = torch.zeros(3, 1, 8, 8, 8)
    masks[:2] = 1
    with pytest.raises(ValueError, match=r"axial/0: volume\(s\) \[2\] of the batch have no valid token"):
        inferer(torch.rand(3, 1, 8, 8, 8), TinyEncoder(32), masks)


def test_end_to_end_blobs_tiny_encoder() -> None:
    vols, blobs = blob_cohort(8, 32, abnormal=(2, 5))
    maps, scores = CS3FInferer(q=4, d=32, rho=0.1)(vols, TinyEncoder(32))
    assert set(scores.topk(2).indices.tolist()) == {2, 5}
    for i in (2, 5):
        top5 = torch.quantile(maps[i].flatten(), 0.95)
        assert maps[i][blobs[i]].float().mean() > 0 and (maps[i][blobs[i]] >= top5).float().mean() > 0.9


def test_end_to_end_blobs_efficientnet_lite0() -> None:
    """Issue acceptance: 8 smooth random 32^3 volumes, a bright blob in 2 of them, the real encoder."""
    from scripts.encoders import build_encoder

    vols, blobs = blob_cohort(8, 32, abnormal=(1, 6), seed=3)
    encoder = build_encoder("efficientnet_lite0", input_size=64)
    maps, scores = CS3FInferer(q=(4, 4, 4), d=128, rho=0.1)(vols, encoder)
    assert set(scores.topk(2).indices.tolist()) == {1, 6}, scores
    for i in (1, 6):
        top5 = torch.quantile(maps[i].flatten(), 0.95)
        assert (maps[i][blobs[i]] >= top5).float().mean() > 0.9
