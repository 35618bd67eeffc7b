"""torchrun (gloo, 2 processes on the CPU) gives the same outputs as the single-process run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--image_size", "32", "--q", "[8,8,8]", "--quiet", "true"]


def _files(out: Path) -> dict[str, bytes]:
    names = sorted(p.name for p in out.glob("*_anomaly.nii.gz")) + ["scores.csv"]
    return {n: (out / n).read_bytes() for n in names}


def test_torchrun_two_processes_equals_single_process(tiny_cohort: Path, tmp_path: Path) -> None:
    single = tmp_path / "single"
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        str(ROOT / "configs" / "inference.json"),
    ]
    proc = subprocess.run(
        [*cmd, "--dataset_dir", str(tiny_cohort), "--output_dir", str(single), *FAST],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    multi = tmp_path / "multi"
    configs = "['configs/inference.json','configs/multi_gpu_inference.json']"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*torchrun, "-m", "monai.bundle", "run", "--config_file", configs]
        + ["--dataset_dir", str(tiny_cohort), "--output_dir", str(multi), *FAST],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _files(multi) == _files(single)
    run = json.loads((multi / "run.json").read_text())
    assert run["world_size"] == 2 and run["n_volumes"] == 6 and run["encoded_volumes"] == 6
