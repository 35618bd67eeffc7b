"""The MONAI bundle: ConfigWorkflow life cycle, the user-facing command, outputs, one-line errors,
metadata and configuration."""

from __future__ import annotations

import csv
import gzip
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.bundle.reference_resolver import ReferenceResolver
from tests.helpers import (
    FAST,
    FAST_ARGS,
    ROOT,
    assert_one_error_line,
    assert_success,
    robust_z_peak,
    run_bundle,
    run_workflow,
)

CONFIG = str(ROOT / "configs" / "inference.json")
META = ROOT / "configs" / "metadata.json"


def _check_outputs(cohort: Path, out: Path, statistic: str = "max") -> list[dict]:
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
        name = Path(row["image"]).name.removesuffix(".nii.gz")
        score = float(next(s["score"] for s in scores if s["image"] == name))
        want = robust_z_peak(data, mask) if statistic == "robust_z" else data.max()
        assert score == pytest.approx(want, rel=2e-5), name
    run = json.loads((out / "run.json").read_text())
    for key in ("inferer", "encoder", "timings_s", "peak_rss_mb", "tokens", "versions", "config"):
        assert key in run
    assert set(run["timings_s"]) == {"load", "tokenize", "score", "write"}
    assert run["n_volumes"] == len(rows)
    return scores


def _check_declared_output_format(cohort: Path, out: Path) -> None:
    """The maps are what metadata.json's network_data_format says the bundle outputs after
    post-processing: one float32 channel on the input's grid, scores >= 0 (no fixed upper bound)."""
    pred = json.loads(META.read_text())["network_data_format"]["post_processed_outputs"]["pred"]
    assert pred["value_range"] == [] and ">= 0" in json.loads(META.read_text())["pred_classes"]
    for image in sorted((cohort / "images").glob("*.nii.gz")):
        amap = nib.load(out / image.name.replace(".nii.gz", "_anomaly.nii.gz"))
        assert amap.get_data_dtype() == np.dtype(pred["dtype"])
        data = np.asarray(amap.dataobj)
        # one channel: a map on the input's 3D grid, no channel axis
        assert pred["num_channels"] == 1 and data.shape == nib.load(image).shape
        assert 0 <= data.min() and np.isfinite(data).all(), (image.name, data.min(), data.max())


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
    _check_declared_output_format(tiny_cohort, out)
    # The token bank is released once scored (pass 2 needs only the token scores) ...
    assert evaluator.cohort.bank == {"": {}} and evaluator.cohort.buffers == {}
    assert len(evaluator.scoring.token_scores[""]) == 6
    assert json.loads((out / "run.json").read_text())["tokens"]["bank_mb"] > 0


def test_bank_is_held_as_rows_of_one_buffer(tiny_cohort: Path, tmp_path: Path) -> None:
    """... and, kept, it is one [B, ...] tensor per grid: no per-volume tensors, no stacked copy."""
    evaluator = run_workflow(
        dataset_dir=str(tiny_cohort), output_dir=str(tmp_path / "out"), **{"evaluator#keep_tokens": True}
    )
    volumes = [evaluator.cohort.bank[""][n] for n in evaluator.cohort.names]
    assert len(volumes) == 6
    for key in volumes[0].grids:
        rows = [v.grids[key].tokens for v in volumes]
        base = rows[0]._base
        assert base is not None and base.shape[0] == 6 and all(r._base is base for r in rows), key


