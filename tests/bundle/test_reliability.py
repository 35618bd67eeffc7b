"""Bad input, crash/resume, the token cache, determinism and order independence of the bundle run."""

from __future__ import annotations

import csv
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import time
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scripts.anomaly_map import smooth_map
from scripts.engine.datalist import make_datalist
from scripts.errors import CS3FInputError, find_input_error
from tests.helpers import FAST_ARGS, assert_one_error_line, assert_success, run_bundle, run_workflow, start_bundle


def _bundle(dataset: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """The user-facing command, in a subprocess (for what only a real process shows: exit code, kill)."""
    return run_bundle("--dataset_dir", dataset, "--output_dir", out, *FAST_ARGS, *extra)


def _run(dataset: Path, out: Path, **overrides) -> None:
    """The same run in-process through MONAI's ConfigWorkflow (saves an interpreter start per test)."""
    run_workflow(dataset_dir=str(dataset), output_dir=str(out), **overrides)


def _input_error(dataset: Path, out: Path, **overrides) -> str:
    """Run in-process; expect the CS3FInputError the command prints as its one line, and no outputs."""
    from scripts.errors import find_input_error

    with pytest.raises(Exception) as info:
        _run(dataset, out, **overrides)
    found = find_input_error(info.value)
    assert found is not None, f"not an input error: {info.value!r}"
    assert "\n" not in str(found)
    written = {p.name for p in out.glob("*")} if out.exists() else set()
    assert written <= {"tokens"}, f"partial outputs written: {written}"
    return str(found)


def _copy(cohort: Path, tmp_path: Path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(cohort, data)
    return data


def _rewrite(path: Path, fn) -> None:  # noqa: ANN001
    img = nib.load(path)
    nib.save(nib.Nifti1Image(fn(np.asarray(img.dataobj).copy()), img.affine, img.header), path)


# ---------------------------------------------------------------------------- one test per bad input
def test_missing_file_in_datalist(tiny_cohort: Path, tmp_path: Path) -> None:
    data = _copy(tiny_cohort, tmp_path)
    (data / "images" / "sub-0002.nii.gz").unlink()
    line = _input_error(data, tmp_path / "out")
    assert "image file not found" in line and "sub-0002.nii.gz" in line


def test_nan_voxels_error_and_zero_option(tiny_cohort: Path, tmp_path: Path) -> None:
    data = _copy(tiny_cohort, tmp_path)

    def poison(a: np.ndarray) -> np.ndarray:
        a[10, 10, 10:13] = np.nan
        a[11, 11, 11] = np.inf
        return a

    _rewrite(data / "images" / "sub-0004.nii.gz", poison)
    line = _input_error(data, tmp_path / "out")
    assert "sub-0004.nii.gz has 4 NaN/Inf voxels" in line
    _run(data, tmp_path / "zeroed", **{"loading#3#nonfinite": "zero"})
    amap = nib.load(tmp_path / "zeroed" / "sub-0004_anomaly.nii.gz").get_fdata()
    assert np.isfinite(amap).all()


def test_off_grid_volume_error_and_skip(tiny_cohort: Path, tmp_path: Path) -> None:
    data = _copy(tiny_cohort, tmp_path)
    for sub in ("images", "masks", "labels"):
        path = data / sub / "sub-0005.nii.gz"
        img = nib.load(path)
        shifted = img.affine.copy()
        shifted[:3, 3] += 7.0  # another space: not registered with the others
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj), shifted, img.header), path)
    line = _input_error(data, tmp_path / "out")
    assert "sub-0005.nii.gz is not on the cohort's grid" in line and "5 of 6 volumes" in line
    _run(data, tmp_path / "skip", **{"datalist#on_bad_input": "skip"})
    run = json.loads((tmp_path / "skip" / "run.json").read_text())
    assert run["n_volumes"] == 5 and "sub-0005" not in run["volumes"]
    assert [Path(s["image"]).name for s in run["skipped"]] == ["sub-0005.nii.gz"]
    assert not (tmp_path / "skip" / "sub-0005_anomaly.nii.gz").exists()


