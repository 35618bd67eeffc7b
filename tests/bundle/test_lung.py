"""Lung CT pipeline: crop/paste geometry, left/right split, combination rule, q validation, masking of
the inverted maps, the synthetic chest-CT generator, and the lung overlay end to end through the bundle
(+ evaluation)."""

from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import DataLoader, MetaTensor
from scipy import ndimage
from scripts.engine.lung_parts import LungCS3FEvaluator
from scripts.errors import CS3FInputError
from scripts.inferer import CS3FInferer
from scripts.synthetic import lung as synth_lung
from scripts.synthetic.cli import main as synth_main
from scripts.synthetic.cohort_files import SIZE_CLASSES, size_class
from scripts.transforms.lung_crops import (
    PAPER_CROP_SIZE,
    PAPER_Q,
    SIDES,
    LungCrop,
    LungSplit,
    MaskWithSourced,
    check_crop_divisible,
)

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = [str(ROOT / "configs" / f) for f in ("inference.json", "lung_ct.json", "evaluate.json")]
CONN18 = ndimage.generate_binary_structure(3, 2)
TINY_CROP = [16, 28, 42]  # q = (8, 14, 14) divides it


# ----------------------------------------------------------------------------------------------
# geometry
# ----------------------------------------------------------------------------------------------


def _affine(spacing=(1.0, 1.0, 1.0), origin=(-30.0, 12.0, 5.0), signs=(1, 1, 1)) -> torch.Tensor:
    a = torch.eye(4, dtype=torch.float64)
    a[:3, :3] = torch.diag(torch.tensor(signs, dtype=torch.float64) * torch.tensor(spacing))
    a[:3, 3] = torch.tensor(origin)
    return a


def _box_mask(shape, start, end) -> torch.Tensor:
    m = torch.zeros((1, *shape), dtype=torch.bool)
    m[0, start[0] : end[0], start[1] : end[1], start[2] : end[2]] = True
    return m


@pytest.mark.parametrize(
    "start,end,crop",
    [
        ((10, 8, 6), (20, 20, 15), (16, 16, 16)),  # box smaller than the crop on every axis: pad
        ((2, 3, 1), (30, 25, 24), (16, 14, 12)),  # larger on every axis: centre crop
        ((5, 0, 3), (16, 27, 9), (14, 20, 10)),  # mixed, odd differences, box at the volume border
        ((0, 0, 0), (33, 28, 25), (40, 7, 25)),  # the whole volume; pad beyond it, crop, equal
    ],
)
def test_crop_paste_round_trip(start, end, crop) -> None:
    shape = (33, 28, 25)
    values = torch.arange(1, math.prod(shape) + 1, dtype=torch.float32).reshape(1, *shape)  # unique, > 0
    full = MetaTensor(values, affine=_affine(spacing=(0.8, 1.0, 1.5)))
    cropper = LungCrop(crop)
    box = cropper.box(_box_mask(shape, start, end))
    assert box == (tuple(start), tuple(end))
    out = cropper(full, box)
    assert tuple(out.shape) == (1, *crop)
    # every non-padded crop voxel comes from the box by one translation, centred on the box
    idx = torch.nonzero(out[0] > 0)
    src = torch.stack(torch.unravel_index(out[0][out[0] > 0].long() - 1, shape), 1)
    offset = src - idx
    assert torch.all(offset == offset[0]), "the crop is not a pure translation of the volume"
    for i in range(3):
        n, s = end[i] - start[i], crop[i]
        covered = idx[:, i].max() - idx[:, i].min() + 1
        assert covered == min(n, s)
        assert start[i] <= src[:, i].min() and src[:, i].max() < end[i]
        assert abs(float(offset[0, i]) - (start[i] + (n - s) / 2)) <= 0.5  # centred (to half a voxel)
    assert int((out[0] > 0).sum()) == math.prod(min(e - s, c) for s, e, c in zip(start, end, crop, strict=True))
    assert torch.all(out[0][out[0] <= 0] == 0)  # padding value
    # the crop's affine is the volume's, translated: same world position for the same voxel
    ijk = torch.cat([idx[:1].double(), torch.ones(1, 1, dtype=torch.float64)], 1)[0]
    src_ijk = torch.cat([src[:1].double(), torch.ones(1, 1, dtype=torch.float64)], 1)[0]
    torch.testing.assert_close(out.affine @ ijk, full.affine @ src_ijk)
    # paste: every voxel goes back where it came from, zeros elsewhere
    pasted = cropper.paste(out, box, full)
    assert tuple(pasted.shape) == (1, *shape)
    covered = pasted > 0
    torch.testing.assert_close(pasted[covered], values[covered])
    assert int(covered.sum()) == int((out > 0).sum())
    assert torch.all(pasted[~covered] == 0)


