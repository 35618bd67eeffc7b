"""torchrun (gloo, 2 processes on the CPU) gives the same outputs as the single-process run."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scripts.synthetic.brain import generate_cohort
from scripts.synthetic.native_space import move_cohort
from tests.helpers import FAST_ARGS, assert_success, run_bundle

MULTI = ["configs/inference.json", "configs/multi_gpu_inference.json"]


def _with_repeat_scan(cohort: Path, tmp_path: Path) -> tuple[Path, str]:
    """The cohort with a second scan of a lesion subject (a copy shifted by one voxel, named as that
    subject in a ``subject`` column) right after it: sharded round-robin, the two scans land on different
    ranks, and only the gathered subjects keep them apart."""
    data = tmp_path / "data"
    shutil.copytree(cohort, data)
    with (data / "cohort.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    at = next(i for i, r in enumerate(rows) if r["abnormal"] == "1")
    copy = dict(rows[at])
    for key in ("image", "mask", "label"):
        target = Path(copy[key]).with_name("repeat-0001.nii.gz")
        img = nib.load(data / copy[key])
        nib.save(nib.Nifti1Image(np.roll(np.asarray(img.dataobj), 1, axis=0), img.affine, img.header), data / target)
        copy[key] = str(target)
    for row in rows:
        row["subject"] = Path(row["image"]).name.split(".")[0]
    copy["subject"] = rows[at]["subject"]
    rows.insert(at + 1, copy)
    with (data / "cohort.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return data, Path(rows[at]["image"]).name.split(".")[0]


def _files(out: Path) -> dict[str, bytes]:
    names = sorted(p.name for p in out.glob("*_anomaly.nii.gz")) + ["scores.csv"]
    return {n: (out / n).read_bytes() for n in names}


@pytest.mark.slow
def test_torchrun_two_processes_equals_single_process(tiny_cohort: Path, tmp_path: Path) -> None:
    """Also with a repeated scan whose two copies are sharded to different ranks, and the evaluation."""
    data, lesion = _with_repeat_scan(tiny_cohort, tmp_path)
    single, multi = tmp_path / "single", tmp_path / "multi"
    one = ["configs/inference.json", "configs/evaluate.json"]
    assert_success(
        run_bundle("--dataset_dir", data, "--output_dir", single, "--plots", "false", *FAST_ARGS, config_file=one)
    )
    configs = ["configs/inference.json", "configs/multi_gpu_inference.json", "configs/multi_gpu_evaluate.json"]
    proc = run_bundle(
        "--dataset_dir", data, "--output_dir", multi, "--plots", "false", *FAST_ARGS, config_file=configs, nproc=2
    )
    assert_success(proc)
    assert len(_files(single)) == 8 and _files(multi) == _files(single)
    # the evaluation ran once, on rank 0, after every map was written: the same metrics as one process
    assert json.loads((multi / "metrics.json").read_text()) == json.loads((single / "metrics.json").read_text())
    run = json.loads((multi / "run.json").read_text())
    assert run["world_size"] == 2 and run["n_volumes"] == 7 and run["encoded_volumes"] == 7
    with (multi / "scores.csv").open(newline="") as f:
        scores = {r["image"]: float(r["score"]) for r in csv.DictReader(f)}
    assert scores["repeat-0001"] > 0 and scores[lesion] > 0  # the scans do not explain each other away
    # Without the subject column the same run differs: the gathered subjects were what kept them apart.
    with (data / "cohort.csv").open(newline="") as f:
        rows = [{k: v for k, v in r.items() if k != "subject"} for r in csv.DictReader(f)]
    with (data / "cohort.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plain = tmp_path / "plain"
    assert_success(run_bundle("--dataset_dir", data, "--output_dir", plain, *FAST_ARGS))
    assert _files(plain)["scores.csv"] != _files(single)["scores.csv"]


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["every rank", "one rank"])
def test_a_bad_input_under_torchrun_prints_its_error_line_once(tiny_cohort: Path, tmp_path: Path, fault: str) -> None:
    """Every rank finds a subject pattern that joins every scan (in the datalist); only rank 1 loads the
    volume with a NaN voxel (the sampler deals volume 1 to rank 1), while rank 0 waits for it."""
    data = tmp_path / "data"
    shutil.copytree(tiny_cohort, data)
    args = ["--dataset_dir", data, "--output_dir", tmp_path / "out", *FAST_ARGS]
    if fault == "every rank":
        args += ["--datalist#subject_pattern", "^(sub)"]
        expected = "6 volume(s) would have no reference"
    else:
        path = data / "images" / "sub-0002.nii.gz"
        img = nib.load(path)
        array = np.asarray(img.dataobj).astype(np.float32)
        array[16, 16, 16] = np.nan
        nib.save(nib.Nifti1Image(array, img.affine), path)
        expected = f"{path} has 1 NaN/Inf voxels"
    proc = run_bundle(*args, config_file=MULTI, nproc=2)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("cs3f: error:")]
    assert len(lines) == 1 and expected in lines[0], proc.stderr[-3000:]
    assert "[rank0]" not in proc.stderr and "[rank1]" not in proc.stderr, proc.stderr[-3000:]


def _registration(out: Path) -> tuple[list[dict], dict]:
    """``registration.csv`` and ``run.json["registration"]`` without their timing fields."""
    with (out / "registration.csv").open(newline="") as f:
        table = [{k: v for k, v in r.items() if k != "cpu_seconds"} for r in csv.DictReader(f)]
    record = json.loads((out / "run.json").read_text())["registration"]
    return table, {n: {k: v for k, v in e.items() if k != "cpu_seconds"} for n, e in record.items()}


@pytest.mark.slow
def test_torchrun_registration_record_lists_every_volume_once(tmp_path: Path) -> None:
    """``--register mni152``: each rank registers its own share; the files list the whole cohort."""
    pytest.importorskip("SimpleITK")
    registered = generate_cohort(tmp_path / "registered", n_normal=3, n_abnormal=1, shape=48, seed=1)
    native = move_cohort(
        registered, tmp_path / "native", seed=1, spacing=(3.0, 3.0, 4.0), generator={"seed": 1, "shape": 48}
    )
    single, multi = tmp_path / "single", tmp_path / "multi"
    args = ("--dataset_dir", native, "--register", "mni152", *FAST_ARGS)
    assert_success(run_bundle(*args, "--output_dir", single))
    assert_success(run_bundle(*args, "--output_dir", multi, config_file=MULTI, nproc=2))
    table, record = _registration(multi)
    with (native / "cohort.csv").open(newline="") as f:
        names = [Path(r["image"]).name.replace(".nii.gz", "") for r in csv.DictReader(f)]
    assert [r["image"] for r in table] == names and sorted(record) == sorted(names)
    assert not any(e["cached"] for e in record.values())
    assert (table, record) == _registration(single)
    assert _files(multi) == _files(single)
