"""The benchmark harness: runs the selected sections, writes ``bench.json`` and the markdown report.

Sections (each module holds its measurement and its markdown):

1. ``gemm``      GEMM roofline of the scorer's shapes (:mod:`~scripts.benchmarks.gemm`).
2. ``scoring``   exact scorer GFLOP/s and fraction of (1) (:mod:`~scripts.benchmarks.scoring_bench`).
3. ``baseline``  the MuSc-style baseline on the same tokens: speed ratio and score agreement.
2b. ``mixed``    mixed-precision scoring vs fp32 vs the baseline, random and real tokens
   (:mod:`~scripts.benchmarks.mixed_bench`).
4. ``c2f``       coarse-to-fine vs exhaustive fine (:mod:`~scripts.benchmarks.c2f_section`).
5. ``tokenize``  bare encoder vs the full tokenize path (:mod:`~scripts.benchmarks.tokenize_bench`).
6. ``memory``    peak RSS of bundle runs at B and 2B volumes (:mod:`~scripts.benchmarks.memory`).
7. ``e2e``       seconds per volume and stage of those runs.
8. ``profile``   profiles and prototype scorer variants (:mod:`~scripts.benchmarks.profile_bench`).

A failing section is recorded as ``{"error": ...}`` (traceback in ``meta.errors``) and rendered as
such, so one failure does not lose the other sections.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from scripts.benchmarks.c2f_section import bench_c2f_section
from scripts.benchmarks.gemm import bench_gemm
from scripts.benchmarks.machine import machine_info
from scripts.benchmarks.memory import bench_bundle
from scripts.benchmarks.mixed_bench import bench_mixed
from scripts.benchmarks.profile_bench import bench_profile
from scripts.benchmarks.report import COMMAND, check_doc, evaluate_targets, write_markdown
from scripts.benchmarks.scoring_bench import baseline_summary, bench_scoring
from scripts.benchmarks.settings import FULL, QUICK, ROOT, SECTIONS
from scripts.benchmarks.timing import loadavg
from scripts.benchmarks.tokenize_bench import bench_tokenize
from scripts.benchmarks.values import jsonable

DEFAULT_OUT = "bench_out"
REPORT = "performance.md"


def parse_sections(sections: str | Sequence[str] | None) -> list[str]:
    """The chosen sections, in the order given (``None``: all).

    Raises:
        ValueError: an unknown section name.
    """
    if sections is None:
        return list(SECTIONS)
    items = sections.split(",") if isinstance(sections, str) else sections
    chosen = [s.strip() for s in items if s.strip()]
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown sections {unknown}; choose from {list(SECTIONS)}")
    return chosen


def _in_bundle(path: str | Path) -> Path:
    """``path``, relative ones taken from the bundle root (where the bundle is run from)."""
    path = Path(path)
    return path if path.is_absolute() else ROOT / path


def _command(quick: bool, device: str, sections: str | Sequence[str] | None, extra: dict) -> str:
    """The command line that reproduces a run, for the report's header."""
    parts = [COMMAND] + (["--quick"] if quick else []) + ([f"--device {device}"] if device != "cpu" else [])
    if sections is not None:
        parts.append("--sections " + ",".join(parse_sections(sections)))
    parts += [f"--{k} {v}" for k, v in extra.items() if v]
    return " ".join(parts)


class _Runner:
    """Runs sections one by one, recording wall time, load average after, and failures."""

    def __init__(self, meta: dict, verbose: bool) -> None:
        self.meta, self.verbose, self.started = meta, verbose, time.perf_counter()

    def log(self, msg: str) -> None:
        if self.verbose:
            print(f"[bench {time.perf_counter() - self.started:6.1f}s] {msg}", flush=True)

    def run(self, name: str, fn: Callable[[], object], fallback: Callable[[dict], object] | None = None) -> object:
        """``fn()``, or on failure ``{"error": ...}`` (passed through ``fallback`` when given)."""
        self.log(f"{name} ...")
        t0 = time.perf_counter()
        try:
            value = fn()
        except Exception as err:  # recorded and rendered: the other sections still run
            self.log(f"{name} FAILED: {type(err).__name__}: {err}")
            self.meta.setdefault("errors", {})[name] = traceback.format_exc()[-3000:]
            failed = {"error": f"{type(err).__name__}: {' '.join(str(err).split())[:500]}"}
            value = fallback(failed) if fallback else failed
        self.meta["section_s"][name] = round(time.perf_counter() - t0, 1)
        self.meta["section_load"][name] = loadavg()
        return value