@pytest.mark.slow
def test_bundle_command_with_overrides(tiny_cohort: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    overrides = [
        "--image_size",
        "32",
        "--q",
        "[8,8,8]",
        "--rho",
        "0.2",
        "--subject_score",
        "robust_z",
        "--depth_phases",
        "2",
    ]
    proc = run_bundle("--dataset_dir", tiny_cohort, "--output_dir", out, *overrides)  # not quiet: the user's view
    assert_success(proc)
    assert "scores.csv" in proc.stdout and str(out) in proc.stdout  # tells the user where things are
    _check_outputs(tiny_cohort, out, statistic="robust_z")
    inferer = json.loads((out / "run.json").read_text())["inferer"]
    assert inferer["rho"] == 0.2 and inferer["subject_score"] == "robust_z"
    assert inferer["depth_phases"] == 2


def _run_expect_error(dataset_dir: Path, out: Path) -> str:
    proc = run_bundle("--dataset_dir", dataset_dir, "--output_dir", out, *FAST_ARGS)
    line = assert_one_error_line(proc)
    # Nothing partial: no maps, scores or run record (the token cache of volumes already encoded is
    # kept on purpose, so that a re-run after fixing the input loses no work).
    written = [p.name for p in out.glob("*")] if out.exists() else []
    assert set(written) <= {"tokens"}, written
    return line


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


# ----------------------------------------------------------------------------- metadata
# MONAI's `verify_metadata` downloads the schema named in metadata.json, which these machines cannot
# do (docs/README.md). What follows is the part of meta_schema_20240725.json that the bundle must meet
# (its required keys and their types, and the required keys of each input/output tensor), written
# into a local file so that MONAI's own verifier runs offline.
_TENSOR = {
    "type": "object",
    "required": ["type", "format", "num_channels", "spatial_shape", "dtype", "value_range"],
    "properties": {
        "type": {"type": "string"},
        "format": {"type": "string"},
        "num_channels": {"type": "integer"},
        "spatial_shape": {"type": "array"},
        "dtype": {"type": "string"},
        "value_range": {"type": "array"},
        "is_patch_data": {"type": "boolean"},
        "channel_def": {"type": "object"},
    },
}
SCHEMA = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "type": "object",
    "required": [
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
    ],
    "properties": {
        "schema": {"type": "string"},
        "version": {"type": "string"},
        "changelog": {"type": "object"},
        "monai_version": {"type": "string"},
        "pytorch_version": {"type": "string"},
        "numpy_version": {"type": "string"},
        "required_packages_version": {"type": "object"},
        "task": {"type": "string"},
        "description": {"type": "string"},
        "authors": {"type": "string"},
        "copyright": {"type": "string"},
        "network_data_format": {
            "type": "object",
            "required": ["inputs", "outputs"],
            "properties": {
                "inputs": {"type": "object", "additionalProperties": _TENSOR},
                "outputs": {"type": "object", "additionalProperties": _TENSOR},
            },
        },
    },
}


@pytest.mark.filterwarnings("ignore:No hash value provided")
def test_metadata_passes_monai_verify_metadata_offline(tmp_path: Path) -> None:
    from monai.bundle import verify_metadata

    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    verify_metadata(meta_file=str(META), filepath=str(schema))
    # the verifier does fail on a metadata file without a required key
    meta = json.loads(META.read_text())
    del meta["network_data_format"]["outputs"]["pred"]["dtype"]
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="dtype"):
        verify_metadata(meta_file=str(broken), filepath=str(schema))
    meta = json.loads(META.read_text())
    assert meta["changelog"][meta["version"]]  # the current version has a changelog entry


# ----------------------------------------------------------------------------- configuration
CONFIG_SETS = [
    ["inference.json"],
    ["inference.json", "build_bank.json"],
    ["inference.json", "multiscale.json"],
    ["inference.json", "evaluate.json"],
    ["inference.json", "lung_ct.json"],
    ["inference.json", "multi_gpu_inference.json"],
]


@pytest.mark.parametrize("files", CONFIG_SETS, ids=["+".join(f) for f in CONFIG_SETS])
def test_every_reference_in_the_configs_resolves(files: list[str]) -> None:
    """Each ``@id`` the documented config combinations use names an entry of the merged config."""
    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / f) for f in files])
    refs: set[str] = set()

    def walk(value) -> None:  # noqa: ANN001
        if isinstance(value, str):
            refs.update(ReferenceResolver.match_refs_pattern(value))
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    walk(parser.get())
    assert len(refs) > 20
    missing = sorted(r for r in refs if r not in parser)
    assert not missing, missing


