"""Measurements behind ``docs/scaling.md`` on a synthetic cohort (``python -m scripts synth --out COHORT``):

* ``metrics``: the bundle with ``configs/evaluate.json`` per ``references`` setting, sharing one token cache.
* ``costs``: scoring only, a fresh process per (B, setting), the first ``B`` volumes of a token bank: wall
  time and peak-RSS growth; ``bank`` scores one volume against a memory-mapped bank of the other ``B - 1``.
* ``threads``: one cached cohort re-scored with each torch thread count (``default`` sets none), alternated
  per round, ``OMP_NUM_THREADS`` unset: the cost on this machine as loaded as it is (``busy``: plus that
  many spinning processes beside each measured run), the threads each run went through, and equal scores.

Usage (from the bundle root)::

    python -m scripts.benchmarks scaling metrics --cohort /tmp/scale/cohort --out /tmp/scale/runs
    python -m scripts.benchmarks scaling costs --bank /tmp/scale/bank --sizes 16,32,64
    python -m scripts.benchmarks scaling threads --out /tmp/threads --volumes 200 --size 16
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

from scripts.benchmarks.common import ROOT, bundle_command
from scripts.benchmarks.tables import table

METRICS = ("patient_auroc", "patient_ap", "voxel_ap", "dice_max", "ltpr99_large", "localization99")
# Setting name -> the bundle's ``references`` key (see scripts/scoring/references.py).
SETTINGS = {
    "full": {},
    **{f"chunks:{n}": {"references": f"chunks:{n}"} for n in (32, 16, 8)},
    **{f"random:{n}": {"references": f"random:{n}"} for n in (32, 16, 8)},
}


def _items(value: str | Sequence) -> list[str]:
    """``"a,b"`` or a sequence -> ``["a", "b"]``."""
    values = value if isinstance(value, list | tuple) else str(value).split(",")
    return [str(v).strip() for v in values if str(v).strip()]


def metrics(cohort: str, out: str, cache: str | None = None, settings: str | None = None, threads: int = 1) -> None:
    """Run the bundle + evaluation per setting; print a markdown table."""
    out_dir = Path(out)
    cache = cache or str(out_dir / "tokens")
    chosen = list(SETTINGS) if settings is None else _items(settings)
    rows, record = [], {}
    for name in chosen:
        run_dir = out_dir / name.replace(":", "")
        if not (run_dir / "metrics.json").is_file():
            args = {"dataset_dir": cohort, "output_dir": run_dir, "evaluator#cache_dir": cache, "quiet": True}
            args |= {"plots": False, "evaluator#num_threads": threads, **SETTINGS[name]}
            cmd = bundle_command(["configs/inference.json", "configs/evaluate.json"], args)
            start = time.perf_counter()
            subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
            print(f"{name}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        m = json.loads((run_dir / "metrics.json").read_text())
        run = json.loads((run_dir / "run.json").read_text())
        record[name] = {"metrics": m, "timings_s": run["timings_s"], "peak_rss_mb": run["peak_rss_mb"]}
        rows.append(
            [name, *[f"{100 * m[k]:.1f}" for k in METRICS], f"{run['timings_s']['score']:.1f}", run["n_volumes"]]
        )
    (out_dir / "metrics_table.json").write_text(json.dumps(record, indent=1))
    print(table(["setting", *METRICS, "score s", "B"], rows))


_COST_SCRIPT = """
    import json, sys, time, warnings
    import torch
    sys.path.insert(0, {root!r})
    from scripts.storage.bank import TokenBank
    from scripts.inferer import CS3FInferer, TokenGrid, VolumeTokens
    warnings.simplefilter("ignore")
    torch.set_num_threads({threads})

    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024

    bank = TokenBank({bank!r})
    entry, b, setting = bank.parts[""], {b}, {setting!r}
    refs = bank.references("")
    d = next(iter(refs.values()))[0].shape[-1]
    names = bank.names[:b]

    def volume(j, dtype=torch.float32):
        grids = {{}}
        for key, (t, v) in refs.items():
            shape = entry["keys"][key]["grid"]
            grids[key] = TokenGrid(t[j].to(dtype).view(*shape, d), v[j].clone().view(*shape))
        return VolumeTokens(tuple(entry["spatial_shape"]), grids)

    options = {options}
    inferer = CS3FInferer(axes=bank.identity["axes"], q=bank.identity["q"], d=d, rho=0.1, **options)
    if setting == "bank":  # one new volume against a memory-mapped bank of the other b - 1
        query = [volume(b - 1)]
        sub = {{k: (t[: b - 1], v[: b - 1]) for k, (t, v) in refs.items()}}
        inferer.score(query, reference_bank={{k: (t[:2], v[:2]) for k, (t, v) in sub.items()}})  # warm-up
        base, start = hwm(), time.perf_counter()
        inferer.score(query, reference_bank=sub)
    else:
        tokens = [volume(j) for j in range(b)]
        CS3FInferer(d=d, axes=bank.identity["axes"], q=bank.identity["q"]).score(tokens[:2])  # warm-up
        base, start = hwm(), time.perf_counter()
        inferer.score(tokens, names=names)
    print(json.dumps({{"seconds": time.perf_counter() - start, "peak_mb": hwm() - base}}))
    """
_COST_SCRIPT = textwrap.dedent(_COST_SCRIPT)


def costs(
    bank: str, sizes: str = "16,32,64", settings: str = "full,chunks:16,random:16,bank", threads: int = 1
) -> None:
    """Scoring time and peak-memory growth per (B, setting), each in a fresh process."""
    options = {**SETTINGS, "bank": {}}
    size_list = [int(s) for s in _items(sizes)]
    chosen = _items(settings)
    results: dict[str, dict[int, dict]] = {}
    for name in chosen:
        for b in size_list:
            code = _COST_SCRIPT.format(
                root=str(ROOT), bank=str(bank), b=b, setting=name, options=options[name], threads=threads
            )
            proc = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
            results.setdefault(name, {})[b] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{name} B={b}: {results[name][b]}", file=sys.stderr, flush=True)
    header = ["setting", *[f"B={b}: s / MB" for b in size_list]]
    rows = [
        [name, *[f"{results[name][b]['seconds']:.1f} / {results[name][b]['peak_mb']:.0f}" for b in size_list]]
        for name in chosen
    ]
    (Path(bank) / "costs.json").write_text(json.dumps(results, indent=1))
    print(table(header, rows))


def threads(
    out: str,
    volumes: int = 200,
    size: int = 16,
    image_size: int = 32,
    settings: str = "1,2,default",
    rounds: int = 1,
    busy: int = 0,
) -> None:
    """Seconds of the score stage (and of the whole run) per thread setting on one cached cohort of
    ``volumes`` at ``size``^3 (``--volumes 32 --size 96 --image_size 112``: the demo's); a markdown table."""
    out_dir = Path(out)
    cohort, cache = out_dir / f"cohort{volumes}x{size}", out_dir / f"tokens{volumes}x{size}x{image_size}"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    if not (cohort / "cohort.csv").is_file():
        synth = ["--out", cohort, "--n_normal", volumes - volumes // 4, "--n_abnormal", volumes // 4, "--shape", size]
        synth = [sys.executable, "-m", "scripts", "synth", *map(str, synth), "--quiet", "true"]
        subprocess.run(synth, cwd=ROOT, check=True)
    args = {"dataset_dir": cohort, "image_size": image_size, "quiet": True, "evaluator#cache_dir": cache}

    def run(name: str, extra: dict) -> dict:
        cmd = bundle_command(["configs/inference.json"], {**args, "output_dir": out_dir / name, **extra})
        spin = [sys.executable, "-c", "while True: pass"]
        spinning = [subprocess.Popen(spin) for _ in range(busy if name != "encode" else 0)]
        load, start = os.getloadavg()[0], time.perf_counter()
        try:
            subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, text=True)
        finally:
            for proc in spinning:
                proc.kill()
        record = json.loads((out_dir / name / "run.json").read_text())
        scores = (out_dir / name / "scores.csv").read_bytes()
        wall = time.perf_counter() - start
        print(f"{name}: {wall:.0f} s, load {load:.1f}", file=sys.stderr, flush=True)
        return {"wall_s": wall, "load": load, "scores": scores, **{k: record[k] for k in ("timings_s", "machine")}}

    run("encode", {"evaluator#num_threads": 1})  # fills the cache: every setting below only re-scores
    chosen = _items(settings)
    results: dict[str, list[dict]] = {name: [] for name in chosen}
    for _ in range(rounds):
        for name in chosen:
            results[name].append(run(name, {} if name == "default" else {"evaluator#num_threads": name}))
    first = results[chosen[0]][0]["scores"]
    rows = [
        [
            name,
            " / ".join("-".join(map(str, r["machine"]["threads_during_run"])) for r in runs),
            " / ".join(f"{r['timings_s']['score']:.1f}" for r in runs),
            " / ".join(f"{sum(r['timings_s'].values()):.1f}" for r in runs),
            " / ".join(f"{r['load']:.1f}" for r in runs),
            all(r["scores"] == first for r in runs),
        ]
        for name, runs in results.items()
    ]
    record = {n: [{k: v for k, v in r.items() if k != "scores"} for r in runs] for n, runs in results.items()}
    (out_dir / "threads.json").write_text(json.dumps(record, indent=1))
    print(f"{volumes} volumes of {size}^3, R {image_size}, {os.cpu_count()} CPUs, {busy} busy, rounds {rounds}")
    print(table(["threads", "threads used", "score s", "stages s", "load at start", "same scores"], rows))