def test_crop_margin_is_clipped_to_the_volume() -> None:
    cropper = LungCrop((8, 8, 8), margin=3)
    assert cropper.box(_box_mask((20, 20, 20), (1, 5, 10), (6, 9, 19))) == ((0, 2, 7), (9, 12, 20))
    with pytest.raises(CS3FInputError, match="empty lung mask"):
        cropper.box(torch.zeros(1, 4, 4, 4))
    assert LungCrop((8, 8, 8)).truncated(((0, 0, 0), (9, 8, 20))) == ["sagittal", "axial"]


# ----------------------------------------------------------------------------------------------
# left / right
# ----------------------------------------------------------------------------------------------


def _two_lungs(shape=(40, 24, 20), low=(4, 16), high=(22, 36)) -> torch.Tensor:
    """Two blobs along the first axis: ``low`` (smaller x index) and ``high``."""
    m = torch.zeros((1, *shape))
    m[0, low[0] : low[1], 4:20, 3:17] = 1
    m[0, high[0] : high[1], 6:18, 2:15] = 1
    return m


def test_split_from_labels_and_from_a_binary_mask() -> None:
    binary = _two_lungs()
    low, high = binary.clone(), binary.clone()
    low[:, 20:] = 0
    high[:, :20] = 0
    # labels (lungmask: 1 = right, 2 = left)
    labels = MetaTensor(low * 2 + high * 1, affine=_affine())
    parts = LungSplit()(labels)
    assert torch.equal(parts["right"], high.bool()) and torch.equal(parts["left"], low.bool())
    # binary, RAS affine: world x grows with the index, so the blob at the higher index is the right lung
    parts = LungSplit()(MetaTensor(binary, affine=_affine()))
    assert torch.equal(parts["right"], high.bool()) and torch.equal(parts["left"], low.bool())
    # binary, stored LPS-like (x axis flipped): the same array now has the right lung at the low index
    parts = LungSplit(mode="binary")(MetaTensor(binary, affine=_affine(signs=(-1, -1, 1))))
    assert torch.equal(parts["right"], low.bool()) and torch.equal(parts["left"], high.bool())
    # a small speck is neither lung; the two largest components are
    specked = binary.clone()
    specked[0, 38, 0, 0] = 1
    parts = LungSplit()(MetaTensor(specked, affine=_affine()))
    assert torch.equal(parts["right"], high.bool())
    # lobe labels (TotalSegmentator-like ids) mapped to the lungs
    lobes = low * 1 + high * 3
    lobes[0, 28:, :, :] *= 5 / 3  # a second right lobe
    parts = LungSplit(labels=([3, 5], [1]))(lobes)
    assert torch.equal(parts["right"], high.bool()) and torch.equal(parts["left"], low.bool())