def _run_sections(res: dict, chosen: list[str], cfg: dict, dev: torch.device, out: Path, runner: _Runner) -> None:
    """Fill ``res`` with the chosen sections, in the order their dependencies need."""
    for name in SECTIONS:
        if name not in chosen:
            res[name] = {"not_run": "not selected"}
    if "gemm" in chosen:
        res["gemm"] = runner.run("gemm", lambda: bench_gemm(cfg, dev))
    if "scoring" in chosen or "baseline" in chosen:
        gemm = res["gemm"] if "rows" in res.get("gemm", {}) else None
        res["scoring"] = runner.run("scoring", lambda: bench_scoring(cfg, dev, gemm, "baseline" in chosen))
        if "baseline" in chosen:
            failed = "rows" not in res["scoring"]
            res["baseline"] = res["scoring"] if failed else baseline_summary(res["scoring"])
    if "c2f" in chosen:
        res["c2f"] = runner.run("c2f", lambda: bench_c2f_section(cfg, dev))
    if "tokenize" in chosen:
        res["tokenize"] = runner.run("tokenize", lambda: bench_tokenize(cfg, dev))
    # Real tokens for the profile's variants: this run's 2B bundle run, else the latest earlier one.
    earlier = sorted((out / "runs").glob("B*/tokens"), key=lambda p: p.stat().st_mtime)
    real_run = earlier[-1].parent if earlier else None
    if "memory" in chosen or "e2e" in chosen:
        mem, e2e = runner.run("memory+e2e", lambda: bench_bundle(cfg, dev, out), fallback=lambda f: (f, f))
        real_run = mem["runs"][-1]["output_dir"] if "runs" in mem else real_run
        res.update({k: v for k, v in (("memory", mem), ("e2e", e2e)) if k in chosen})
    if "mixed" in chosen:
        cache = Path(real_run) / "tokens" if real_run else None
        res["mixed"] = runner.run("mixed", lambda: bench_mixed(cfg, dev, cache))
    if "profile" in chosen:
        res["profile"] = runner.run("profile", lambda: bench_profile(cfg, dev, real_run))


def run_bench(
    quick: bool = False,
    device: str = "cpu",
    out: str | Path = DEFAULT_OUT,
    sections: str | Sequence[str] | None = None,
    doc: str | Path | None = None,
    threads: int | None = None,
    overrides: dict | None = None,
    verbose: bool = True,
    memory_b: int | None = None,
) -> dict:
    """Run the selected sections; write ``<out>/bench.json`` and the markdown report.

    Args:
        quick: tiny sizes (about half a minute), for CI; the figures are produced, not meaningful.
        device: ``cpu`` or ``cuda``.
        out: output folder (JSON, report, cohorts, bundle runs); relative to the bundle root.
        sections: comma-separated subset of :data:`~scripts.benchmarks.settings.SECTIONS` (default all).
        doc: markdown file to render into (relative to the bundle root); ``None``: ``<out>/performance.md``.
            An existing file must hold the generated-block markers; only that block is replaced.
        threads: ``torch.set_num_threads`` for this run.
        overrides: entries replacing the mode's configuration (see ``FULL``/``QUICK`` in
            :mod:`scripts.benchmarks.settings`).
        verbose: print progress.
        memory_b: B of the memory/e2e bundle runs (B and 2B volumes); default 8 (full), 2 (quick).

    Returns:
        The JSON-ready result (as written to ``bench.json``).

    Raises:
        ValueError: CUDA asked for but unavailable, an unknown section, or a ``doc`` without markers.
    """
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but torch.cuda.is_available() is False")
    chosen = parse_sections(sections)
    out = _in_bundle(out)
    doc_path = _in_bundle(doc) if doc else out / REPORT
    check_doc(doc_path)  # before the run, not after minutes of measuring
    if threads:
        torch.set_num_threads(int(threads))
    cfg = copy.deepcopy(QUICK if quick else FULL)
    cfg.update(overrides or {})
    if memory_b:
        cfg["memory"]["b"] = int(memory_b)
    out.mkdir(parents=True, exist_ok=True)
    extra = {"threads": threads, "memory_b": memory_b, "doc": doc}
    meta = {
        "quick": quick,
        "device": str(dev),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": _command(quick, device, sections, extra),
        "sections": chosen,
        "config": cfg,
        "section_s": {},
        "section_load": {},
    }
    res: dict = {"meta": meta, "machine": machine_info(dev)}
    runner = _Runner(meta, verbose)
    _run_sections(res, chosen, cfg, dev, out, runner)
    res["targets"] = evaluate_targets(res)
    meta["wall_s"] = round(time.perf_counter() - runner.started, 1)
    meta["loadavg_end"] = loadavg()
    res = jsonable(res)
    (out / "bench.json").write_text(json.dumps(res, indent=2))
    write_markdown(res, doc_path)
    runner.log(f"done: {out / 'bench.json'}, {doc_path}")
    return res


def print_targets(res: dict) -> None:
    """One line per evaluated target: MET or MISSED, and the measured value."""
    for target in res["targets"]:
        print(f"{'MET   ' if target['met'] else 'MISSED'} {target['target']}: {target['value']}")
