"""``python -m scripts.benchmarks gpu``: the GPU benchmark's code path, run on the CPU at toy sizes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scripts.benchmarks import gpu

ROOT = Path(__file__).resolve().parents[2]


def test_the_random_encoder_has_dinov2_large_shapes() -> None:
    """The stand-in of DINOv2-L/14 has its parameter count (304M: same layers, widths, FLOPs)."""
    from transformers import Dinov2Config, Dinov2Model

    with torch.device("meta"):
        model = Dinov2Model(Dinov2Config(**gpu.DINOV2_LARGE))
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(304.4e6, rel=2e-3)
    assert len(model.encoder.layer) == 24 and model.config.patch_size == 14


@pytest.mark.slow
def test_gpu_command_runs_on_the_cpu_at_toy_sizes(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "scripts.benchmarks", "gpu", "--tiny", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert [r["variant"] for r in result["runs"]] == ["C", "MS"]
    for run in result["runs"]:
        assert "error" not in run, run
        assert run["B"] == 4 and run["s_per_volume"] > 0
        assert set(run["stages_s_per_volume"]) == {"load", "tokenize", "score", "write"}
        assert run["peak_gpu_gb"] is None and run["gpu_util_mean"] is None  # no GPU here
    assert "precision" not in result  # one (fp32) distance pass: nothing to compare
    table = (tmp_path / "gpu.md").read_text()
    assert "| C | 4 |" in table and "| MS | 4 |" in table and "3.2" in table and "8.4" in table
    # A gpu.json returned from a GPU machine renders into a document's GPU block.
    doc = tmp_path / "doc.md"
    assert gpu.main(render_json=str(tmp_path / "gpu.json"), doc=str(doc)) == 0
    assert gpu.BEGIN in doc.read_text() and "| MS | 4 |" in doc.read_text()
    # Volume 3 is subject 0 shifted, rescaled and noisy: no two volumes are identical.
    images = [nib.load(p).get_fdata() for p in sorted((tmp_path / "cohort_4_28" / "images").glob("*.nii"))]
    assert len(images) == 4 and not np.array_equal(images[0], images[3])


def test_gpu_command_refuses_a_machine_without_cuda(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="--tiny"):
        gpu.bench_gpu(out=str(tmp_path))


def test_write_block_replaces_only_its_block(tmp_path: Path) -> None:
    doc = tmp_path / "performance.md"
    doc.write_text("# Performance\n\nhand-written\n")
    gpu.write_block(doc, "first")
    gpu.write_block(doc, "second")
    text = doc.read_text()
    assert text.startswith("# Performance\n\nhand-written\n") and "second" in text and "first" not in text
    assert text.count(gpu.BEGIN) == 1
