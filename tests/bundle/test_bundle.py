"""The MONAI bundle: ConfigWorkflow life cycle, the user-facing command, outputs, one-line errors."""

from __future__ import annotations

import csv
import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.bundle import ConfigWorkflow

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "inference.json")
# Tiny, fast settings: 32^3 volumes, R = 32, q = 8 (the config keys a user would override too).
FAST = {"image_size": 32, "q": [8, 8, 8], "quiet": True}

# Required keys of the MONAI bundle metadata schema (meta_schema_20240725.json) and of its tensor
# definitions; the schema itself is downloaded by `monai.bundle verify_metadata`, impossible here.
SCHEMA_REQUIRED = [
    "schema",
    "version",
    "monai_version",
    "pytorch_version",
    "numpy_version",
    "required_packages_version",
    "task",
    "description",
    "authors",
    "copyright",
    "network_data_format",
]
TENSOR_REQUIRED = ["type", "format", "num_channels", "spatial_shape", "dtype", "value_range"]


def _check_outputs(cohort: Path, out: Path) -> list[dict]:
    with open(cohort / "cohort.csv") as f:
        rows = list(csv.DictReader(f))
    with open(out / "scores.csv") as f:
        scores = list(csv.DictReader(f))
    assert [r["image"] for r in scores] == [Path(r["image"]).name.removesuffix(".nii.gz") for r in rows]
    assert list(scores[0]) == ["image", "score", "score_sagittal", "score_coronal", "score_axial"]
    for row in rows:
        image = nib.load(cohort / row["image"])
        amap = nib.load(out / (Path(row["image"]).name.removesuffix(".nii.gz") + "_anomaly.nii.gz"))
        assert amap.shape == image.shape
        np.testing.assert_allclose(amap.affine, image.affine, atol=1e-5)
        data = amap.get_fdata()
        mask = nib.load(cohort / row["mask"]).get_fdata() > 0
        assert np.all(data[~mask] == 0) and data[mask].max() > 0
    run = json.loads((out / "run.json").read_text())
    for key in ("inferer", "encoder", "timings_s", "peak_rss_mb", "tokens", "versions", "config"):
        assert key in run
    assert set(run["timings_s"]) == {"load", "tokenize", "score", "write"}
    assert run["n_volumes"] == len(rows)
    return scores


def test_config_workflow_life_cycle(tiny_cohort: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    workflow = ConfigWorkflow(
        config_file=CONFIG,
        meta_file=str(ROOT / "configs" / "metadata.json"),
        logging_file=str(ROOT / "configs" / "logging.conf"),
        workflow_type="infer",
        dataset_dir=str(tiny_cohort),
        output_dir=str(out),
        **FAST,
    )
    workflow.initialize()
    assert workflow.check_properties() == []
    workflow.run()
    evaluator = workflow.parser.get_parsed_content("evaluator")
    workflow.finalize()
    scores = _check_outputs(tiny_cohort, out)
    assert len(scores) == 6
    # The token bank is released once scored (pass 2 needs only the token scores) ...
    assert evaluator.bank == {"": {}} and evaluator._buffers == {}
    assert len(evaluator.token_scores[""]) == 6
    assert json.loads((out / "run.json").read_text())["tokens"]["bank_mb"] > 0


def test_bank_is_held_as_rows_of_one_buffer(tiny_cohort: Path, tmp_path: Path) -> None:
    """... and, kept, it is one [B, ...] tensor per grid: no per-volume tensors, no stacked copy."""
    workflow = ConfigWorkflow(
        config_file=CONFIG,
        workflow_type="infer",
        dataset_dir=str(tiny_cohort),
        output_dir=str(tmp_path / "out"),
        keep_tokens=True,
        **FAST,
    )
    workflow.initialize()
    workflow.run()
    evaluator = workflow.parser.get_parsed_content("evaluator")
    workflow.finalize()
    volumes = [evaluator.bank[""][n] for n in evaluator.names]
    assert len(volumes) == 6
    for key in volumes[0].grids:
        rows = [v.grids[key].tokens for v in volumes]
        base = rows[0]._base
        assert base is not None and base.shape[0] == 6 and all(r._base is base for r in rows), key


def test_bundle_command_with_overrides(tiny_cohort: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", CONFIG]
    cmd += ["--dataset_dir", str(tiny_cohort), "--output_dir", str(out)]
    cmd += ["--image_size", "32", "--q", "[8,8,8]", "--rho", "0.2"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "scores.csv" in proc.stdout and str(out) in proc.stdout  # tells the user where things are
    _check_outputs(tiny_cohort, out)
    assert json.loads((out / "run.json").read_text())["inferer"]["rho"] == 0.2


def _run_expect_error(dataset_dir: Path, out: Path) -> str:
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", CONFIG]
    cmd += [
        "--dataset_dir",
        str(dataset_dir),
        "--output_dir",
        str(out),
        "--image_size",
        "32",
        "--q",
        "[8,8,8]",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    # Nothing partial: no maps, scores or run record (the token cache of volumes already encoded is
    # kept on purpose, so that a re-run after fixing the input loses no work).
    written = [p.name for p in out.glob("*")] if out.exists() else []
    assert set(written) <= {"tokens"}, written
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("cs3f: error: ") and "Traceback" not in proc.stderr
    return last


def test_missing_dataset_dir_is_one_clear_line(tmp_path: Path) -> None:
    line = _run_expect_error(tmp_path / "nope", tmp_path / "out")
    assert "dataset_dir does not exist" in line and str(tmp_path / "nope") in line


def test_empty_folder_is_one_clear_line(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    line = _run_expect_error(tmp_path / "empty", tmp_path / "out")
    assert "no NIfTI volumes" in line


def test_corrupt_file_is_one_clear_line(tiny_cohort: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_cohort, data)
    victim = data / "images" / "sub-0003.nii.gz"
    raw = gzip.decompress(victim.read_bytes())
    victim.write_bytes(gzip.compress(raw[: len(raw) // 3]))  # header intact, voxel data truncated
    line = _run_expect_error(data, tmp_path / "out")
    assert "sub-0003.nii.gz" in line


def test_metadata_has_required_keys() -> None:
    meta = json.loads((ROOT / "configs" / "metadata.json").read_text())
    missing = [k for k in SCHEMA_REQUIRED if k not in meta]
    assert not missing
    for section in ("inputs", "outputs"):
        for name, tensor in meta["network_data_format"][section].items():
            assert all(k in tensor for k in TENSOR_REQUIRED), (section, name)
    assert meta["changelog"][meta["version"]]
    import monai
    import numpy
    import torch

    assert meta["monai_version"] == monai.__version__
    assert meta["pytorch_version"] == torch.__version__.split("+")[0]
    assert meta["numpy_version"] == numpy.__version__


def test_inference_config_reads_top_to_bottom() -> None:
    """Sections appear in the order data -> network -> inferer -> postprocessing -> handlers -> run."""
    keys = list(json.loads(Path(CONFIG).read_text()))
    order = [
        "bundle_root",
        "dataset_dir",
        "datalist",
        "preprocessing",
        "dataset",
        "dataloader",
        "network_def",
        "inferer",
        "postprocessing",
        "handlers",
        "evaluator",
        "initialize",
        "run",
    ]
    positions = [keys.index(k) for k in order]
    assert positions == sorted(positions)
    for paper_key in ("axes", "q", "rho", "d", "delta", "image_size", "layers", "encoder_name", "seed"):
        assert paper_key in keys