def test_corrupt_file_skipped_on_request(tiny_cohort: Path, tmp_path: Path) -> None:
    import gzip

    data = _copy(tiny_cohort, tmp_path)
    victim = data / "images" / "sub-0001.nii.gz"
    raw = gzip.decompress(victim.read_bytes())
    victim.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    _run(data, tmp_path / "skip", **{"datalist#on_bad_input": "skip"})
    run = json.loads((tmp_path / "skip" / "run.json").read_text())
    assert run["n_volumes"] == 5 and run["skipped"][0]["name"] == "sub-0001"
    assert "sub-0001.nii.gz" in run["skipped"][0]["reason"]
    with open(tmp_path / "skip" / "scores.csv") as f:
        assert "sub-0001" not in {r["image"] for r in csv.DictReader(f)}


def test_empty_mask(tiny_cohort: Path, tmp_path: Path) -> None:
    data = _copy(tiny_cohort, tmp_path)
    _rewrite(data / "masks" / "sub-0003.nii.gz", np.zeros_like)
    line = _input_error(data, tmp_path / "out")
    assert "mask" in line and "sub-0003.nii.gz is empty" in line


def test_fewer_than_two_volumes(tiny_cohort: Path, tmp_path: Path) -> None:
    data = tmp_path / "one"
    (data / "images").mkdir(parents=True)
    shutil.copy(tiny_cohort / "images" / "sub-0001.nii.gz", data / "images")
    line = _input_error(data, tmp_path / "out", use_masks=False)
    assert "found 1 usable volume(s)" in line and "need >= 2" in line


def test_unknown_encoder_and_missing_weights(tiny_cohort: Path, tmp_path: Path) -> None:
    line = _input_error(tiny_cohort, tmp_path / "o1", encoder_name="resnet9000")
    assert "Unknown encoder 'resnet9000'" in line and "efficientnet_lite0" in line
    line = _input_error(
        tiny_cohort, tmp_path / "o2", **{"encoder_name": "dinov2", "network_def#model_dir": "models/nope"}
    )
    assert "models/nope" in line and "not found" in line


def test_rho_out_of_range(tiny_cohort: Path, tmp_path: Path) -> None:
    line = _input_error(tiny_cohort, tmp_path / "out", rho=1.5)
    assert "rho" in line


def test_output_dir_not_writable(tiny_cohort: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    line = _input_error(tiny_cohort, blocker / "out")
    assert "output_dir" in line and "is a file" in line


def test_q_not_dividing_after_preprocessing(tiny_cohort: Path, tmp_path: Path) -> None:
    """Without DivisiblePadd the workflow reports the axis, the count, q and the fix in one error."""
    line = _input_error(tiny_cohort, tmp_path / "out", q=[5, 5, 5], variant="C", **{"finishing#0#k": [1, 1, 1]})
    assert "q=5 does not divide the 32 slices along the sagittal axis" in line and "DivisiblePadd" in line


def test_datalist_mask_shape_mismatch(tiny_cohort: Path, tmp_path: Path) -> None:
    data = _copy(tiny_cohort, tmp_path)
    path = data / "masks" / "sub-0006.nii.gz"
    img = nib.load(path)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:-2], img.affine), path)
    with pytest.raises(CS3FInputError, match=r"mask .*sub-0006.nii.gz has shape \(30, 32, 32\)"):
        make_datalist(data)


# ---------------------------------------------------------------------------- resume after a kill
def _outputs(out: Path) -> dict[str, bytes]:
    files = sorted(out.glob("*_anomaly.nii.gz")) + [out / "scores.csv"]
    return {f.name: f.read_bytes() for f in files}


