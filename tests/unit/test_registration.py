"""Registration to a template (``scripts.transforms.registration``) and automatic lung masks
(``scripts.transforms.lung_masks``), on small synthetic volumes: in-process, no bundle runs."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, DivisiblePadd, Invertd, Orientationd
from scipy import ndimage
from scripts.engine.identity import describe_transform
from scripts.errors import CS3FInputError
from scripts.transforms.affine_registration import Template, estimate_affine, resample_to
from scripts.transforms.lung_masks import LungMasksd, segment_lungs
from scripts.transforms.registration import Register, Registerd

pytest.importorskip("SimpleITK")


def _grid(shape, spacing, centre=(0.0, 0.0, 0.0)) -> np.ndarray:
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = np.asarray(centre) - np.asarray(spacing) * (np.asarray(shape) - 1) / 2.0
    return affine


def _motion(degrees=(8.0, -6.0, 10.0), shift=(6.0, -5.0, 4.0), scale=(1.06, 0.95, 1.03)) -> np.ndarray:
    a, b, c = np.deg2rad(degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    out = np.eye(4)
    out[:3, :3] = rz @ ry @ rx @ np.diag(scale)
    out[:3, 3] = shift
    return out


@pytest.fixture(scope="module")
def phantom() -> Template:
    """A 36^3, 4 mm 'head': an ellipsoid brain with smooth texture and a bright blob on its left (an
    asymmetric template), zero outside."""
    shape, spacing = (36, 40, 34), (4.0, 4.0, 4.0)
    affine = _grid(shape, spacing)
    world = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1) @ affine[:3, :3].T
    world = world + affine[:3, 3]
    brain = ((world / np.array([52.0, 64.0, 48.0])) ** 2).sum(-1) <= 1.0
    rng = np.random.default_rng(0)
    texture = ndimage.gaussian_filter(rng.standard_normal(shape), 1.5)
    texture /= texture.std()
    blob = np.exp(-(((world - np.array([-25.0, 10.0, 8.0])) / 12.0) ** 2).sum(-1))
    image = np.where(brain, 0.55 + 0.15 * texture + 0.5 * blob, 0.0).astype(np.float32)
    return Template("phantom", image, brain, affine)


def _native(phantom: Template, motion: np.ndarray, shape=(44, 48, 26), spacing=(3.2, 3.2, 5.0)):
    """The phantom moved by ``motion`` (template world -> native world) onto another grid."""
    affine = _grid(shape, spacing, centre=(3.0, -4.0, 2.0))
    image = resample_to(phantom.image, motion @ phantom.affine, shape, affine, 1)
    mask = resample_to(phantom.mask.astype(np.float32), motion @ phantom.affine, shape, affine, 1) > 0.5
    return image.astype(np.float32), mask, affine


def _errors(found: np.ndarray, truth: np.ndarray, template: Template) -> np.ndarray:
    points = np.c_[np.argwhere(template.mask), np.ones(int(template.mask.sum()))] @ template.affine.T
    return np.linalg.norm((points @ (found - truth).T)[:, :3], axis=1)


def test_known_affine_is_recovered(phantom):
    motion = _motion()
    image, _, affine = _native(phantom, motion)
    found, metric = estimate_affine(image, affine, phantom, threads=1)
    error = _errors(found, motion, phantom)
    assert error.mean() < 1.5 and error.max() < 3.0, (error.mean(), error.max())
    assert metric < 0
    again, _ = estimate_affine(image, affine, phantom, threads=1)
    assert np.array_equal(found, again)  # seeded sampling, one thread: the same to the last bit


def test_inverse_brings_the_map_back_onto_the_input_grid(phantom):
    image, _, affine = _native(phantom, _motion())
    img = MetaTensor(torch.from_numpy(image)[None], affine=torch.from_numpy(affine))
    img.meta["filename_or_obj"] = "native.nii.gz"
    pre = Compose(
        [
            Registerd(keys=["image", "mask"], register=phantom, mask_margin_mm=0.0, min_coverage=0.5, max_metric=0.0),
            Orientationd(keys=["image", "mask"], axcodes="RAS"),
            DivisiblePadd(keys=["image", "mask"], k=8),
        ]
    )
    d = pre({"image": img})
    assert tuple(d["image"].shape[1:]) == tuple(-(-n // 8) * 8 for n in phantom.image.shape)
    assert np.allclose(d["image"].affine[:3, :3].numpy(), phantom.affine[:3, :3])  # the template's grid, padded
    registration = json.loads(d["image"].meta["registration"])
    assert registration["template"] == "phantom" and registration["coverage"] > 0.9
    # a map in template space (here: the registered image itself) goes back onto the native grid
    d["pred"] = MetaTensor(d["image"].clone(), meta=d["image"].meta)
    back = Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=False)(d)["pred"]
    assert tuple(back.shape[1:]) == image.shape
    assert np.allclose(back.affine.numpy(), affine)
    inside = ndimage.binary_erosion(image > 0, iterations=2)
    assert np.corrcoef(back[0].numpy()[inside], image[inside])[0, 1] > 0.95


def test_template_mask_when_none_and_given_mask_wins(phantom, tmp_path):
    image, mask, affine = _native(phantom, _motion())
    img = MetaTensor(torch.from_numpy(image)[None], affine=torch.from_numpy(affine))
    img.meta["filename_or_obj"] = str(tmp_path / "a.nii.gz")
    (tmp_path / "a.nii.gz").write_bytes(b"stand-in file: the cache keys on its bytes")
    reg = Registerd(keys=["image", "mask"], register=phantom, cache_dir=tmp_path, min_coverage=0.5, max_metric=0.0)
    assert reg.makes_masks
    out = reg({"image": img})
    dice = (
        2 * ((out["mask"][0].numpy() > 0) & phantom.mask).sum() / ((out["mask"] > 0).sum().item() + phantom.mask.sum())
    )
    assert dice > 0.9
    given = MetaTensor(torch.zeros_like(img), affine=img.affine)
    given[0, 10:20, 10:20, 5:15] = 1
    out = reg({"image": img, "mask": given})  # from the cache this time
    assert json.loads(out["image"].meta["registration"])["cached"] is True
    moved = out["mask"][0].numpy()
    assert set(np.unique(moved)) <= {0.0, 1.0} and 0 < moved.sum() < 0.5 * phantom.mask.sum()


def test_register_none_does_nothing_and_is_no_part_of_the_identity(phantom):
    noop = Registerd(keys=["image"], register="none")
    assert noop.is_noop and not noop.makes_masks
    data = {"image": MetaTensor(torch.ones(1, 4, 4, 4))}
    assert noop(data)["image"] is data["image"] and noop.inverse(data)["image"] is data["image"]
    assert describe_transform(Compose([noop, Orientationd(keys="image", axcodes="RAS")])) == describe_transform(
        Compose([Orientationd(keys="image", axcodes="RAS")])
    )
    with pytest.raises(CS3FInputError, match="register must be one of"):
        Registerd(register="mni153")


def _check(phantom: Template, image: np.ndarray, affine: np.ndarray, name: str) -> str:
    img = MetaTensor(torch.from_numpy(image)[None], affine=torch.from_numpy(affine))
    img.meta["filename_or_obj"] = name
    with pytest.raises(CS3FInputError) as err:
        Registerd(keys=["image"], register=phantom, max_metric=-0.3)({"image": img})
    message = str(err.value)
    assert message.startswith(name) and "registration to the phantom template failed" in message
    assert "\n" not in message
    return message


def test_half_cropped_head_fails(phantom):
    image, _, affine = _native(phantom, _motion())
    image[:, :, image.shape[2] // 2 :] = 0  # the upper half of the head is missing
    assert "template's brain mask lies on the image's foreground" in _check(phantom, image, affine, "half.nii.gz")


def test_left_right_flipped_head_fails(phantom):
    image, _, affine = _native(phantom, _motion(degrees=(3.0, -2.0, 4.0)))
    flipped = image[::-1].copy()  # voxels mirrored, header unchanged
    assert "mirrored template fits better" in _check(phantom, flipped, affine, "flipped.nii.gz")


def test_chest_ct_given_to_a_brain_template_fails(phantom):
    from scripts.synthetic.lung import generate_subject

    ct = generate_subject(0, abnormal=False, scale=0.3)
    scaled = np.clip((ct.image.astype(np.float32) + 1000.0) / 1400.0, 0.0, 1.0)
    _check(phantom, scaled, ct.affine, "chest.nii.gz")


def test_lung_segmentation_matches_the_synthetic_masks():
    from scripts.synthetic.lung import generate_subject

    for index in (0, 1):
        ct = generate_subject(index, abnormal=index == 1, scale=0.3)
        labels = segment_lungs(ct.image, ct.affine, margin_mm=0.0)
        for side in (1, 2):
            auto, truth = labels == side, ct.mask == side
            assert 2 * (auto & truth).sum() / (auto.sum() + truth.sum()) > 0.9, (index, side)
        d = LungMasksd(keys="image", margin_mm=0.0)(
            {
                "image": MetaTensor(
                    torch.from_numpy(ct.image[None].astype(np.float32)), affine=torch.from_numpy(ct.affine)
                )
            }
        )
        assert torch.equal(d["mask"][0], torch.from_numpy(labels))
    given = {"image": MetaTensor(torch.zeros(1, 4, 4, 4)), "mask": "kept"}
    assert LungMasksd(keys="image")(given)["mask"] == "kept"
    with pytest.raises(CS3FInputError, match="not two lungs"):
        segment_lungs(np.full((20, 20, 20), 40.0, np.float32), np.eye(4), name="solid.nii.gz")


def test_no_every_voxel_warning_when_the_preprocessing_makes_the_masks():
    from scripts.engine.datalist import Datalist
    from scripts.engine.evaluator import _say_foreground

    rows = Datalist(rows=[{"image": "a.nii.gz", "name": "a"}], folder="cohort", masks=True)
    with pytest.warns(UserWarning, match="no foreground masks in cohort: every voxel is foreground"):
        _say_foreground(rows, Compose([Orientationd(keys="image", axcodes="RAS")]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _say_foreground(rows, Compose([Compose([LungMasksd(keys="image")])]))


def test_lung_margin_takes_in_the_pleura_next_to_the_nearer_lung():
    """``margin_mm`` adds exactly the body voxels within reach of a lung, each to the nearer lung (checked by
    brute-force distances in mm), and keeps every lung voxel as it was."""
    from scripts.synthetic.lung import generate_subject

    ct = generate_subject(1, abnormal=True, scale=0.3)
    lungs = segment_lungs(ct.image, ct.affine, margin_mm=0.0)
    grown = segment_lungs(ct.image, ct.affine, margin_mm=25.0)
    assert np.array_equal(grown[lungs > 0], lungs[lungs > 0])
    added = (grown > 0) & (lungs == 0)
    assert added.sum() > 0.2 * (lungs > 0).sum()
    spacing = np.linalg.norm(ct.affine[:3, :3], axis=0)
    points = {side: np.argwhere(lungs == side) * spacing for side in (1, 2)}
    rng = np.random.default_rng(0)
    outside = np.argwhere((lungs == 0) & (ct.image > -500))  # body voxels (the phantom's body is solid)
    for voxel in outside[rng.choice(len(outside), 300, replace=False)]:
        distance = {side: np.sqrt(((points[side] - voxel * spacing) ** 2).sum(1)).min() for side in (1, 2)}
        if min(abs(distance[1] - distance[2]), abs(min(distance.values()) - 25.0)) < 1e-6:
            continue  # a tie: either answer is right
        nearer = 1 if distance[1] < distance[2] else 2
        assert grown[tuple(voxel)] == (nearer if distance[nearer] <= 25.0 else 0), (voxel, distance)
    air, _ = ndimage.label(ct.image < -500)
    assert air[0, 0, 0] > 0 and not grown[air == air[0, 0, 0]].any()  # nothing outside the body


def test_register_array_transform_roundtrip(phantom):
    motion = _motion()
    image, _, affine = _native(phantom, motion)
    img = MetaTensor(torch.from_numpy(image)[None], affine=torch.from_numpy(affine))
    reg = Register(phantom)
    moved = reg(img, motion)
    # the native grid is coarser (5 mm) than the template's texture: the round trip blurs it a little
    assert np.corrcoef(moved[0].numpy()[phantom.mask], phantom.image[phantom.mask])[0, 1] > 0.85
    back = reg.inverse(moved)
    assert tuple(back.shape) == tuple(img.shape) and np.allclose(back.affine.numpy(), affine)
