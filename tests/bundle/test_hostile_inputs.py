"""What a hostile-but-fair user tries: repeated scans, options spelled as on the command line, masks on
another affine, odd names, blank images, bad parameters, a changed cohort in an old output folder."""

from __future__ import annotations

import csv
import json
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scripts.engine.grid import grid_difference
from scripts.errors import find_input_error
from tests.helpers import run_workflow


def _rows(cohort: Path) -> list[dict]:
    with (cohort / "cohort.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def _write_rows(cohort: Path, rows: list[dict]) -> None:
    with (cohort / "cohort.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _scores(out: Path) -> dict[str, float]:
    with (out / "scores.csv").open(newline="") as f:
        return {r["image"]: float(r["score"]) for r in csv.DictReader(f)}


def _with_copy(cohort: Path, tmp_path: Path, shift: int = 0, subject_column: bool = False) -> tuple[Path, str]:
    """The cohort plus a copy of its first lesion volume (rolled by ``shift`` voxels) as ``copy-0001``."""
    data = tmp_path / "data"
    shutil.copytree(cohort, data)
    rows = _rows(data)
    lesion = next(r for r in rows if r["abnormal"] == "1")
    copy = dict(lesion)
    for key in ("image", "mask", "label"):
        source = data / lesion[key]
        target = source.with_name("copy-0001.nii.gz")
        img = nib.load(source)
        array = np.roll(np.asarray(img.dataobj), shift, axis=0)
        nib.save(nib.Nifti1Image(array, img.affine, img.header), target)
        copy[key] = str(target.relative_to(data))
    rows.append(copy)
    if subject_column:
        for r in rows:
            r["subject"] = Path(r["image"]).name.split(".")[0]
        copy["subject"] = Path(lesion["image"]).name.split(".")[0]
    _write_rows(data, rows)
    return data, Path(lesion["image"]).name.split(".")[0]


def _normals(cohort: Path) -> list[str]:
    return [Path(r["image"]).name.split(".")[0] for r in _rows(cohort) if r["abnormal"] == "0"]


# The copied scan's lesion is one voxel: what lifts it above the normal scans is its whole map's level,
# which the robust-z subject score would discount. These tests are about who is compared with whom, so
# they pin the paper's subject score, the map's maximum (the default).
PAPER_SCORE = {"subject_score": "max"}


def test_an_exact_copy_keeps_its_lesion_and_is_named(tiny_cohort: Path, tmp_path: Path) -> None:
    data, lesion = _with_copy(tiny_cohort, tmp_path)
    with pytest.warns(UserWarning, match=rf"identical volumes \['copy-0001', '{lesion}'\]"):
        # CS3F-C: on these 32^3 volumes its 8-voxel tokens are the ones that separate the lesion
        run_workflow(
            dataset_dir=str(data), output_dir=str(tmp_path / "out"), rho=0.5, variant="C", smooth_mm=0.0, **PAPER_SCORE
        )
    scores = _scores(tmp_path / "out")
    top_normal = max(scores[n] for n in _normals(tiny_cohort))
    assert scores[lesion] > top_normal and scores["copy-0001"] > top_normal
    assert scores[lesion] == pytest.approx(scores["copy-0001"])


@pytest.mark.parametrize("references", ["all", "random:4"])
def test_a_subject_column_keeps_two_scans_of_one_subject_apart(
    tiny_cohort: Path, tmp_path: Path, references: str
) -> None:
    """A shifted copy is not identical: only the subject column says it is the same subject."""
    data, lesion = _with_copy(tiny_cohort, tmp_path, shift=1, subject_column=True)
    run_workflow(dataset_dir=str(data), output_dir=str(tmp_path / "out"), rho=0.5, references=references, **PAPER_SCORE)
    scores = _scores(tmp_path / "out")
    top_normal = max(scores[n] for n in _normals(tiny_cohort))
    assert scores[lesion] > top_normal and scores["copy-0001"] > top_normal


def test_a_bank_never_matches_a_scan_with_its_own_subject(tiny_cohort: Path, tmp_path: Path) -> None:
    data, lesion = _with_copy(tiny_cohort, tmp_path, shift=1, subject_column=True)
    bank_rows = [r for r in _rows(data) if not r["image"].endswith("copy-0001.nii.gz")]
    bank_cohort = tmp_path / "bank_cohort"
    shutil.copytree(data, bank_cohort)
    _write_rows(bank_cohort, bank_rows)
    new = tmp_path / "new"
    shutil.copytree(data, new)
    _write_rows(new, [r for r in _rows(data) if r["image"].endswith("copy-0001.nii.gz")])
    configs = ["configs/inference.json", "configs/build_bank.json"]
    run_workflow(configs, dataset_dir=str(bank_cohort), bank_dir=str(tmp_path / "bank"))
    run_workflow(
        dataset_dir=str(new), output_dir=str(tmp_path / "out"), references=f"bank:{tmp_path / 'bank'}", **PAPER_SCORE
    )
    run_workflow(dataset_dir=str(bank_cohort), output_dir=str(tmp_path / "cohort"), **PAPER_SCORE)
    assert _scores(tmp_path / "out")["copy-0001"] > max(_scores(tmp_path / "cohort")[n] for n in _normals(tiny_cohort))


def test_false_spelled_as_on_the_command_line_is_false(tiny_cohort: Path, tmp_path: Path) -> None:
    evaluator = run_workflow(
        dataset_dir=str(tiny_cohort), output_dir=str(tmp_path / "out"), use_masks="false", quiet="TRUE"
    )
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["config"]["use_masks"] is False and evaluator.quiet is True
    grids = evaluator.inferer  # masks off: every token of every volume was valid
    assert grids is not None and run["tokens"]["per_volume"] > 0


def _input_error(**overrides) -> str:
    with pytest.raises(Exception) as info:
        run_workflow(**overrides)
    found = find_input_error(info.value)
    assert found is not None, f"not an input error: {info.value!r}"
    assert "\n" not in str(found)
    return str(found)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"inferer#axes": ["sagittal", "S"]}, "axes must be"),
        ({"q": [4, 4]}, "q must be"),
        ({"q": [0, 4, 4]}, "q must be"),
        ({"use_masks": "flase"}, "use_masks must be true or false"),
        ({"variant": "MS", "inferer#q_fine": None}, "needs q_fine"),
        ({"quiet": "maybe"}, "quiet must be true or false"),
    ],
)
def test_bad_parameters_are_one_line_before_any_work(
    tiny_cohort: Path, tmp_path: Path, overrides: dict, fragment: str
) -> None:
    out = tmp_path / "out"
    assert fragment in _input_error(dataset_dir=str(tiny_cohort), output_dir=str(out), **overrides)
    assert not out.exists()


