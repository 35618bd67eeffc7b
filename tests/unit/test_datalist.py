"""Datalists: layouts, the Datalist object with its skips, and demo generation kept out of `datalist`."""

from __future__ import annotations

import csv
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.bundle import ConfigParser
from scripts.engine.datalist import Datalist, make_datalist
from scripts.errors import CS3FInputError, find_input_error

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "inference.json"


def _cohort_rows(cohort: Path) -> list[dict[str, str]]:
    with open(cohort / "cohort.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_datalist_of_a_cohort_csv(tiny_cohort: Path) -> None:
    datalist = make_datalist(tiny_cohort, labels=True)
    rows = _cohort_rows(tiny_cohort)
    assert isinstance(datalist, Datalist) and isinstance(datalist, Sequence)
    assert len(datalist) == len(rows) == 6 and datalist.skipped == []
    assert list(datalist) == datalist.rows and datalist[0] is datalist.rows[0]
    for row, rec in zip(datalist, rows, strict=True):
        assert row["image"] == str(tiny_cohort / rec["image"])
        assert row["mask"] == str(tiny_cohort / rec["mask"]) and row["label"] == str(tiny_cohort / rec["label"])
        assert row["name"] == Path(rec["image"]).name.removesuffix(".nii.gz")
    assert "mask" not in make_datalist(tiny_cohort, masks=False)[0]


def test_datalist_of_folders_and_of_a_flat_folder(tiny_cohort: Path, tmp_path: Path) -> None:
    folders = tmp_path / "folders"
    shutil.copytree(tiny_cohort / "images", folders / "images")
    shutil.copytree(tiny_cohort / "masks", folders / "masks")
    datalist = make_datalist(folders)
    assert [r["name"] for r in datalist] == [f"sub-000{i}" for i in range(1, 7)]
    assert all(Path(r["mask"]).parent == folders / "masks" for r in datalist)
    flat = make_datalist(folders / "images")
    assert [r["name"] for r in flat] == [r["name"] for r in datalist] and "mask" not in flat[0]


def _break(cohort: Path, tmp_path: Path) -> Path:
    """A copy of the cohort with sub-0002's image header destroyed and sub-0005 moved to another space."""
    data = tmp_path / "data"
    shutil.copytree(cohort, data)
    (data / "images" / "sub-0002.nii.gz").write_bytes(b"not a nifti file")
    for sub in ("images", "masks"):
        path = data / sub / "sub-0005.nii.gz"
        img = nib.load(path)
        shifted = img.affine.copy()
        shifted[:3, 3] += 5.0
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj), shifted, img.header), path)
    return data


def test_bad_volumes_stop_the_run_or_are_skipped_and_listed(tiny_cohort: Path, tmp_path: Path) -> None:
    data = _break(tiny_cohort, tmp_path)
    with pytest.raises(CS3FInputError, match=r"cannot read image .*sub-0002\.nii\.gz"):
        make_datalist(data)
    with pytest.warns(UserWarning, match="skipping") as caught:
        datalist = make_datalist(data, on_bad_input="skip")
    assert len(caught) == 2
    assert [r["name"] for r in datalist] == ["sub-0001", "sub-0003", "sub-0004", "sub-0006"]
    assert [Path(s["image"]).name for s in datalist.skipped] == ["sub-0002.nii.gz", "sub-0005.nii.gz"]
    assert "cannot read image" in datalist.skipped[0]["reason"]
    assert "not on the cohort's grid" in datalist.skipped[1]["reason"]
    assert "4 of 5 volumes" in datalist.skipped[1]["reason"]
    # without the grid requirement the moved volume is kept (the preprocessing would resample it)
    with pytest.warns(UserWarning):
        loose = make_datalist(data, on_bad_input="skip", require_same_grid=False)
    assert "sub-0005" in [r["name"] for r in loose] and len(loose.skipped) == 1


def test_each_datalist_has_its_own_skips(tiny_cohort: Path, tmp_path: Path) -> None:
    data = _break(tiny_cohort, tmp_path)
    with pytest.warns(UserWarning):
        first = make_datalist(data, on_bad_input="skip")
    clean = make_datalist(tiny_cohort)
    assert clean.skipped == [] and len(first.skipped) == 2  # nothing shared between calls


def test_too_few_volumes_and_bad_options(tiny_cohort: Path, tmp_path: Path) -> None:
    with pytest.raises(CS3FInputError, match="found 6 usable volume"):
        make_datalist(tiny_cohort, min_volumes=7)
    with pytest.raises(CS3FInputError, match="on_bad_input must be one of"):
        make_datalist(tiny_cohort, on_bad_input="ignore")
    with pytest.raises(CS3FInputError, match="dataset_dir does not exist"):
        make_datalist(tmp_path / "nope")


def _parser(tmp_path: Path, config: Sequence[Path] = (CONFIG,), **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(c) for c in config])
    parser.update({"bundle_root": str(tmp_path), **overrides})
    return parser


def test_resolving_the_datalist_generates_nothing(tmp_path: Path) -> None:
    """The default dataset_dir is the demo folder: resolving `datalist` reports it missing and writes
    nothing; generating the demo is the job of `initialize`."""
    parser = _parser(tmp_path)
    with pytest.raises(Exception) as info:
        parser.get_parsed_content("datalist")
    assert "dataset_dir does not exist" in str(find_input_error(info.value))
    assert list(tmp_path.iterdir()) == []
    initialize = parser.get("initialize")
    assert "$@generate_demo()" in initialize
    assert initialize.index("$@generate_demo()") > initialize.index("$check_overrides()")


