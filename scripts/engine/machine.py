"""How fast the machine that ran is, so that timings compare across machines (recorded in ``run.json``)."""

from __future__ import annotations

import os
import platform
import time

import torch

__all__ = ["machine_rate"]


def machine_rate(size: int = 1024, repeats: int = 5) -> dict:
    """The CPU's fp32 GEMM rate (GFLOP/s, the best of ``repeats`` ``size``-cubed products with the run's
    torch threads) and what it ran on: timings of two runs compare through this rate."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(size, size, generator=gen), torch.randn(size, size, generator=gen)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return {
        "cpu_gemm_gflops": round(2 * size**3 / best / 1e9, 1),
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
    }