def test_an_unwritable_token_folder_is_one_line(tiny_cohort: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "tokens"
    blocker.write_text("a file where the cache folder should be")
    line = _input_error(
        dataset_dir=str(tiny_cohort), output_dir=str(tmp_path / "out"), **{"evaluator#cache_dir": str(blocker)}
    )
    assert "cannot be created" in line and str(blocker) in line


def test_a_mask_on_another_affine_is_refused(tiny_cohort: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_cohort, data)
    mask = data / _rows(data)[0]["mask"]
    img = nib.load(mask)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ img.affine
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), lps, img.header), mask)
    line = _input_error(dataset_dir=str(data), output_dir=str(tmp_path / "out"))
    assert "another affine than its image" in line and mask.name in line


def test_a_comma_in_a_name_is_quoted_in_scores_csv(tiny_cohort: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_cohort, data)
    rows = _rows(data)
    for key in ("image", "mask", "label"):
        old = data / rows[0][key]
        new = old.with_name("a,b.nii.gz")
        old.rename(new)
        rows[0][key] = str(new.relative_to(data))
    _write_rows(data, rows)
    run_workflow(dataset_dir=str(data), output_dir=str(tmp_path / "out"))
    with (tmp_path / "out" / "scores.csv").open(newline="") as f:
        table = list(csv.reader(f))
    assert all(len(row) == len(table[0]) for row in table) and table[1][0] == "a,b"


def test_a_blank_image_stops_the_run_or_is_skipped(tiny_cohort: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_cohort, data)
    image = data / _rows(data)[1]["image"]
    img = nib.load(image)
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.float32), img.affine), image)
    line = _input_error(dataset_dir=str(data), output_dir=str(tmp_path / "out"))
    assert "is constant" in line and image.name in line
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_workflow(dataset_dir=str(data), output_dir=str(tmp_path / "skip"), **{"datalist#on_bad_input": "skip"})
    assert any("is constant" in str(w.message) for w in caught)
    run = json.loads((tmp_path / "skip" / "run.json").read_text())
    assert len(run["skipped"]) == 1 and image.stem.split(".")[0] not in _scores(tmp_path / "skip")


def test_grid_messages_say_what_differs() -> None:
    first = ((24, 24, 24), torch.eye(4, dtype=torch.float64))
    moved = torch.eye(4, dtype=torch.float64)
    moved[:3, 3] = torch.tensor([0.0, 5.0, 0.0])
    moved[0, 0] = 2.0
    diff = grid_difference(((24, 24, 24), moved), first, 1e-3)
    assert diff == ["spacing [2.0, 1.0, 1.0] vs [1.0, 1.0, 1.0] mm", "origin [0.0, 5.0, 0.0] vs [0.0, 0.0, 0.0] mm"]
    assert grid_difference(((24, 24, 20), first[1]), first, 1e-3) == ["shape (24, 24, 20) vs (24, 24, 24)"]
    assert grid_difference(first, first, 1e-3) == []


def test_a_rerun_without_a_volume_removes_its_old_map_and_temp_files(tiny_cohort: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_cohort, data)
    out = tmp_path / "out"
    run_workflow(dataset_dir=str(data), output_dir=str(out))
    rows = _rows(data)
    gone = Path(rows[0]["image"]).name.split(".")[0]
    _write_rows(data, rows[1:])
    (out / ".left-over.tmp-1234abcd.nii.gz").write_bytes(b"partial")
    (out / "notes.txt").write_text("the user's own file")
    run_workflow(dataset_dir=str(data), output_dir=str(out))
    assert not (out / f"{gone}_anomaly.nii.gz").exists() and gone not in _scores(out)
    assert len(list(out.glob("*_anomaly.nii.gz"))) == len(rows) - 1
    assert not list(out.glob(".*.tmp-*")) and (out / "notes.txt").is_file()
