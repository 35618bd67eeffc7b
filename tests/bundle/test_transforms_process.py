"""The random projection matrix is the same in a fresh process (what a resumed or distributed run relies on)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from scripts.transforms import projection_matrix

ROOT = Path(__file__).resolve().parents[2]


def test_projection_statistics_and_determinism(tmp_path: Path) -> None:
    a = projection_matrix(512, 128, seed=3, name="axial/0")
    torch.testing.assert_close(a, projection_matrix(512, 128, seed=3, name="axial/0"), atol=0, rtol=0)
    assert not torch.equal(a, projection_matrix(512, 128, seed=4, name="axial/0"))
    assert not torch.equal(a, projection_matrix(512, 128, seed=3, name="axial/1"))
    assert abs(float(a.var()) - 1 / 128) < 0.05 / 128 * 10  # entries N(0, 1/d)
    assert abs(float(a.mean())) < 1e-3
    # The same matrix in a fresh process (what a resumed or distributed run relies on).
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r});"
        "from scripts.transforms import projection_matrix;"
        "import torch; torch.save(projection_matrix(512, 128, seed=3, name='axial/0'), sys.argv[1])"
    )
    path = tmp_path / "proj.pt"
    subprocess.run([sys.executable, "-c", code, str(path)], check=True)
    assert torch.equal(torch.load(path), a)
