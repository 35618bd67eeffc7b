"""Sizes and constants of the benchmark harness: sections, the full and quick modes, the demo config."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "inference.json"

SECTIONS = ("gemm", "scoring", "baseline", "mixed", "c2f", "tokenize", "memory", "e2e", "profile")

FULL = {
    "repeats": 3,
    "min_time": 0.2,  # seconds per timing sample of a short operation (looped)
    "d": 128,
    "tile": 1024,
    "gemm_n": [1024, 2048, 4096],
    "score_b": [8, 24, 64],
    "score_n": [1024, 4096],
    "invalid": 0.3,
    "rho": 0.1,
    # Estimated scorer seconds (at the fp32 roofline, both directions of every pair) per case; above it
    # a few query volumes are timed with volumes= (the per-volume order of a torchrun rank).
    "budget_s": 3.5,
    "case_s": 4.0,  # stop repeating a scoring case after this many seconds
    "c2f": {"B": 16, "n_coarse": 256, "h": 4, "d": 128, "Ls": [4, 16, 64], "repeats": 1},
    "tokenize": [[48, 112, 3], [16, 224, 2]],  # [volume size, R, interleaved pairs]
    "whatif_cases": 1,  # encoder what-if variants on the first tokenize case(s) only
    "whatif_pairs": 2,
    "variant_repeats": 2,
    # B = 8 -> 16 demo volumes: a bank growth large against the run-to-run noise of the peak.
    "memory": {"b": 8, "demo": True, "overrides": {}, "repeats": 2},
    "profile": {"B": 16, "N": 1024},
    # the acceptance case of mixed-precision scoring (and the real tokens of the 2B bundle run)
    "mixed": {"B": 24, "N": 2048, "d": 128, "keys": "all"},
}
QUICK = {
    "repeats": 2,
    "min_time": 0.01,
    "d": 128,
    "tile": 256,
    "gemm_n": [256, 512],
    "score_b": [3, 4],
    "score_n": [64, 128],
    "invalid": 0.3,
    "rho": 0.5,
    "budget_s": 1.0,
    "case_s": 2.0,
    "c2f": {"B": 4, "n_coarse": 32, "h": 2, "d": 128, "Ls": [2, 8], "repeats": 1},
    "tokenize": [[32, 32, 1]],
    "whatif_cases": 1,
    "memory": {
        "b": 2,
        "demo": False,
        "shape": 32,
        "parallel": True,  # memory figures are unaffected by running the two bundle runs at once
        "overrides": {"image_size": 32, "q": [8, 8, 8]},
    },
    "profile": {"B": 4, "N": 128},
    "mixed": {"B": 4, "N": 128, "d": 128, "keys": "largest"},
}


def demo_config() -> dict:
    """Tokenization parameters and demo cohort of ``configs/inference.json``.

    Returns:
        ``q``, ``d``, ``slab_size``, ``token_dtype``, ``delta``, ``axes``, ``image_size``,
        ``encoder_name`` and ``demo`` (the demo cohort's generator arguments).
    """
    cfg = json.loads(CONFIG.read_text())
    inferer, network = cfg.get("inferer", {}), cfg.get("network_def", {})
    return {
        "q": cfg.get("q", [8, 8, 8]),
        "d": cfg.get("d", 128),
        "slab_size": inferer.get("slab_size", 32),
        "token_dtype": inferer.get("token_dtype", "float32"),
        "delta": inferer.get("delta", 0.0),
        "axes": inferer.get("axes", ["sagittal", "coronal", "axial"]),
        "image_size": cfg.get("image_size", 112),
        "encoder_name": network.get("name", "efficientnet_lite0"),
        # the demo cohort's generator arguments: scripts.engine.datalist.ensure_demo's defaults
        "demo": {"n_normal": 20, "n_abnormal": 12, "shape": 96, "contrast": "t1", "seed": 0},
    }


def scoring_defaults() -> tuple[int, int]:
    """The exact scorer's ``(block_elements, query_tile)`` defaults, which the GEMM shapes follow."""
    from scripts.scoring import DEFAULT_BLOCK_ELEMENTS, DEFAULT_QUERY_TILE

    return DEFAULT_BLOCK_ELEMENTS, DEFAULT_QUERY_TILE