def test_split_errors_are_clear() -> None:
    touching = _two_lungs(low=(4, 22), high=(22, 36))
    with pytest.raises(CS3FInputError, match="the lungs touch or one is missing; give a left/right"):
        LungSplit()(touching, name="sub-7")
    one = _two_lungs()
    one[:, 20:] = 0
    with pytest.raises(CS3FInputError, match=r"sub-7: lung mask has no left lung \(label \[2\]\)"):
        LungSplit(mode="labels")(one, name="sub-7")
    extra = _two_lungs() * 2
    extra[0, 0, 0, 0] = 3
    extra[0, 30] = extra[0, 30].clamp(max=1)
    with pytest.raises(CS3FInputError, match=r"labels \[3\.0\] besides the lung labels"):
        LungSplit()(extra)
    with pytest.raises(CS3FInputError, match="mode must be one of"):
        LungSplit(mode="lobes")


# ----------------------------------------------------------------------------------------------
# q validation and the combination rule (the evaluator's split / merge)
# ----------------------------------------------------------------------------------------------


def test_crop_size_must_be_a_multiple_of_q_per_axis(tmp_path: Path) -> None:
    check_crop_divisible(PAPER_CROP_SIZE, PAPER_Q)  # the paper's geometry: 160/8, 238/14, 336/14
    with pytest.raises(CS3FInputError) as err:
        check_crop_divisible((160, 240, 336), (8, 14, 14))
    message = str(err.value)
    for part in ("coronal axis", "240", "q=14", "252 instead of 240"):
        assert part in message, message
    check_crop_divisible((160, 240, 336), (8, 14, 14), axes=["sagittal", "axial"])  # coronal not sliced
    with pytest.raises(CS3FInputError, match="on the axial axis is not a multiple of q=14"):
        _evaluator(tmp_path, crop_size=(16, 28, 40))


def _evaluator(tmp_path: Path, crop_size=TINY_CROP, **kwargs) -> LungCS3FEvaluator:
    return LungCS3FEvaluator(
        device="cpu",
        val_data_loader=DataLoader([]),
        network=torch.nn.Identity(),
        inferer=CS3FInferer(q=PAPER_Q),
        output_dir=tmp_path / "out",
        quiet=True,
        crop_size=crop_size,
        **kwargs,
    )


def _item(shape=(40, 24, 20)) -> dict:
    binary = _two_lungs(shape, low=(4, 17), high=(19, 36))  # close together: the crops overlap
    low, high = binary.clone(), binary.clone()
    low[:, 18:] = 0
    high[:, :18] = 0
    meta = {"filename_or_obj": "/data/images/sub-0042.nii.gz"}
    image = MetaTensor(torch.rand(1, *shape), affine=_affine(), meta=dict(meta))
    mask = MetaTensor(high * 1 + low * 2, affine=_affine(), meta=dict(meta))
    return {"image": image, "mask": mask}


def test_combination_rule_max_over_lungs_and_union_of_maps(tmp_path: Path) -> None:
    ev = _evaluator(tmp_path, crop_size=(24, 28, 28))
    # the crop is part of the token identity (cache key and bank identity)
    assert ev.preprocessing_identity["split"]["cropper"]["crop_size"] == [24, 28, 28]
    assert not ev.parts.check_registration("right", torch.zeros(1))
    item = _item()
    parts = ev.parts.split(item, "sub-0042")
    assert list(parts) == list(SIDES)
    for side, (image, mask) in parts.items():
        assert tuple(image.shape) == tuple(mask.shape) == (1, 24, 28, 28), side
    # a known field F on the volume; each part's "map" is F on its crop, kept inside its lung (as the
    # inferer's voxel_map does with the part mask)
    field = MetaTensor(torch.rand(1, 40, 24, 20) + 0.1, affine=_affine())
    lungs = LungSplit()(item["mask"])
    maps = {}
    for side, (_, mask) in parts.items():
        box = ev.parts.crop.cropper.box(lungs[side])
        maps[side] = ev.parts.crop.cropper(field, box).as_tensor() * mask.as_tensor()
    merged = ev.parts.merge(item, maps, "sub-0042")
    inside = lungs["right"] | lungs["left"]
    torch.testing.assert_close(merged[inside], field.as_tensor()[inside])  # union: each lung's own map
    assert torch.all(merged[~inside] == 0)
    # subject score (the engine: max of the merged map inside the mask) = max over both lungs
    per_lung = [float(field.as_tensor()[lungs[s]].max()) for s in SIDES]
    assert float(merged.max()) == pytest.approx(max(per_lung))
    # the crops overlap (lungs 2 voxels apart, crops 24 wide): a part's map outside its own lung (here
    # unmasked constants) never leaks into the other lung, and overlapping maps are not added up
    const = {"right": torch.full((1, 24, 28, 28), 1.0), "left": torch.full((1, 24, 28, 28), 2.0)}
    merged = ev.parts.merge(item, const, "sub-0042")
    assert torch.all(merged[lungs["right"]] == 1.0) and torch.all(merged[lungs["left"]] == 2.0)
    assert torch.all(merged[~inside] == 0)