def test_inference_config_resolves_to_the_documented_defaults(tiny_cohort: Path, tmp_path: Path) -> None:
    """configs/inference.json, resolved as the bundle does, builds the objects docs/README.md's
    parameter table describes (the paper's defaults where the table says so)."""
    parser = ConfigParser()
    parser.read_config(CONFIG)
    parser.update({"bundle_root": str(ROOT), "dataset_dir": str(tiny_cohort), "output_dir": str(tmp_path)})
    inferer = parser.get_parsed_content("inferer")
    assert inferer.axes == ["sagittal", "coronal", "axial"]
    assert inferer.q == {"sagittal": 8, "coronal": 8, "axial": 8}  # the paper's 8 slices on 96-224 volumes
    assert (inferer.rho, inferer.d, inferer.delta, inferer.seed) == (0.1, 128, 0.0, 0)
    assert inferer.variant == "C" and str(inferer.references) == "all"  # chosen in docs/quality.md
    assert (inferer.q_fine, inferer.smooth_mm, inferer.L) == (None, 0.0, 16)  # CS3F-C has no fine tokens
    assert inferer.subject_statistic == "max"  # the paper's subject score (docs/design.md)
    assert inferer.tokenizer.depth_phases == 2  # two pooling phases: docs/quality.md, appendix study 15
    assert (inferer.tokenizer.slab_size, inferer.token_dtype) == (32, torch.float32)
    encoder = parser.get_parsed_content("network_def").encoder
    assert encoder.name == "efficientnet_lite0" and encoder.input_size == 112
    assert tuple(encoder.layers) == ("stage3", "stage5")  # the stride-8 and stride-16 stages
    assert parser.get_parsed_content("use_masks") is True and parser.get_parsed_content("register") == "none"
    assert parser.get("datalist#on_bad_input") == "error" and parser.get("datalist#masks") == "@use_masks"
    assert parser.get_parsed_content("datalist#require_same_grid") is True  # register none: one grid
    assert parser.get_parsed_content("evaluator#cache_dir") == str(tmp_path) + "/tokens"
    # The evaluator is built from those very objects (resolving it builds the datalist and loader).
    evaluator = parser.get_parsed_content("evaluator")
    assert evaluator.inferer is inferer and evaluator.network is parser.get_parsed_content("network_def").encoder
    assert not evaluator.keep_tokens
    assert len(parser.get_parsed_content("datalist")) == 6


@pytest.mark.parametrize(
    "overlays",
    [
        ["multi_gpu_inference.json", "multi_gpu_evaluate.json"],
        ["multi_gpu_evaluate.json", "multi_gpu_inference.json"],
        ["multi_gpu_inference.json", "evaluate.json"],
        ["evaluate.json", "multi_gpu_inference.json"],
        ["evaluate.json"],
    ],
)
def test_evaluation_runs_once_on_rank_0_whatever_the_overlay_order(overlays: list[str]) -> None:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / f) for f in ["inference.json", *overlays]])
    assert parser.get("run") == ["$@evaluator.run()", "$@evaluation"]
    evaluation = parser.get("evaluation")
    assert evaluation.endswith("if scripts.engine.distributed.world()[0] == 0 else None")
    if "multi_gpu_inference.json" in overlays:
        assert any("init_process_group" in step for step in parser.get("initialize"))


def test_a_relative_output_dir_is_written_and_rewritten(
    tiny_cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As the default ``./eval`` is: relative to the working folder, and a rerun replaces the set."""
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        run_workflow(dataset_dir=str(tiny_cohort), output_dir="out")
    written = sorted(p.name for p in (tmp_path / "out").iterdir() if p.is_file())
    assert written == sorted([*(f"sub-{i:04d}_anomaly.nii.gz" for i in range(1, 7)), "run.json", "scores.csv"])
