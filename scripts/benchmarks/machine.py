"""The machine a run measured: CPU, SIMD, threads, BLAS/oneDNN build, versions, load; and its table."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import torch
from scripts.benchmarks.markdown import table
from scripts.benchmarks.timing import loadavg

# CPU flags that decide the GEMM rates (fp32 FMA width, native bf16).
_SIMD = {"avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}
_BUILD_KEYS = ("Math Kernel", "MKL-DNN", "oneDNN", "OpenMP", "OpenBLAS", "CPU capability")


def _cpu() -> tuple[str, set[str], int]:
    """``(model name, flags, logical CPUs)`` from /proc/cpuinfo (platform's guess elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # pragma: no cover - not on Linux
        return platform.processor() or "unknown", set(), 0
    logical = len(re.findall(r"^processor\s*:", text, flags=re.M))
    m = re.search(r"^model name\s*:\s*(.+)$", text, flags=re.M)
    model = m.group(1).strip() if m else platform.processor() or "unknown"
    m = re.search(r"^flags\s*:\s*(.+)$", text, flags=re.M)
    return model, set(m.group(1).split()) if m else set(), logical


def _memory_gb() -> float | None:
    try:
        m = re.search(r"^MemTotal:\s*(\d+) kB", Path("/proc/meminfo").read_text(), flags=re.M)
    except OSError:  # pragma: no cover - not on Linux
        return None
    return round(int(m.group(1)) / 2**20, 1) if m else None


def _versions() -> dict:
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import monai
        import numpy

        versions.update(monai=monai.__version__, numpy=numpy.__version__)
    except ImportError:  # pragma: no cover - both are bundle requirements
        pass
    return versions


def machine_info(device: torch.device) -> dict:
    """CPU model, cores, threads, BLAS/oneDNN build, versions and load average (and the GPU if used)."""
    cpu_model, flags, logical = _cpu()
    config = torch.__config__.show()
    blas = re.search(r"BLAS_INFO=(\w+)", config)
    info = {
        "cpu_model": cpu_model,
        "logical_cpus": logical or os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gb": _memory_gb(),
        "simd": sorted(flags & _SIMD),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "blas": blas.group(1) if blas else None,
        "build": [line.strip(" -") for line in config.splitlines() if any(k in line for k in _BUILD_KEYS)],
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if os.environ.get(k)},
        **_versions(),
        "loadavg_start": loadavg(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def render(machine: dict, meta: dict) -> list[str]:
    """The machine table, and the section wall times with the load after each."""
    rows = [
        ["CPU", machine["cpu_model"]],
        ["logical CPUs / available", f"{machine['logical_cpus']} / {machine['cpus_available']}"],
        ["memory", f"{machine.get('memory_gb')} GB"],
        ["SIMD", ", ".join(machine["simd"]) or "-"],
        ["torch threads (intra / inter-op)", f"{machine['torch_threads']} / {machine['torch_interop_threads']}"],
        ["torch CPU capability / BLAS", f"{machine['cpu_capability']} / {machine['blas']}"],
        ["build", "; ".join(machine["build"])],
        ["versions", f"python {machine['python']}, torch {machine['torch']}, monai {machine.get('monai')}"],
        ["load average (1/5/15 min) start -> end", f"{machine['loadavg_start']} -> {meta.get('loadavg_end')}"],
    ]
    if "gpu" in machine:
        rows.append(["GPU", machine["gpu"]])
    md = ["## Machine", "", table(["item", "value"], rows), ""]
    if meta.get("section_s"):
        load = meta.get("section_load") or {}
        md += [
            "Section wall times and the 1-minute load average after each (a load above the core count "
            "means other processes competed for the CPU while it ran):",
            "",
            table(
                ["section", "s", "load after"],
                [[k, v, (load.get(k) or [None])[0]] for k, v in meta["section_s"].items()],
            ),
            "",
        ]
    return md
