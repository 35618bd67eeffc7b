"""The engine's pieces: grid checks, token identity, skips, the run record and the output handlers."""

from __future__ import annotations

import csv
import json
import platform
import resource
import types
from pathlib import Path

import monai
import numpy
import pytest
import torch
from ignite.engine import Engine
from monai.bundle import ConfigParser
from monai.data import DataLoader, MetaTensor
from scripts.engine.distributed import gather_cohort, gather_scores
from scripts.engine.evaluator import CS3FEvaluator
from scripts.engine.grid import CohortGrid
from scripts.engine.handlers import RunRecorder, ScoresSaver
from scripts.engine.identity import describe_transform, preprocessing_identity, token_identity
from scripts.engine.record import StageTimes
from scripts.errors import CS3FInputError, find_input_error
from scripts.inferer import CS3FInferer
from scripts.storage.cache import TokenCache
from scripts.tokens import TokenGrid, VolumeTokens
from tests.helpers import TinyEncoder, blob_cohort

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = {
    "brain": [ROOT / "configs" / "inference.json"],
    "lung": [ROOT / "configs" / "inference.json", ROOT / "configs" / "lung_ct.json"],
}


# ----------------------------------------------------------------------------------------------- grid
def _image(shape=(1, 8, 8, 8), shift: float = 0.0) -> MetaTensor:
    affine = torch.eye(4, dtype=torch.float64)
    affine[0, 3] = shift
    return MetaTensor(torch.zeros(shape), affine=affine)


def test_the_first_volume_sets_the_grid_of_its_part() -> None:
    grid = CohortGrid()
    assert grid.check("a", "", _image()) is None
    assert grid.check("b", "", _image()) is None
    assert grid.check("c", "", _image(shift=5e-4)) is None  # within 1e-3 mm
    message = grid.check("d", "", _image(shape=(1, 8, 8, 16)))
    assert "d is not on the cohort's grid" in message and "(8, 8, 16) vs (8, 8, 8)" in message
    assert "not on the cohort's grid" in grid.check("e", "", _image(shift=2.0))
    # unregistered data (e.g. CT crops): the shape must agree, the affine need not
    assert grid.check("e", "", _image(shift=2.0), registered=False) is None
    # each part has its own grid, named in the message
    assert grid.check("a", "left", _image(shape=(1, 4, 4, 4))) is None
    assert "a (left) is not on" in grid.check("a", "left", _image(shape=(1, 8, 4, 4)))
    assert grid.check("x", "", torch.zeros(1, 8, 8, 8), registered=False) is None  # a plain tensor


def test_a_bank_grid_is_expected_from_the_first_volume_on() -> None:
    grid = CohortGrid()
    grid.expect("", ((8, 8, 8), torch.eye(4).tolist()))
    assert grid.check("a", "", _image()) is None
    assert "not on the cohort's grid" in grid.check("b", "", _image(shape=(1, 8, 8, 4)))


# ----------------------------------------------------------------------------------- token identity
# For every argument of every preprocessing transform in the configs, another valid value.
ALTERNATIVES = {
    "keys": lambda current: ["mask", "image"] if current.startswith("$") else {"image": "mask"}.get(current, "image"),
    "image_only": lambda current: False,
    "allow_missing_keys": lambda current: current is not True,
    "mask_key": lambda current: "seg",
    "nonfinite": lambda current: "zero",
    "axcodes": lambda current: "LPS",
    "spatial_size": lambda current: [64, 64, 64],
    "lower": lambda current: 1.0,
    "upper": lambda current: 99.0,
    "b_min": lambda current: 0.1,
    "b_max": lambda current: 0.9,
    "clip": lambda current: False,
    "k": lambda current: [16, 16, 16],
    "dtype": lambda current: "$torch.float64",
    "pixdim": lambda current: [2.0, 2.0, 2.0],
    "a_min": lambda current: -1000.0,
    "a_max": lambda current: 500.0,
    "labels": lambda current: "$(('R', 'L'), ('A', 'P'), ('S', 'I'))" if current is None else [2, 1],
    "register": lambda current: "mni152",
    "names": lambda current: "kept_mask",
    "mode": lambda current: "labels" if current == "@lung_mask_mode" else ["area", "nearest"],
}
# Config keys the transforms are built from: changing them must change the key as well.
PARAMETERS = {
    "brain": {"loading#6#spatial_size": [64, 64, 64], "intensity#0#lower": 1.0, "finishing#0#k": [16, 16, 16]},
    "lung": {"spacing": [1.5, 1.5, 1.5], "hu_window": [-1000.0, 400.0], "lung_mask_mode": "binary"},
}
INFERER = CS3FInferer(q=8, d=16)
STEP_LISTS = ("loading", "intensity", "finishing")
NETWORK = TinyEncoder(32)