def test_lung_larger_than_the_crop_is_cut_with_a_warning(tmp_path: Path) -> None:
    ev = _evaluator(tmp_path, crop_size=(8, 14, 14))
    item = _item()
    with pytest.warns(UserWarning, match="lung's box .* is larger than the crop size"):
        parts = ev.parts.split(item, "sub-0042")
    # right box 17 x 12 x 13, left 13 x 16 x 14 voxels
    assert ev.parts.truncated["sub-0042"] == {"right": ["sagittal"], "left": ["sagittal", "coronal"]}
    ones = {side: torch.ones(1, 8, 14, 14) for side in parts}
    merged = ev.parts.merge(item, ones, "sub-0042")
    lungs = LungSplit()(item["mask"])
    covered = (merged > 0).sum()
    assert 0 < covered < (lungs["right"] | lungs["left"]).sum()  # the cut-off ends score 0


def test_missing_mask_is_a_clear_error(tmp_path: Path) -> None:
    item = _item()
    del item["mask"]
    with pytest.raises(CS3FInputError, match="sub-0042: the lung CT pipeline needs a lung mask"):
        _evaluator(tmp_path).parts.split(item, "sub-0042")


def test_mask_with_source_uses_the_in_memory_mask() -> None:
    """The inverted map is zeroed outside the source-grid mask held in the item; the mask file it names
    is never read (it does not exist here), and the map keeps its metadata."""
    shape = (5, 6, 7)
    source = torch.zeros((1, *shape))
    source[0, 1:4, 2:5, 3:6] = 2.0  # a label value: inside is > 0
    mask = MetaTensor(source, meta={"filename_or_obj": "/no/such/mask.nii.gz"})
    pred = MetaTensor(torch.rand((1, *shape)) + 0.5, affine=_affine(), meta={"filename_or_obj": "img.nii.gz"})
    out = MaskWithSourced(keys="pred", mask_key="source_mask")({"pred": pred, "source_mask": mask})
    assert isinstance(out["pred"], MetaTensor) and out["pred"].meta["filename_or_obj"] == "img.nii.gz"
    assert torch.equal(out["pred"].as_tensor(), pred.as_tensor() * (source > 0))
    assert out["source_mask"] is mask
    # no source-grid mask (a volume without mask): nothing to do
    assert MaskWithSourced()({"pred": pred})["pred"] is pred
    # a map that is not on the source grid yet (before Invertd) is an error, not a silent broadcast
    with pytest.raises(ValueError, match="put MaskWithSourced after Invertd"):
        MaskWithSourced()({"pred": pred[:, :4], "source_mask": mask})


