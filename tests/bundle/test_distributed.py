"""torchrun (gloo, 2 processes on the CPU) gives the same outputs as the single-process run."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers import FAST_ARGS, assert_success, run_bundle


def _files(out: Path) -> dict[str, bytes]:
    names = sorted(p.name for p in out.glob("*_anomaly.nii.gz")) + ["scores.csv"]
    return {n: (out / n).read_bytes() for n in names}


def test_torchrun_two_processes_equals_single_process(tiny_cohort: Path, tmp_path: Path) -> None:
    single, multi = tmp_path / "single", tmp_path / "multi"
    assert_success(run_bundle("--dataset_dir", tiny_cohort, "--output_dir", single, *FAST_ARGS))
    configs = ["configs/inference.json", "configs/multi_gpu_inference.json"]
    proc = run_bundle(
        "--dataset_dir", tiny_cohort, "--output_dir", multi, *FAST_ARGS, config_file=configs, nproc=2
    )
    assert_success(proc)
    assert len(_files(single)) == 7 and _files(multi) == _files(single)
    run = json.loads((multi / "run.json").read_text())
    assert run["world_size"] == 2 and run["n_volumes"] == 6 and run["encoded_volumes"] == 6