@pytest.mark.slow
def test_killed_run_resumes_with_identical_outputs(tmp_path: Path) -> None:
    from scripts.synthetic.brain import generate_cohort

    data = generate_cohort(tmp_path / "cohort", n_normal=6, n_abnormal=2, shape=32, seed=7)
    assert_success(_bundle(data, tmp_path / "clean"))

    out = tmp_path / "killed"
    proc = start_bundle("--dataset_dir", data, "--output_dir", out, *FAST_ARGS)
    deadline = time.time() + 300
    while time.time() < deadline and len(list((out / "tokens").glob("*.pt"))) < 3:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    cached_before = len(list((out / "tokens").glob("*.pt")))
    assert 3 <= cached_before < 8, "the kill should land mid-tokenization"
    assert not (out / "scores.csv").exists()

    assert_success(_bundle(data, out))
    run = json.loads((out / "run.json").read_text())
    assert run["cached_volumes"] >= cached_before and run["encoded_volumes"] == 8 - run["cached_volumes"]
    assert _outputs(out) == _outputs(tmp_path / "clean")
    # A changed parameter that shapes tokens invalidates the cache.
    assert_success(_bundle(data, out, "--seed", "1"))
    assert json.loads((out / "run.json").read_text())["encoded_volumes"] == 8