def test_lung_preprocessing_keeps_the_source_mask_and_inverts_without_it(tmp_path: Path) -> None:
    """configs/lung_ct.json copies the mask before reorientation and resampling; Invertd takes a map on
    the 1 mm grid back to the input grid without touching the copy."""
    from monai.bundle import ConfigParser

    cohort = synth_lung.generate_cohort(tmp_path / "c", n_normal=2, n_abnormal=0, seed=2, scale=0.12)
    parser = ConfigParser()
    parser.read_config(CONFIGS[:2])
    parser.update({"dataset_dir": str(cohort), "output_dir": str(tmp_path / "out")})
    item = parser.get_parsed_content("dataset")[0]
    on_disk = np.asarray(nib.load(cohort / "masks" / "sub-0001.nii.gz").dataobj)
    assert item["source_mask"].shape[1:] == on_disk.shape != item["mask"].shape[1:]  # 1.5 x 1.5 x 2.5 mm
    np.testing.assert_array_equal(item["source_mask"][0].numpy() > 0, on_disk > 0)
    postprocessing = parser.get_parsed_content("postprocessing#transforms#0")
    item["pred"] = MetaTensor(torch.ones_like(item["image"]), meta=item["image"].meta)
    source = item["source_mask"].clone()
    out = postprocessing(item)
    assert tuple(out["pred"].shape[1:]) == on_disk.shape
    assert torch.equal(out["source_mask"], source)
    pred = out["pred"][0].numpy()
    assert np.all(pred[on_disk == 0] == 0) and np.all(pred[on_disk > 0] > 0.5)


# ----------------------------------------------------------------------------------------------
# synthetic chest-CT cohorts
# ----------------------------------------------------------------------------------------------


def test_generator_is_deterministic_and_anatomical() -> None:
    kw = dict(abnormal=True, seed=5, scale=0.25)
    a, b = synth_lung.generate_subject(3, **kw), synth_lung.generate_subject(3, **kw)
    for key in ("image", "mask", "label", "affine"):
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key))
    assert a.lesion_volumes_mm3 == b.lesion_volumes_mm3
    c = synth_lung.generate_subject(4, **kw)
    assert a.image.shape != c.image.shape or not np.array_equal(a.image, c.image)
    assert a.image.dtype == np.int16 and set(np.unique(a.mask)) == {0, 1, 2}
    assert np.all(a.mask[a.label > 0] > 0), "lesions must lie inside the lung mask"
    # LPS storage by default, non-isotropic voxels; the right lung (label 1) has the larger world x
    assert "".join(nib.aff2axcodes(a.affine)) == "LPS"
    np.testing.assert_allclose(np.abs(np.diag(a.affine)[:3]), (1.5, 1.5, 2.5))
    world_x = {lab: (np.argwhere(a.mask == lab).mean(0) @ a.affine[0, :3] + a.affine[0, 3]) for lab in (1, 2)}
    assert world_x[1] > world_x[2]
    # intensities: air, parenchyma, solid lesions (HU)
    assert np.median(a.image[0]) < -900
    parenchyma = a.image[(a.mask > 0) & ~ndimage.binary_dilation(a.label > 0, iterations=2)]
    assert -900 < np.median(parenchyma) < -760
    core = ndimage.binary_erosion(a.label > 0)
    assert -200 < a.image[core].mean() < 200
    # recorded volumes = voxel counts; lesions are separate 18-connected components
    voxel = float(np.prod(np.abs(np.diag(a.affine)[:3])))
    comp, n = ndimage.label(a.label > 0, structure=CONN18)
    assert n == len(a.lesion_volumes_mm3)
    assert sorted(np.bincount(comp.ravel())[1:] * voxel) == pytest.approx(sorted(a.lesion_volumes_mm3))


def test_default_cohort_covers_the_three_lesion_size_classes() -> None:
    abnormal = synth_lung.cohort_layout(20, 12, 0)
    volumes = []
    for i in np.flatnonzero(abnormal):
        volumes += synth_lung.generate_subject(int(i), abnormal=True, seed=0).lesion_volumes_mm3
    classes = {c: sum(size_class(v) == c for v in volumes) for c in SIZE_CLASSES}
    assert all(classes[c] >= 2 for c in SIZE_CLASSES), classes
    assert min(volumes) >= 14.0  # at least the 3 mm diameter the lesion metrics count


