"""``python -m scripts synth`` as a user runs it, in a subprocess: the written layout, ``--help``, and an
existing output folder as one error line (the option parsing in-process: tests/unit/test_synthetic.py)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _read_cohort(path: Path):
    with open(path / "cohort.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_cli_writes_documented_layout(tmp_path):
    out, png = tmp_path / "cli_cohort", tmp_path / "preview.png"
    cmd = [
        sys.executable,
        "-m",
        "scripts",
        "synth",
        "--out",
        str(out),
        "--n_normal",
        "2",
        "--n_abnormal",
        "2",
        "--shape",
        "32",
        "--quiet",
        "--preview",
        str(png),
    ]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    for sub in ("images", "labels", "masks"):
        assert sorted(p.name for p in (out / sub).iterdir()) == [f"sub-000{i}.nii.gz" for i in range(1, 5)]
    rows = _read_cohort(out)
    assert len(rows) == 4 and sum(r["abnormal"] == "1" for r in rows) == 2
    assert all((out / r[k]).is_file() for r in rows for k in ("image", "label", "mask"))
    assert "mean pairwise brain-mask Dice" in res.stdout and "lesions:" in res.stdout
    assert png.is_file() and png.stat().st_size > 1000
    # no temporary folder is left beside the cohort
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli_cohort", "preview.png"]


def _synth(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env_path = {"PYTHONPATH": str(ROOT)}  # the bundle is run from its root; cwd may be elsewhere
    return subprocess.run(
        [sys.executable, "-m", "scripts", "synth", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env_path},
    )


def test_cli_help_prints_usage_and_generates_nothing(tmp_path):
    res = _synth("--help", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: python -m scripts synth")
    for option in ("--out", "--n_normal", "--n_abnormal", "--shape", "--contrast", "--seed", "--organ", "--overwrite"):
        assert option in res.stdout
    assert "Traceback" not in res.stderr
    assert list(tmp_path.iterdir()) == []  # --help never runs the generator


def test_cli_existing_output_is_one_error_line(tmp_path):
    (tmp_path / "demo_data").mkdir()
    (tmp_path / "demo_data" / "keep.txt").write_text("mine")
    res = _synth(cwd=tmp_path)  # the default --out, demo_data, exists
    assert res.returncode in (1, 2)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cs3f: error: "), res.stderr
    assert "demo_data exists" in lines[0] and "--overwrite" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo_data"]  # untouched, no temporary folder
    assert [p.name for p in (tmp_path / "demo_data").iterdir()] == ["keep.txt"]
