"""The exact scorer's peak memory in a fresh process (ru_maxrss is per process, so each batch size gets its own)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

_PEAK_SCRIPT = """
    import resource, sys, torch
    sys.path.insert(0, {root!r})
    from scripts.scoring import mutual_similarity_scores
    torch.set_num_threads(1)
    b, n, d = int(sys.argv[1]), 512, 32
    tokens = torch.randn(b, n, d)
    mutual_similarity_scores(tokens[:2, :8])  # warm-up: load kernels before the baseline
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    mutual_similarity_scores(tokens, query_tile=256, block_elements=1 << 18)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) * 1024)
    """
_PEAK_SCRIPT = textwrap.dedent(_PEAK_SCRIPT)


def test_peak_memory_does_not_grow_with_batch() -> None:
    """Extra peak memory of scoring (beyond the token tensor) is the same at B=4 and B=48.

    A dense B x N x B x N distance tensor would be 4*512*4*512*4 B = 16 MiB at B=4 but 2.3 GiB at
    B=48; the tiled scorer needs ~1 MiB blocks at both sizes.
    """
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[2])
    growth = {}
    for b in (4, 48):
        out = subprocess.run(
            [sys.executable, "-c", _PEAK_SCRIPT.format(root=root), str(b)], check=True, capture_output=True, text=True
        )
        growth[b] = int(out.stdout.strip().splitlines()[-1])
    assert growth[48] <= growth[4] + 8 * 2**20, growth