def test_cohort_layout_cli_and_determinism(tmp_path: Path, capsys) -> None:
    args = ["--n_normal", "2", "--n_abnormal", "2", "--seed", "3", "--scale", "0.15", "--quiet"]
    assert synth_main(["--organ", "lung", "--out", str(tmp_path / "a"), *args]) == 0  # python -m scripts synth
    assert "lung CT cohort written to" in capsys.readouterr().out
    again = synth_lung.generate_cohort(tmp_path / "b", n_normal=2, n_abnormal=2, seed=3, scale=0.15)
    rows = list(csv.DictReader(open(tmp_path / "a" / "cohort.csv")))
    assert list(csv.DictReader(open(again / "cohort.csv"))) == rows
    assert {"image", "label", "mask", "abnormal"} <= set(rows[0]) and len(rows) == 4
    assert sum(r["abnormal"] == "1" for r in rows) == 2
    affines = []
    for row in rows:
        for key in ("image", "label", "mask"):
            x, y = nib.load(tmp_path / "a" / row[key]), nib.load(again / row[key])
            np.testing.assert_array_equal(np.asarray(x.dataobj), np.asarray(y.dataobj))
        affines.append(nib.load(tmp_path / "a" / row["image"]).affine)
    assert len({tuple(np.round(a, 3).ravel()) for a in affines}) == 4  # not registered
    assert synth_main(["--organ", "lung", "--out", str(tmp_path / "c"), "--shape", "64"]) == 2
    assert "--shape: brain option(s)" in capsys.readouterr().err and not (tmp_path / "c").exists()
    binary = synth_lung.generate_cohort(tmp_path / "bin", 1, 1, seed=3, scale=0.15, mask_format="binary")
    assert set(np.unique(nib.load(binary / "masks" / "sub-0001.nii.gz").dataobj)) == {0, 1}


# ----------------------------------------------------------------------------------------------
# the bundle: inference.json + lung_ct.json (+ evaluate.json)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_lung_cohort(tmp_path_factory) -> Path:
    """6 small chest CTs (scale 0.12: lung boxes fit 16 x 28 x 42 mm), 4 normal, 2 abnormal."""
    root = tmp_path_factory.mktemp("lung")
    return synth_lung.generate_cohort(root / "tiny", n_normal=4, n_abnormal=2, seed=1, scale=0.12)


def test_bad_lung_mask_fails_or_is_skipped_at_load_time(tiny_lung_cohort: Path, tmp_path: Path) -> None:
    import shutil

    from monai.bundle import ConfigParser

    data = tmp_path / "data"
    shutil.copytree(tiny_lung_cohort, data)
    bad = data / "masks" / "sub-0002.nii.gz"
    img = nib.load(bad)
    only_right = (np.asarray(img.dataobj) == 1).astype(np.uint8)
    nib.save(nib.Nifti1Image(only_right, img.affine, img.header), bad)  # {0, 1}: read as binary
    for policy in ("error", "skip"):
        parser = ConfigParser()
        parser.read_config(CONFIGS[:2])
        parser.update({"dataset_dir": str(data), "output_dir": str(tmp_path / "out"), "datalist#on_bad_input": policy})
        dataset = parser.get_parsed_content("dataset")
        assert "image" in dataset[0]
        if policy == "error":
            with pytest.raises(CS3FInputError, match=r"sub-0002.nii.gz: binary lung mask has 1 connected"):
                dataset[1]
        else:
            assert "one is missing" in dataset[1]["bad_input"] and dataset[1]["name"] == "sub-0002"


