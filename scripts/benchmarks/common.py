"""Helpers shared by the benchmark commands: paths, bundle command lines, interleaved timing, rounding."""

from __future__ import annotations

import json
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from scripts.storage.atomic import jsonable as jsonable  # re-exported for the commands

ROOT = Path(__file__).resolve().parents[2]


def in_bundle(path: str | Path) -> Path:
    """``path``, relative ones taken from the bundle root."""
    path = Path(path)
    return path if path.is_absolute() else ROOT / path


def bundle_command(configs: Sequence[str], overrides: Mapping[str, object]) -> list[str]:
    """``python -m monai.bundle run`` with ``configs`` and ``--key value`` overrides (lists, booleans as JSON)."""
    files = "[" + ",".join(f"'{c}'" for c in configs) + "]"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", files]
    for key, value in overrides.items():
        cmd += [f"--{key}", json.dumps(value) if isinstance(value, list | tuple | bool) else str(value)]
    return cmd


def interleaved(
    fns: Sequence[Callable[[], object] | None], device: torch.device, repeats: int, time_budget=math.inf, warmup=True
) -> tuple[list[list[float]], list[object]]:
    """Per-function seconds and last outputs of ``fns`` run in interleaved rounds (A B C A B C ...: a load change
    hits all alike); ``None`` entries are skipped; rounds stop after ``time_budget`` seconds (at least one)."""
    times: list[list[float]] = [[] for _ in fns]
    outs: list[object] = [None for _ in fns]
    for fn in fns if warmup else ():
        if fn is not None:
            fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda _: None
    start = time.perf_counter()
    for _ in range(max(1, repeats)):
        for k, fn in enumerate(fns):
            if fn is not None:
                sync(device)
                t0 = time.perf_counter()
                outs[k] = fn()
                sync(device)
                times[k].append(time.perf_counter() - t0)
        if time.perf_counter() - start > time_budget:
            break
    return times, outs


def ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median of the per-round ratios ``num[i] / den[i]`` of an interleaved timing."""
    return statistics.median(a / b for a, b in zip(num, den, strict=True))


def significant(x: float | None, digits: int = 4) -> float | None:
    """``x`` to ``digits`` significant digits (tiny figures stay non-zero); ``None`` if not finite."""
    if x is None or not math.isfinite(x):
        return None
    return 0.0 if x == 0 else round(float(x), digits - 1 - math.floor(math.log10(abs(x))))


def loadavg() -> list[float] | None:
    """The 1/5/15-minute load averages (``None`` where the OS has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover - not on Linux
        return None


def machine_info(device: torch.device) -> dict:
    """CPU model, CPUs, torch threads and versions, load average, and the GPU if one is used."""
    try:
        model = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), flags=re.M)
        cpu = model.group(1).strip() if model else platform.processor()
    except OSError:  # pragma: no cover - not on Linux
        cpu = platform.processor()
    info = {
        "cpu": cpu or "unknown",
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "loadavg_start": loadavg(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
