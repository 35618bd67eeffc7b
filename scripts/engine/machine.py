"""How fast the machine that ran is, so that timings compare across machines (recorded in ``run.json``)."""

from __future__ import annotations

import os
import platform
import time

import torch

__all__ = ["default_threads", "machine_rate"]

TORCH_THREADS = torch.get_num_threads()  # OMP_NUM_THREADS or the cores, before any run changes it


def default_threads(calls: int = 16) -> int:
    """:data:`TORCH_THREADS` if ``calls`` small GEMMs take less time with them than with one (on busy cores
    every parallel call stalls for a time slice), else 1."""
    if TORCH_THREADS <= 1:
        return 1
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, 128, generator=gen), torch.randn(128, 256, generator=gen)
    spent = {}
    for threads in (1, TORCH_THREADS):
        torch.set_num_threads(threads)
        start = time.perf_counter()
        for _ in range(calls):
            torch.mm(a, b).amin(dim=1)
            if threads > 1 and time.perf_counter() - start > spent[1]:
                return 1
        spent[threads] = time.perf_counter() - start
    return TORCH_THREADS


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
