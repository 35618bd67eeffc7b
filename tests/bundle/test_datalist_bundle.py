"""The bundle's `initialize` (a ConfigWorkflow) generates the demo cohort on first use only; a cohort whose
subjects leave a volume without references stops before any encoding."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from monai.bundle import ConfigParser
from tests.helpers import FAST_ARGS, assert_one_error_line, run_bundle

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "inference.json"


def _cohort_rows(cohort: Path) -> list[dict[str, str]]:
    with open(cohort / "cohort.csv", newline="") as f:
        return list(csv.DictReader(f))


def _parser(tmp_path: Path, config: Sequence[Path] = (CONFIG,), **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(c) for c in config])
    parser.update({"bundle_root": str(tmp_path), **overrides})
    return parser


def test_initialize_generates_the_demo_on_first_use_only(tmp_path: Path) -> None:
    from monai.bundle import ConfigWorkflow
    from scripts.engine.datalist import ensure_demo

    overrides = {"generate_demo#n_normal": 2, "generate_demo#n_abnormal": 1, "generate_demo#shape": 32}
    assert _parser(tmp_path, **overrides).get_parsed_content("generate_demo").func is ensure_demo
    workflow = ConfigWorkflow(
        config_file=str(CONFIG), workflow_type="infer", bundle_root=str(tmp_path), quiet=True, **overrides
    )
    workflow.initialize()
    demo = tmp_path / "demo_data"
    assert len(_cohort_rows(demo)) == 3
    before = {p: p.stat().st_mtime_ns for p in demo.rglob("*")}
    _parser(tmp_path, **overrides).get_parsed_content("generate_demo")()
    assert {p: p.stat().st_mtime_ns for p in demo.rglob("*")} == before  # not generated again
    assert len(_parser(tmp_path).get_parsed_content("datalist")) == 3
    # a user's dataset_dir is never replaced by demo data
    other = _parser(tmp_path, dataset_dir=str(tmp_path / "mine"), **overrides)
    other.get_parsed_content("generate_demo")()
    assert not (tmp_path / "mine").exists()


def test_one_subject_for_every_scan_stops_before_the_tokenize_stage(tiny_cohort: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    pattern = ["--datalist#subject_pattern", "^(sub)"]
    proc = run_bundle("--dataset_dir", tiny_cohort, "--output_dir", out, *pattern, *FAST_ARGS)
    line = assert_one_error_line(proc)
    assert "6 volume(s) would have no reference" in line and str(tiny_cohort / "images" / "sub-0001.nii.gz") in line
    assert not (out / "tokens").exists() and not out.exists()  # nothing encoded, nothing written
