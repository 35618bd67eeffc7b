"""Bundle runs for the memory and end-to-end sections: cohorts, subsets and ``monai.bundle run`` launches."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from scripts.benchmarks.settings import CONFIG, ROOT, demo_config


def cohort(cfg: dict, out: Path, n_needed: int) -> tuple[Path, dict]:
    """The cohort the bundle runs read: the demo cohort, or a small synthetic one.

    Args:
        cfg: the mode's configuration; ``cfg["memory"]["demo"]`` picks the demo cohort (the bundle's
            ``demo_data`` when present, else generated under ``out``), otherwise ``n_needed`` volumes
            of side ``cfg["memory"]["shape"]`` are generated.
        out: output folder of the benchmark run.
        n_needed: subjects the runs need.

    Returns:
        ``(cohort folder, description for the report)``.
    """
    from scripts.synthetic.brain import ensure_cohort

    mem = cfg["memory"]
    if mem.get("demo"):
        demo = demo_config()["demo"]
        kwargs = {k: demo[k] for k in ("n_normal", "n_abnormal", "shape", "contrast", "seed") if k in demo}
        repo_demo = ROOT / "demo_data"
        if (repo_demo / "cohort.csv").is_file():
            path = repo_demo
        else:
            path = ensure_cohort(out / "demo_data", **kwargs)
        return Path(path), {"cohort": "demo (configs/inference.json#demo)", **kwargs}
    shape = mem.get("shape", 32)
    n_abnormal = n_needed // 2
    kwargs = {"n_normal": n_needed - n_abnormal, "n_abnormal": n_abnormal, "shape": shape, "seed": 0}
    path = ensure_cohort(out / f"cohort_{shape}_{n_needed}", **kwargs)
    return Path(path), {"cohort": "synthetic", **kwargs}


def subset(source: Path, n: int, where: Path) -> Path:
    """A dataset folder with the first ``n`` subjects of ``source`` (links, and a cut cohort.csv)."""
    lines = (source / "cohort.csv").read_text().splitlines()
    if len(lines) - 1 < n:
        raise ValueError(f"{source} has {len(lines) - 1} subjects, {n} needed")
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    for sub in ("images", "labels", "masks"):
        if (source / sub).is_dir():
            (where / sub).symlink_to((source / sub).resolve(), target_is_directory=True)
    (where / "cohort.csv").write_text("\n".join(lines[: n + 1]) + "\n")
    return where


# Launches the bundle from a small intermediate process that polls its child's VmHWM: an independent
# check of run.json's figure (which the workflow reads from its own VmHWM). The launcher sits in between
# because ru_maxrss survives execve on Linux: a bundle forked straight from this large process and
# reading ru_maxrss would report this process's RSS as its peak.
_LAUNCHER = """
import re, subprocess, sys, time
child = subprocess.Popen(sys.argv[1:])
hwm = 0
while child.poll() is None:
    try:
        with open(f"/proc/{child.pid}/status") as f:
            hwm = max(hwm, int(re.search(r"VmHWM:\\s+(\\d+)", f.read()).group(1)))
    except (OSError, AttributeError):
        pass
    time.sleep(0.05)
print(f"BENCH_VMHWM_KB={hwm}", flush=True)
sys.exit(child.returncode)
"""


def bundle_command(dataset: Path, out_dir: Path, overrides: dict, device: torch.device) -> list[str]:
    """The launcher + ``python -m monai.bundle run`` command line of one run."""
    cmd = [sys.executable, "-c", _LAUNCHER, sys.executable, "-m", "monai.bundle", "run"]
    cmd += ["--config_file", str(CONFIG), "--dataset_dir", str(dataset), "--output_dir", str(out_dir)]
    cmd += ["--quiet", "true", "--device", f"$torch.device('{'cuda:0' if device.type == 'cuda' else 'cpu'}')"]
    for key, value in overrides.items():
        cmd += [f"--{key}", json.dumps(value) if not isinstance(value, str) else value]
    return cmd


def bundle_result(proc: subprocess.CompletedProcess, cmd: list[str], out_dir: Path, wall: float) -> dict:
    """The figures of one finished run, from its run.json and the launcher's VmHWM line.

    Raises:
        RuntimeError: the run failed (the end of its stderr is in the message).
    """
    if proc.returncode != 0:
        raise RuntimeError(f"bundle run failed ({' '.join(cmd[3:])}):\n{proc.stderr[-3000:]}")
    m = re.search(r"BENCH_VMHWM_KB=(\d+)", proc.stdout)
    run = json.loads((out_dir / "run.json").read_text())
    tokens, inferer = run.get("tokens", {}), run.get("inferer", {})
    return {
        "n_volumes": run.get("n_volumes"),
        "encoded_volumes": run.get("encoded_volumes"),
        "wall_s": round(wall, 2),
        "timings_s": run.get("timings_s", {}),
        "peak_rss_mb": run.get("peak_rss_mb"),
        "vmhwm_mb": round(int(m.group(1)) / 1024, 1) if m and int(m.group(1)) else None,
        "peak_gpu_mb": run.get("peak_gpu_mb"),
        "bank_mb": tokens.get("bank_mb"),
        "tokens_per_volume": tokens.get("per_volume"),
        "grids": tokens.get("grids", {}),
        "d": inferer.get("d"),
        "rho": inferer.get("rho"),
        "token_dtype": inferer.get("token_dtype"),
        "output_dir": str(out_dir),
    }


def bundle_runs(
    jobs: list[tuple[Path, Path]], overrides: dict, device: torch.device, parallel: bool, fresh: bool = True
) -> list[dict]:
    """Run the bundle on each ``(dataset, out_dir)``.

    Args:
        jobs: dataset and output folder of each run.
        overrides: config entries passed on the command line.
        device: the bundle's device.
        parallel: start all runs at once (memory figures are unaffected; times are then meaningless);
            otherwise one after the other.
        fresh: empty each output folder first, so that no run reads a token cache.

    Returns:
        :func:`bundle_result` of each run, in ``jobs`` order.
    """
    if fresh:
        for _, out_dir in jobs:
            shutil.rmtree(out_dir, ignore_errors=True)
    cmds = [bundle_command(ds, od, overrides, device) for ds, od in jobs]
    if not parallel:
        results = []
        for cmd, (_, out_dir) in zip(cmds, jobs, strict=True):
            start = time.perf_counter()
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600)
            results.append(bundle_result(proc, cmd, out_dir, time.perf_counter() - start))
        return results
    start = time.perf_counter()
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for cmd in cmds]
    outs = [p.communicate(timeout=3600) for p in procs]
    wall = time.perf_counter() - start
    return [
        bundle_result(subprocess.CompletedProcess(cmd, p.returncode, o, e), cmd, od, wall)
        for cmd, p, (o, e), (_, od) in zip(cmds, procs, outs, jobs, strict=True)
    ]