def _run_key(configs: list[Path], cache_dir: Path, **overrides) -> str:
    parser = ConfigParser()
    parser.read_config([str(c) for c in configs])
    parser.update(overrides)
    identity = token_identity(
        INFERER.describe(), NETWORK, preprocessing_identity(parser.get_parsed_content("preprocessing"))
    )
    return TokenCache(cache_dir, identity).run_key


@pytest.mark.parametrize("config", list(CONFIGS))
def test_every_preprocessing_parameter_changes_the_token_cache_key(config: str, tmp_path: Path) -> None:
    configs = CONFIGS[config]
    base = _run_key(configs, tmp_path)
    assert _run_key(configs, tmp_path) == base  # deterministic
    parser = ConfigParser()
    parser.read_config([str(c) for c in configs])
    changed = []
    for steps in STEP_LISTS:  # the named lists that preprocessing composes
        for i, transform in enumerate(parser.get(steps)):
            for arg, current in transform.items():
                if arg in ("_target_", "cache_dir"):  # where a registration is kept does not shape tokens
                    continue
                assert arg in ALTERNATIVES, f"add another value of {transform['_target_']}'s {arg!r} to this test"
                override = {f"{steps}#{i}#{arg}": ALTERNATIVES[arg](current)}
                assert _run_key(configs, tmp_path, **override) != base, override
                changed.append(arg)
    assert len(changed) >= 20
    for key, value in PARAMETERS[config].items():
        assert _run_key(configs, tmp_path, **{key: value}) != base, key
    # a transform removed, or added, changes the key too
    finishing = parser.get("finishing")
    without = _run_key(configs, tmp_path, finishing=finishing[:-1])
    extra = {"_target_": "ScaleIntensityd", "keys": "image"}
    added = _run_key(configs, tmp_path, finishing=[*finishing, extra])
    assert len({base, without, added}) == 3


def test_scoring_options_keep_the_token_cache_key(tmp_path: Path) -> None:
    preprocessing = preprocessing_identity(None)

    def key(**kwargs) -> str:
        describe = CS3FInferer(**{"q": 8, "d": 16, "variant": "MS", "q_fine": 4, **kwargs}).describe()
        return TokenCache(tmp_path, token_identity(describe, NETWORK, preprocessing)).run_key

    base = key()
    for kwargs in (
        {"rho": 0.5},
        {"variant": "F"},
        {"L": 3},
        {"references": "chunks:4"},
        {"references": "random:3"},
        {"score_precision": "auto"},
    ):
        assert key(**kwargs) == base, kwargs
    for kwargs in ({"d": 32}, {"seed": 1}, {"q": 16}, {"q_fine": 2}, {"delta": 0.5}, {"variant": "C"}):
        assert key(**kwargs) != base, kwargs  # variant C makes no fine tokens


def test_describe_transform_reads_nested_parameters() -> None:
    from monai.transforms import Compose, Resized, ScaleIntensityRanged

    compose = Compose([Resized("image", spatial_size=(4, 5, 6)), ScaleIntensityRanged("image", 0, 10, 0, 1)])
    described = describe_transform(compose)
    assert list(described)[:2] == ["0:Resized", "1:ScaleIntensityRanged"]
    assert described["map_items"] is True  # the Compose's own options too
    assert described["0:Resized"]["resizer"]["spatial_size"] == [4, 5, 6]
    assert described["0:Resized"]["_target_"] == "monai.transforms.spatial.dictionary.Resized"
    assert described["1:ScaleIntensityRanged"]["scaler"]["a_max"] == 10
    assert json.loads(json.dumps(described)) == described  # plain JSON
    assert describe_transform(NETWORK) == "tests.helpers.TinyEncoder"  # networks by name only
    big = describe_transform(torch.arange(1000.0))
    assert big["shape"] == [1000] and len(big["sha256"]) == 64


def _cohort_items(n: int = 4) -> tuple[torch.Tensor, list[dict]]:
    volumes, _ = blob_cohort(n=n, size=32, abnormal=(1,))
    items = [{"image": MetaTensor(volumes[i], meta={"filename_or_obj": f"/data/v{i}.nii.gz"})} for i in range(n)]
    return volumes, items