def test_lung_config_generates_its_own_demo(tmp_path: Path) -> None:
    from scripts.engine.datalist import ensure_lung_demo

    parser = _parser(tmp_path, (CONFIG, ROOT / "configs" / "lung_ct.json"))
    generate = parser.get_parsed_content("generate_demo")
    assert generate.func is ensure_lung_demo
    assert generate.keywords["demo_dir"] == generate.keywords["dataset_dir"] == f"{tmp_path}/demo_data_lung"


def test_evaluator_gets_the_datalist_skips(tiny_cohort: Path, tmp_path: Path) -> None:
    data = _break(tiny_cohort, tmp_path)
    parser = _parser(tmp_path, dataset_dir=str(data), **{"datalist#on_bad_input": "skip"})
    with pytest.warns(UserWarning):
        datalist = parser.get_parsed_content("datalist")
    assert parser.get_parsed_content("dataset").data is datalist
    assert parser.get_parsed_content("evaluator").cohort.skipped == datalist.skipped


def _write_csv(path: Path, rows: list[dict[str, str]], encoding: str = "utf-8") -> None:
    with path.open("w", newline="", encoding=encoding) as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_a_cohort_csv_saved_by_excel_with_a_byte_order_mark(tiny_cohort: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_cohort, data)
    _write_csv(data / "cohort.csv", _cohort_rows(tiny_cohort), encoding="utf-8-sig")
    assert (data / "cohort.csv").read_bytes().startswith(b"\xef\xbb\xbfimage,")
    got = make_datalist(data, labels=True)
    plain = make_datalist(tiny_cohort, labels=True)
    assert [{k: v.replace(str(data), "D") for k, v in r.items()} for r in got] == [
        {k: v.replace(str(tiny_cohort), "D") for k, v in r.items()} for r in plain
    ]


@pytest.mark.parametrize("fault", ["empty image", "missing image", "missing mask", "duplicate"])
def test_cohort_csv_errors_name_the_file_and_line(tiny_cohort: Path, tmp_path: Path, fault: str) -> None:
    """The line is the file's line number (the header is line 1): data row ``i`` (0-based) is line ``i + 2``."""
    data = tmp_path / "data"
    shutil.copytree(tiny_cohort, data)
    rows = _cohort_rows(tiny_cohort)
    bad = 3
    if fault == "empty image":
        rows[bad]["image"] = ""
    elif fault == "missing image":
        rows[bad]["image"] = "images/absent.nii.gz"
    elif fault == "missing mask":
        rows[bad]["mask"] = ""
    else:
        rows[bad]["image"] = rows[1]["image"].replace("images/", "./images/")  # another spelling, one name
    _write_csv(data / "cohort.csv", rows)
    with pytest.raises(CS3FInputError) as info:
        make_datalist(data)
    assert re.search(rf"{re.escape(str(data / 'cohort.csv'))} lines? (\d, )?{bad + 2}\)", str(info.value))
    assert str(data) + "," not in str(info.value) and not str(info.value).endswith(f"({data})")


def test_a_volume_with_one_voxel_along_an_axis_is_named(tiny_cohort: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_cohort, data)
    for sub in ("images", "masks"):
        path = data / sub / "sub-0003.nii.gz"
        img = nib.load(path)
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:, :, 16:17], img.affine), path)
    with pytest.raises(CS3FInputError, match=r"image .*sub-0003\.nii\.gz has shape \(32, 32, 1\)"):
        make_datalist(data, require_same_grid=False)
    with pytest.warns(UserWarning, match="sub-0003"):
        assert "sub-0003" not in [r["name"] for r in make_datalist(data, on_bad_input="skip")]


@pytest.mark.parametrize(
    ("subjects", "references", "lonely"),
    [
        (["s"] * 6, "all", [0, 1, 2, 3, 4, 5]),  # every scan one subject
        (["s"] * 6, "random:2", [0, 1, 2, 3, 4, 5]),
        (["a", "a", "a", "b", "c", "d"], "chunks:3", [0, 1, 2]),  # the first chunk holds subject a only
        (["a", "a", "b", "b", "c", "c"], "chunks:3", []),
        (["s"] * 6, "bank:somewhere", []),  # checked against the bank's own subjects when it is read
    ],
)
def test_subjects_without_a_reference_stop_before_encoding(
    tiny_cohort: Path, tmp_path: Path, subjects: list[str], references: str, lonely: list[int]
) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_cohort, data)
    rows = [{**r, "subject": s} for r, s in zip(_cohort_rows(tiny_cohort), subjects, strict=True)]
    _write_csv(data / "cohort.csv", rows)
    if not lonely:
        assert len(make_datalist(data, references=references)) == 6
        return
    with pytest.raises(CS3FInputError, match=f"^{len(lonely)} volume.*have no reference") as info:
        make_datalist(data, references=references)
    named = [str(data / rows[i]["image"]) for i in lonely]
    assert all(path in str(info.value) for path in named[:3])
    assert all(str(data / r["image"]) not in str(info.value) for i, r in enumerate(rows) if i not in lonely)
    assert len(make_datalist(data, references=None)) == 6  # a bank build scores nothing


def test_a_subject_pattern_joining_every_scan_is_named(tiny_cohort: Path) -> None:
    with pytest.raises(CS3FInputError, match=r"subject_pattern '\^\(sub\)'.*images/sub-0001\.nii\.gz"):
        make_datalist(tiny_cohort, subject_pattern="^(sub)")