@pytest.fixture
def one_thread():
    """Tiny tensors on a shared 2-core machine: one torch thread is much faster than two competing."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_lung_overlay_end_to_end_with_evaluation(tiny_lung_cohort: Path, tmp_path: Path, one_thread) -> None:
    from monai.bundle import ConfigWorkflow

    out = tmp_path / "out"
    workflow = ConfigWorkflow(
        config_file=CONFIGS,
        workflow_type="infer",
        dataset_dir=str(tiny_lung_cohort),
        output_dir=str(out),
        image_size=32,
        crop_size=TINY_CROP,
        quiet=True,
        plots=False,
        **{"dataloader#num_workers": 0},
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    rows = list(csv.DictReader(open(tiny_lung_cohort / "cohort.csv")))
    scores = list(csv.DictReader(open(out / "scores.csv")))
    assert [r["image"] for r in scores] == [Path(r["image"]).name.removesuffix(".nii.gz") for r in rows]
    for row, score in zip(rows, scores, strict=True):
        image = nib.load(tiny_lung_cohort / row["image"])
        amap = nib.load(out / f"{score['image']}_anomaly.nii.gz")
        assert amap.shape == image.shape  # the input grid (not the 1 mm one) ...
        np.testing.assert_allclose(amap.affine, image.affine, atol=1e-5)  # ... and its LPS affine
        data = amap.get_fdata()
        lungs = np.asarray(nib.load(tiny_lung_cohort / row["mask"]).dataobj)
        assert np.all(data[lungs == 0] == 0)
        for lab in (1, 2):  # both lungs scored
            assert data[lungs == lab].max() > 0
        assert float(score["score"]) >= data.max() * 0.9  # the 1 mm max; the map is resampled from it
    run = json.loads((out / "run.json").read_text())
    assert run["parts"] == list(SIDES) and run["n_volumes"] == 6
    assert run["lung"]["crop_size"] == TINY_CROP and run["lung"]["truncated"] == {}
    assert run["inferer"]["q"] == list(PAPER_Q)
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("patient_auroc", "voxel_ap", "ltpr99_small", "dice99", "fp_per_volume", "localization99"):
        assert key in metrics
    assert 0.0 <= metrics["localization99"] <= 1.0


def test_cts_without_masks_run_with_automatic_masks(tmp_path: Path, one_thread) -> None:
    """``configs/lung_ct.json`` on CTs without lung masks: each gets :func:`segment_lungs`'s mask (the lungs
    and the default margin), every map lies inside it on the CT's own grid, and both lungs are scored."""
    from monai.bundle import ConfigWorkflow
    from scripts.transforms.lung_masks import segment_lungs

    cohort = synth_lung.generate_cohort(tmp_path / "ct", n_normal=2, n_abnormal=1, seed=3, scale=0.25)
    rows = list(csv.DictReader(open(cohort / "cohort.csv")))
    (cohort / "masks").rename(tmp_path / "masks_kept")
    with open(cohort / "cohort.csv", "w", newline="") as f:  # the cohort without its mask column
        writer = csv.DictWriter(f, fieldnames=["image", "label"])
        writer.writeheader()
        writer.writerows({"image": r["image"], "label": r["label"]} for r in rows)
    out = tmp_path / "out"
    workflow = ConfigWorkflow(
        config_file=CONFIGS[:2],
        workflow_type="infer",
        dataset_dir=str(cohort),
        output_dir=str(out),
        image_size=32,
        crop_size=[56, 70, 84],  # the lungs of scale 0.25 with their margin, q (8, 14, 14) dividing each
        quiet=True,
        **{"dataloader#num_workers": 0},
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        workflow.initialize()
    assert not [w for w in caught if "no foreground masks" in str(w.message)]  # the masks are made
    workflow.run()
    workflow.finalize()
    run = json.loads((out / "run.json").read_text())
    assert run["n_volumes"] == 3 and run["lung"]["truncated"] == {}
    for row in rows:
        image = nib.load(cohort / row["image"])
        lungs = segment_lungs(np.asarray(image.dataobj, np.float32), image.affine)
        data = nib.load(out / Path(row["image"]).name.replace(".nii.gz", "_anomaly.nii.gz")).get_fdata()
        assert data.shape == lungs.shape and np.all(data[lungs == 0] == 0)
        for side in (1, 2):
            assert data[lungs == side].max() > 0
        assert (data > 0).sum() > (
            segment_lungs(np.asarray(image.dataobj, np.float32), image.affine, margin_mm=0) > 0
        ).sum()