def _evaluator(items: list, out: Path, **kwargs) -> CS3FEvaluator:
    loader = DataLoader(items, batch_size=1, num_workers=0)
    inferer = CS3FInferer(q=8, d=16, rho=0.5, progress=False)
    return CS3FEvaluator("cpu", loader, TinyEncoder(32), inferer, out, quiet=True, **kwargs)


def test_evaluator_cache_key_is_that_of_its_loaders_transform(tmp_path: Path) -> None:
    from monai.transforms import Compose, ScaleIntensityd
    from scripts.engine.datalist import CheckedDataset

    def cache_key(transform: Compose) -> str:
        loader = DataLoader(CheckedDataset([], transform), batch_size=1)
        return CS3FEvaluator("cpu", loader, NETWORK, INFERER, tmp_path, cache_dir=tmp_path).cache.run_key

    key = cache_key(Compose([ScaleIntensityd("image", minv=0.0, maxv=1.0)]))
    identity = token_identity(
        INFERER.describe(), NETWORK, preprocessing_identity(Compose([ScaleIntensityd("image", minv=0.0, maxv=1.0)]))
    )
    assert key == TokenCache(tmp_path, identity).run_key
    assert cache_key(Compose([ScaleIntensityd("image", minv=0.0, maxv=2.0)])) != key