def test_a_killed_runs_forked_children_do_not_keep_its_lock(tmp_path: Path) -> None:
    """A data-loader worker forked by a run inherits its descriptors; killed with the run, it lives on for a
    moment, and must not hold the output folder's lock meanwhile: the next run takes the lock at once."""
    import sys

    from scripts.storage.outputs import OutputLock

    code = (
        "import os, signal, time\n"
        "from scripts.storage.outputs import OutputLock\n"
        f"OutputLock({str(tmp_path)!r}).acquire()\n"
        "child = os.fork()\n"
        "if child == 0:\n"
        "    time.sleep(60)\n"
        "    os._exit(0)\n"
        "print(child, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=root, stdout=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline())  # not to EOF: the orphan keeps the pipe open
    try:
        assert proc.wait(timeout=60) == -signal.SIGKILL
        os.kill(child, 0)  # the orphan still lives
        lock = OutputLock(tmp_path)
        lock.acquire()  # and does not hold the lock
        lock.release()
    finally:
        os.kill(child, signal.SIGKILL)
        proc.stdout.close()


# ---------------------------------------------------------------------------- determinism and order
def test_shuffled_datalist_gives_identical_outputs(tiny_cohort: Path, tmp_path: Path) -> None:
    data = _copy(tiny_cohort, tmp_path)
    with open(data / "cohort.csv", newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, list(reader)
    random.Random(0).shuffle(rows)
    with open(data / "cohort.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    _run(tiny_cohort, tmp_path / "a")
    _run(data, tmp_path / "b")
    maps_a = {p.name: p.read_bytes() for p in (tmp_path / "a").glob("*_anomaly.nii.gz")}
    maps_b = {p.name: p.read_bytes() for p in (tmp_path / "b").glob("*_anomaly.nii.gz")}
    assert maps_a == maps_b and len(maps_a) == 6
    with open(tmp_path / "a" / "scores.csv") as f:
        scores_a = {r["image"]: r for r in csv.DictReader(f)}
    with open(tmp_path / "b" / "scores.csv") as f:
        scores_b = {r["image"]: r for r in csv.DictReader(f)}
    assert scores_a == scores_b


def test_threads_changing_between_steps_give_identical_outputs(
    tiny_cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run re-fits its CPU threads to the machine's load between progress steps: one whose count changes
    at every step writes the same maps and scores as one that keeps a single thread."""
    from scripts import threads

    counts = itertools.cycle([2, 1])
    monkeypatch.setattr(threads, "probe_threads", lambda: next(counts))
    monkeypatch.setattr(threads, "RECHECK_S", 0.0)
    _run(tiny_cohort, tmp_path / "changing")
    used = json.loads((tmp_path / "changing" / "run.json").read_text())["machine"]["threads_during_run"]
    assert used[:3] == [2, 1, 2] and len(used) > 12  # changed at every volume and every scored pair
    _run(tiny_cohort, tmp_path / "one", **{"evaluator#num_threads": 1})
    for name in ["scores.csv", *(p.name for p in (tmp_path / "one").glob("*_anomaly.nii.gz"))]:
        assert (tmp_path / "changing" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name


# ---------------------------------------------------------------------------- fuzz
def test_fuzz_inferer_only_documented_errors() -> None:
    """Random small shapes / q / masks / B: results are finite or the error is a documented ValueError."""
    from scripts.inferer import CS3FInferer
    from tests.helpers import TinyEncoder

    rng = random.Random(1234)
    encoder = TinyEncoder(32)
    documented = ("does not divide", "at least 2 volumes", "no valid token", "token grids do not agree")
    outcomes = {"ok": 0, "documented": 0}
    for _ in range(25):
        b = rng.randint(1, 5)
        shape = [rng.choice([4, 6, 8, 12]) for _ in range(3)]
        q = [rng.choice([1, 2, 3, 4]) for _ in range(3)]
        axes = rng.sample(["sagittal", "coronal", "axial"], rng.randint(1, 3))
        vols = torch.rand(b, 1, *shape)
        masks = (torch.rand(b, 1, *shape) > rng.choice([0.0, 0.5, 0.95, 1.0])).float()
        inferer = CS3FInferer(axes=axes, q=q, d=8, rho=rng.choice([0.1, 0.5, 1.0]), delta=rng.choice([0.0, 0.3]))
        try:
            maps, scores = inferer(vols, encoder, masks)
        except ValueError as err:
            assert any(msg in str(err) for msg in documented), err
            outcomes["documented"] += 1
            continue
        assert torch.isfinite(maps).all() and torch.isfinite(scores).all()
        assert torch.all(maps[masks == 0] == 0)
        outcomes["ok"] += 1
    assert outcomes["ok"] >= 5 and outcomes["documented"] >= 3, outcomes


def test_scoring_options_reuse_the_token_cache(tiny_cohort: Path, tmp_path: Path) -> None:
    """rho, variant, batching, smoothing and the subject score shape scores, not tokens: changing them
    re-encodes nothing; ``smooth_mm`` smooths each written map inside its mask."""
    out = tmp_path / "out"
    _run(tiny_cohort, out, smooth_mm=0.0)
    assert json.loads((out / "run.json").read_text())["encoded_volumes"] == 6
    plain = {f.name: nib.load(f) for f in out.glob("*_anomaly.nii.gz")}
    plain = {name: (np.asarray(img.dataobj), img.header.get_zooms()[:3]) for name, img in plain.items()}
    _run(tiny_cohort, out, rho=0.5, references="chunks:3")
    run = json.loads((out / "run.json").read_text())
    assert (run["encoded_volumes"], run["cached_volumes"]) == (0, 6)
    _run(tiny_cohort, out, smooth_mm=6.0)  # smoothing the maps: scoring only too
    run = json.loads((out / "run.json").read_text())
    assert (run["encoded_volumes"], run["cached_volumes"]) == (0, 6)
    masks = {row["name"]: row["mask"] for row in make_datalist(tiny_cohort).rows}
    for name, (before, zooms) in plain.items():
        mask = np.asarray(nib.load(masks[name.removesuffix("_anomaly.nii.gz")]).dataobj)[None]
        want = smooth_map(torch.from_numpy(before[None]), 6.0, torch.from_numpy(mask), zooms)[0]
        np.testing.assert_allclose(np.asarray(nib.load(out / name).dataobj), want.numpy(), atol=1e-5)
        assert np.abs(want.numpy() - before).max() > 1e-3
    _run(tiny_cohort, out, smooth_mm=6.0, subject_score="max")  # the subject score: scoring only too
    run = json.loads((out / "run.json").read_text())
    assert (run["encoded_volumes"], run["cached_volumes"]) == (0, 6)
    with open(out / "scores.csv") as f:
        scores = {row["image"]: float(row["score"]) for row in csv.DictReader(f)}
    for name in plain:
        peak = float(np.asarray(nib.load(out / name).dataobj).max())
        assert scores[name.removesuffix("_anomaly.nii.gz")] == pytest.approx(peak, rel=1e-5)
    _run(tiny_cohort, out, d=64)  # d shapes tokens: a different cache key
    assert json.loads((out / "run.json").read_text())["encoded_volumes"] == 6


def test_changed_input_bytes_are_encoded_again(tiny_cohort: Path, tmp_path: Path) -> None:
    """The token cache is keyed by the input files' bytes: a file rewritten under the same name is
    encoded again (the others come from the cache) and its map follows the new contents."""
    data, out = _copy(tiny_cohort, tmp_path), tmp_path / "out"
    _run(data, out)
    victim = "sub-0003"
    before = (out / f"{victim}_anomaly.nii.gz").read_bytes()
    with open(out / "scores.csv") as f:
        score_before = {r["image"]: r["score"] for r in csv.DictReader(f)}[victim]

    def lesion(a: np.ndarray) -> np.ndarray:  # a bright cube inside the brain mask
        a[12:20, 12:20, 12:20] = a.max()
        return a

    _rewrite(data / "images" / f"{victim}.nii.gz", lesion)
    _run(data, out)
    run = json.loads((out / "run.json").read_text())
    assert (run["encoded_volumes"], run["cached_volumes"]) == (1, 5)
    assert (out / f"{victim}_anomaly.nii.gz").read_bytes() != before
    with open(out / "scores.csv") as f:
        assert {r["image"]: r["score"] for r in csv.DictReader(f)}[victim] != score_before


# ---------------------------------------------------------------------------- trusted cache and bank
def test_damaged_token_cache_entry_is_encoded_again(tiny_cohort: Path, tmp_path: Path) -> None:
    """8 KB inside one cache entry overwritten by bytes from elsewhere in it: the rerun encodes that volume
    again with one warning naming the file, and writes the first run's outputs byte for byte."""
    out = tmp_path / "out"
    _run(tiny_cohort, out)
    first = _outputs(out)
    entry = out / "tokens" / "sub-0003.pt"
    data = bytearray(entry.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 8192] = data[middle // 4 : middle // 4 + 8192]
    entry.write_bytes(bytes(data))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _run(tiny_cohort, out)
    said = [str(w.message) for w in caught if "token cache" in str(w.message)]
    assert len(said) == 1 and str(entry) in said[0], said
    run = json.loads((out / "run.json").read_text())
    assert (run["encoded_volumes"], run["cached_volumes"]) == (1, 5)
    assert _outputs(out) == first


@pytest.fixture(scope="module")
def depth2_bank(tiny_cohort: Path, tmp_path_factory) -> Path:
    """configs/build_bank.json on the tiny cohort with two depth phases."""
    folder = tmp_path_factory.mktemp("bank") / "bank"
    run_workflow(
        ["configs/inference.json", "configs/build_bank.json"],
        dataset_dir=str(tiny_cohort),
        bank_dir=str(folder),
        depth_phases=2,
        **{"dataloader#num_workers": 0},
    )
    return folder


def _bank_error(bank: Path, tiny_cohort: Path, tmp_path: Path, monkeypatch, **overrides) -> str:  # noqa: ANN001
    """Score the tiny cohort against ``bank``: the one error line, raised before any volume is encoded."""
    from scripts.inferer import CS3FInferer

    def no_encoding(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("a volume was encoded before the bank was checked")

    monkeypatch.setattr(CS3FInferer, "tokenize", no_encoding)
    out = tmp_path / "out"
    line = _input_error(tiny_cohort, out, references=f"bank:{bank}", **{"dataloader#num_workers": 0, **overrides})
    assert not list(out.rglob("*.pt"))
    return line


def test_bank_of_other_depth_phases_fails_before_encoding(depth2_bank, tiny_cohort, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    line = _bank_error(depth2_bank, tiny_cohort, tmp_path, monkeypatch, depth_phases=1)
    assert "depth_phases (bank 2, run 1)" in line and line.endswith(f"({depth2_bank / 'bank.json'})"), line


def _damaged_copy(bank: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "bank"
    shutil.copytree(bank, copy)
    return copy


def test_truncated_bank_array_is_named(depth2_bank, tiny_cohort, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    bank = _damaged_copy(depth2_bank, tmp_path)
    array = bank / "tokens" / "axial_0.tokens.npy"
    array.write_bytes(array.read_bytes()[:-4096])
    line = _bank_error(bank, tiny_cohort, tmp_path, monkeypatch, depth_phases=2)
    assert "truncated" in line and line.endswith(f"({array})"), line


def test_bank_manifest_listing_fewer_volumes_than_its_arrays(depth2_bank, tiny_cohort, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    bank = _damaged_copy(depth2_bank, tmp_path)
    manifest = json.loads((bank / "bank.json").read_text())
    assert manifest["n_volumes"] == 6
    manifest.update({k: manifest[k][:3] for k in ("volumes", "sources", "subjects")}, n_volumes=3)
    (bank / "bank.json").write_text(json.dumps(manifest))
    line = _bank_error(bank, tiny_cohort, tmp_path, monkeypatch, depth_phases=2)
    assert "(6, " in line and "(3, " in line and "n_volumes 3" in line and line.endswith(".npy)"), line


def test_changed_bank_bytes_are_named(depth2_bank, tiny_cohort, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    bank = _damaged_copy(depth2_bank, tmp_path)
    array = bank / "tokens" / "coronal_0.tokens.npy"
    data = bytearray(array.read_bytes())
    data[len(data) // 2] ^= 0x40
    array.write_bytes(bytes(data))
    line = _bank_error(bank, tiny_cohort, tmp_path, monkeypatch, depth_phases=2)
    assert "parts['']['keys']['coronal/0']['tokens_sha256']" in line and line.endswith(f"({array})"), line


def test_bank_manifest_without_parts(depth2_bank, tiny_cohort, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    bank = _damaged_copy(depth2_bank, tmp_path)
    manifest = json.loads((bank / "bank.json").read_text())
    del manifest["parts"]
    (bank / "bank.json").write_text(json.dumps(manifest))
    line = _bank_error(bank, tiny_cohort, tmp_path, monkeypatch, depth_phases=2)
    assert "'parts'" in line and line.endswith(f"({bank / 'bank.json'})"), line


# ---------------------------------------------------------------------------- one run per folder, one set
def _published(out: Path) -> dict[str, bytes]:
    """The run's set in ``out``: maps, scores.csv and run.json."""
    return {
        p.name: p.read_bytes() for p in [*sorted(out.glob("*_anomaly.nii.gz")), out / "scores.csv", out / "run.json"]
    }


def _fake_previous_run(out: Path, names: list[str]) -> dict[str, bytes]:
    """A previous run's set (stand-in bytes) in ``out``."""
    out.mkdir()
    for name in names:
        (out / f"{name}_anomaly.nii.gz").write_bytes(b"old map " + name.encode())
    (out / "scores.csv").write_text("image,score\n" + "".join(f"{n},1\n" for n in names))
    (out / "run.json").write_text("{}\n")
    return _published(out)


def _no_run_files(out: Path) -> None:
    assert not {".cs3f.lock", ".cs3f-staging", ".cs3f-publishing"} & {p.name for p in out.iterdir()}


def test_a_flat_folder_as_its_own_output_folder_reruns_with_the_same_volumes(tiny_cohort: Path, tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    shutil.copytree(tiny_cohort / "images", flat)
    (flat / "._sub-0001.nii.gz").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X")  # macOS metadata
    names = [f"sub-000{i}" for i in range(1, 7)]
    for cached in (0, 6):
        _run(flat, flat, use_masks=False)
        record = json.loads((flat / "run.json").read_text())
        assert record["volumes"] == names and record["cached_volumes"] == cached
    assert sorted(p.name for p in flat.glob("*_anomaly.nii.gz")) == [f"{n}_anomaly.nii.gz" for n in names]


@pytest.mark.slow
def test_a_second_run_into_a_locked_folder_is_one_line(tiny_cohort: Path, tmp_path: Path) -> None:
    from scripts.storage.outputs import OutputLock

    out = tmp_path / "out"
    out.mkdir()
    lock = OutputLock(out)
    lock.acquire()  # a live run holds the folder
    try:
        proc = _bundle(tiny_cohort, out)
    finally:
        lock.release()
    line = assert_one_error_line(proc)
    assert f"another run is writing to {out} (pid {os.getpid()} on " in line
    assert list(out.iterdir()) == []  # refused before any work: not even tokens


def _protect(path: Path) -> None:
    """Make ``path`` unwritable for this process (immutable where root ignores the mode)."""
    if os.geteuid() != 0:
        path.chmod(0o444)
    elif subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("running as root without chattr: no file is unwritable")


def test_an_unwritable_scores_table_stops_the_run_before_any_map(tiny_cohort: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    before = _fake_previous_run(out, [r["name"] for r in make_datalist(tiny_cohort)])
    stamps = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    _protect(out / "scores.csv")
    try:
        with pytest.raises(Exception) as info:
            _run(tiny_cohort, out)
    finally:
        subprocess.run(["chattr", "-i", str(out / "scores.csv")], capture_output=True)
        (out / "scores.csv").chmod(0o644)
    line = str(find_input_error(info.value))
    assert line == f"cannot replace an earlier output: Permission denied [EACCES] ({out / 'scores.csv'})"
    assert _published(out) == before and {p: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    _no_run_files(out)
    assert not (out / "tokens").exists()  # refused before any work


def test_a_full_disk_while_writing_maps_is_one_line_and_publishes_nothing(
    tiny_cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from monai.data import NibabelWriter

    out, names = tmp_path / "out", [r["name"] for r in make_datalist(tiny_cohort)]
    before = _fake_previous_run(out, names)
    write, written = NibabelWriter.write, []

    def full_after_two(self, filename, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003 - as NibabelWriter.write
        if len(written) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written.append(filename)
        return write(self, filename, *args, **kwargs)

    monkeypatch.setattr(NibabelWriter, "write", full_after_two)
    with pytest.raises(Exception) as info:
        _run(tiny_cohort, out)
    line = str(find_input_error(info.value))
    assert line == f"cannot write: No space left on device [ENOSPC] ({out / '.cs3f-staging' / names[2]}_anomaly.nii.gz)"
    assert _published(out) == before
    _no_run_files(out)


SLOW_MAPS = """
import time
from monai.data import NibabelWriter

_write = NibabelWriter.write


def _slow_write(self, *args, **kwargs):
    time.sleep(0.5)
    return _write(self, *args, **kwargs)


NibabelWriter.write = _slow_write
"""


@pytest.mark.slow
def test_sigterm_during_a_rescore_publishes_nothing_and_the_rerun_completes(tiny_cohort: Path, tmp_path: Path) -> None:
    from tests.helpers import ROOT, bundle_command, bundle_env

    out = tmp_path / "out"
    _run(tiny_cohort, out)
    before = _published(out)
    command = bundle_command("--dataset_dir", tiny_cohort, "--output_dir", out, *FAST_ARGS, "--rho", "0.5")
    # each map takes at least 0.5 s to write in the child, so that the signal lands among the maps however
    # busy the machine is (this process may not look at the folder for a while)
    slow = tmp_path / "slow_maps"
    slow.mkdir()
    (slow / "sitecustomize.py").write_text(SLOW_MAPS)
    env = {**bundle_env(), "PYTHONPATH": os.pathsep.join(filter(None, [str(slow), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    staging, deadline = out / ".cs3f-staging", time.time() + 300
    while time.time() < deadline and proc.poll() is None and not list(staging.glob("*_anomaly.nii.gz")):
        time.sleep(0.01)
    staged = len(list(staging.glob("*_anomaly.nii.gz")))
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert 1 <= staged < 6, "the signal should land while the maps are written"
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 143 and "Traceback" not in err, err[-3000:]
    assert lines[-1] == "cs3f: interrupted (SIGTERM); no partial outputs were published, rerun to resume"
    assert _published(out) == before  # the previous run, whole
    _no_run_files(out)
    assert_success(_bundle(tiny_cohort, out, "--rho", "0.5"))
    record = json.loads((out / "run.json").read_text())
    assert (record["encoded_volumes"], record["cached_volumes"]) == (0, 6) and record["inferer"]["rho"] == 0.5
    after = _published(out)
    assert after.keys() == before.keys() and after["scores.csv"] != before["scores.csv"]
