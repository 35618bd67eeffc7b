"""Coarse-to-fine routing's peak memory in a fresh process (ru_maxrss is per process, so each batch size
gets its own)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

_PEAK_SCRIPT = """
    import resource, sys, torch
    sys.path.insert(0, {root!r})
    from scripts.scoring import c2f_scores
    torch.set_num_threads(1)
    b, n_c, h, d = int(sys.argv[1]), 192, 4, 16
    fine = torch.randn(b, n_c, h, d)
    coarse = fine.mean(dim=2)
    c2f_scores(coarse[:2, :8], fine[:2, :8], L=2)  # warm-up: load kernels before the baseline
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    c2f_scores(coarse, fine, L=16, query_tile=128, block_elements=1 << 18)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) * 1024)
    """
_PEAK_SCRIPT = textwrap.dedent(_PEAK_SCRIPT)


def test_peak_memory_does_not_grow_with_batch() -> None:
    """Routing indices and candidates live per (query tile, reference group): the extra peak memory is
    the same at B = 4 and B = 40 (whole-batch routing indices alone would be B*N_c*B*L*8 B = 39 MiB)."""
    root = str(Path(__file__).resolve().parents[2])
    growth = {}
    for b in (4, 40):
        out = subprocess.run(
            [sys.executable, "-c", _PEAK_SCRIPT.format(root=root), str(b)], check=True, capture_output=True, text=True
        )
        growth[b] = int(out.stdout.strip().splitlines()[-1])
    assert growth[40] <= growth[4] + 8 * 2**20, growth