# -------------------------------------------------------------------------- a run, its skips and outputs
def test_run_writes_scores_and_run_record(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    volumes, items = _cohort_items()
    bad = {"bad_input": "cannot read image /data/v8.nii.gz: truncated", "name": "v8"}
    off_grid = {"image": MetaTensor(torch.rand(1, 32, 32, 40), meta={"filename_or_obj": "/data/v9.nii.gz"})}
    out = tmp_path / "out"
    handlers = [
        ScoresSaver(out, quiet=False),  # the evaluator is quiet until below; the handlers' quiet is their own
        RunRecorder(out, config={"dataset_dir": "/data"}),
        ScoresSaver(out, filename="other_rank.csv", save_rank=1),
    ]
    datalist_skips = [{"image": "/data/v7.nii.gz", "reason": "not on the cohort's grid"}]
    with pytest.warns(UserWarning, match="skipping"):  # noqa: B908 (warned while the evaluator runs)
        evaluator = _evaluator(
            items[:2] + [bad] + items[2:3] + [off_grid] + items[3:],
            out,
            val_handlers=handlers,
            on_bad_input="skip",
            skipped=datalist_skips,
        )
        evaluator.quiet = False
        evaluator.run()
    assert sorted(p.name for p in out.iterdir()) == ["run.json", "scores.csv"]
    printed = capsys.readouterr().out
    assert f"cs3f: 4 anomaly maps in {out}" in printed and f"scores in {out / 'scores.csv'}" in printed

    # the scores: those of the inferer on the same volumes as one batch (an independent code path)
    _, expected = CS3FInferer(q=8, d=16, rho=0.5, progress=False)(volumes, TinyEncoder(32))
    with open(out / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["image", "score", "score_sagittal", "score_coronal", "score_axial"]
    assert [r["image"] for r in rows] == ["v0", "v1", "v2", "v3"]
    for row, score in zip(rows, expected.tolist(), strict=True):
        assert float(row["score"]) == pytest.approx(score, rel=1e-5)
        axis_max = [float(row[f"score_{a}"]) for a in ("sagittal", "coronal", "axial")]
        assert float(row["score"]) <= sum(axis_max) / 3 + 1e-6  # the max of a mean <= the mean of maxima
    assert (out / "scores.csv").read_text().endswith("\n") and "\r" not in (out / "scores.csv").read_text()

    record = json.loads((out / "run.json").read_text())
    assert record["n_volumes"] == 4 and record["volumes"] == ["v0", "v1", "v2", "v3"]
    assert [s.get("name", s.get("image")) for s in record["skipped"]] == ["/data/v7.nii.gz", "v8", "v9"]
    assert "truncated" in record["skipped"][1]["reason"]
    assert "v9 is not on the cohort's grid" in record["skipped"][2]["reason"]
    assert datalist_skips == [{"image": "/data/v7.nii.gz", "reason": "not on the cohort's grid"}]  # untouched
    assert (record["encoded_volumes"], record["cached_volumes"], record["world_size"]) == (4, 0, 1)
    assert set(record["timings_s"]) == {"load", "tokenize", "score", "write"}
    assert record["timings_s"]["tokenize"] > 0 and all(v >= 0 for v in record["timings_s"].values())
    assert record["versions"] == {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "numpy": numpy.__version__,
    }
    assert 0 < record["peak_rss_mb"] <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 + 1
    assert record["config"] == {"dataset_dir": "/data"}
    assert record["outputs"] == {
        "maps": str(out),
        "scores": str(out / "scores.csv"),
        "other_rank": str(out / "other_rank.csv"),  # listed, though written by rank 1 only
    }
    assert record["preprocessing"] == {"transforms": None}  # a plain list has no transform
    assert record["inferer"] == json.loads(json.dumps(CS3FInferer(q=8, d=16, rho=0.5).describe()))
    assert record["encoder"] == "TinyEncoder" and record["parts"] == [""]
    grids = {k: list(g.shape) for k, g in _tokens_of(volumes[0]).grids.items()}
    assert record["tokens"]["grids"] == grids
    assert record["tokens"]["per_volume"] == sum(torch.Size(g).numel() for g in grids.values())


def _tokens_of(volume: torch.Tensor) -> VolumeTokens:
    return CS3FInferer(q=8, d=16, rho=0.5, progress=False).tokenize(volume, TinyEncoder(32))


def test_bad_input_stops_the_run_unless_skipped_and_a_failed_run_writes_nothing(tmp_path: Path) -> None:
    _, items = _cohort_items(3)
    bad = {"bad_input": "cannot read image /data/v8.nii.gz: truncated", "name": "v8"}
    handlers = [ScoresSaver(tmp_path / "a"), RunRecorder(tmp_path / "a")]
    with pytest.raises(Exception) as info:
        _evaluator([items[0], bad, *items[1:]], tmp_path / "a", val_handlers=handlers).run()
    assert "v8.nii.gz: truncated" in str(find_input_error(info.value))
    assert not (tmp_path / "a").exists()
    # skipping leaves one usable volume: CS3F cannot compare it with anything
    handlers = [ScoresSaver(tmp_path / "b"), RunRecorder(tmp_path / "b")]
    with pytest.warns(UserWarning), pytest.raises(CS3FInputError, match=r"only 1 usable volume\(s\) \(1 skipped\)"):
        _evaluator([items[0], bad], tmp_path / "b", val_handlers=handlers, on_bad_input="skip").run()
    assert not (tmp_path / "b").exists()


def test_duplicate_names_and_rho_are_input_errors(tmp_path: Path) -> None:
    _, items = _cohort_items(2)
    with pytest.raises(CS3FInputError, match="two inputs are named 'v0'"):
        _evaluator([items[0], items[0], items[1]], tmp_path).run()
    with pytest.raises(CS3FInputError, match="rho must be in"):  # the inferer checks it, before any work
        CS3FInferer(q=8, rho=1.5)
    for precision in ("fp16", "bf16", "tf32"):  # scores are fp32 only
        with pytest.raises(CS3FInputError, match="score_precision must be one of"):
            CS3FInferer(q=8, score_precision=precision)


# ------------------------------------------------------------------------------------- timing, gathering
def test_stage_times_add_up_measured_intervals(monkeypatch: pytest.MonkeyPatch) -> None:
    ticks = iter([1.0, 3.5, 10.0, 10.25, 20.0, 20.5, 30.0, 31.0])
    monkeypatch.setattr("scripts.engine.record.time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))
    times = StageTimes()
    with times.measure("tokenize"):
        pass
    with times.measure("tokenize"):
        pass
    engine = Engine(lambda e, batch: None)
    times.attach(engine)
    engine.run([0, 1], max_epochs=1)  # two batches loaded: 0.5 s and 1 s on the fake clock
    assert times.seconds == {"load": 1.5, "tokenize": 2.75, "score": 0.0, "write": 0.0}


@pytest.fixture
def one_process_group(tmp_path: Path):
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def test_gathering_orders_names_as_the_dataset_and_copies_rows(one_process_group) -> None:
    rows = torch.randn(3, 2, 2, 2, 4)
    bank = {
        "": {
            n: VolumeTokens((16, 16, 16), {"axial/0": TokenGrid(rows[i], torch.ones(2, 2, 2, dtype=bool))})
            for i, n in enumerate(["c", "a", "b"])
        }
    }
    skipped = [{"image": "/data/x.nii.gz", "reason": "bad"}]
    names, gathered, all_skipped, counts, sources, subjects = gather_cohort(
        ["c", "a", "b"],
        bank,
        skipped,
        {"encoded": 2, "cached": 1},
        {"a": "1"},
        order=["a", "b", "c", "d"],
        subjects={"a": ("s", "v")},
    )
    assert names == ["a", "b", "c"] and all_skipped == skipped and counts == {"encoded": 2, "cached": 1}
    assert sources == {"a": "1"} and subjects == {"a": ("s", "v")}
    for i, n in enumerate(["c", "a", "b"]):
        grid = gathered[""][n].grids["axial/0"]
        assert torch.equal(grid.tokens, rows[i]) and grid.tokens.untyped_storage().nbytes() == rows[i].nbytes
    scores, seconds, registration = gather_scores({"a": {"score": 1.0}}, {"load": 2.0}, {"a": {"coverage": 1.0}})
    assert scores == {"a": {"score": 1.0}} and seconds == {"load": 2.0} and registration == {"a": {"coverage": 1.0}}


def test_the_identity_does_not_depend_on_the_installed_image_readers() -> None:
    from monai.data import NibabelReader
    from monai.transforms import LoadImaged

    plain = LoadImaged("image")
    more = LoadImaged("image")
    more._loader.readers = [*more._loader.readers, NibabelReader()]  # as if another reader were installed
    assert describe_transform(plain) == describe_transform(more)
    chosen = LoadImaged("image", reader="NibabelReader")
    assert describe_transform(chosen) != describe_transform(plain)  # a reader the config names does count


def test_automatic_lung_mask_parameters_key_the_tokens_of_the_volumes_they_mask(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every segment_lungs parameter, a default too, changes the cache key of a volume whose mask LungMasksd
    made (through the lung config's preprocessing and the data loader); a given mask and the run's identity
    of LungMasksd stay as they were."""
    import nibabel
    from monai.data import Dataset, decollate_batch
    from scripts.digest import file_digest
    from scripts.engine.cached_tokens import source_digest
    from scripts.synthetic.lung import generate_subject
    from scripts.transforms import lung_masks
    from scripts.transforms.lung_masks import LungMasksd

    ct = generate_subject(0, abnormal=False, scale=0.2)
    image_file, mask_file = str(tmp_path / "ct.nii.gz"), str(tmp_path / "mask.nii.gz")
    nibabel.save(nibabel.Nifti1Image(ct.image, ct.affine), image_file)
    nibabel.save(nibabel.Nifti1Image(ct.mask, ct.affine), mask_file)
    parser = ConfigParser()
    parser.read_config([str(c) for c in CONFIGS["lung"]])
    loader = DataLoader(Dataset([{"image": image_file}], parser.get_parsed_content("preprocessing")))
    item = decollate_batch(next(iter(loader)))[0]
    key = source_digest(item)
    assert key != file_digest([image_file, image_file]) and json.loads(item["mask"].meta["made_by"])["closing_mm"] == 15

    def made_key(**kwargs) -> str:
        meta = {"filename_or_obj": image_file, "made_by": LungMasksd(**kwargs).made_by()}
        return source_digest({"image": item["image"], "mask": MetaTensor(item["mask"].as_tensor(), meta=meta)})

    assert made_key() == key == made_key(closing_mm=15.0)  # a default spelled out: the same masks
    changes = {
        "body_hu": -450.0,
        "air_hu": -350.0,
        "airway_mm": 3.0,
        "closing_mm": 10.0,
        "min_component_ml": 5.0,
        "margin_mm": 5.0,
    }
    assert len({key, *(made_key(**{k: v}) for k, v in changes.items())}) == 1 + len(changes)
    defaults = list(lung_masks.segment_lungs.__defaults__)
    defaults[defaults.index(15.0)] = 8.0  # an older closing default
    monkeypatch.setattr(lung_masks.segment_lungs, "__defaults__", tuple(defaults))
    assert made_key() == made_key(closing_mm=8.0) != key
    given = MetaTensor(torch.from_numpy(ct.mask[None]), meta={"filename_or_obj": mask_file})
    assert LungMasksd()({"image": item["image"], "mask": given})["mask"] is given
    assert source_digest({"image": item["image"], "mask": given}) == file_digest([image_file, mask_file])
    # the run's identity describes LungMasksd as configured: lung runs with masks keep their cache keys
    assert describe_transform(LungMasksd()) == {
        "_target_": "scripts.transforms.lung_masks.LungMasksd",
        "allow_missing_keys": False,
        "keys": ["image"],
        "kwargs": {},
        "mask_key": "mask",
    }
    with pytest.raises(CS3FInputError, match="closing"):
        LungMasksd(closing=3.0)
