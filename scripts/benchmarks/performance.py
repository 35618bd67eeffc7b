"""Speed and memory of the bundle: ``python -m scripts.benchmarks performance`` (``--sections``, default all).

* ``scoring``: the exact scorer, the MuSc-style baseline (``torch.cdist`` per reference volume) and an fp32
  GEMM of the scorer's shape, interleaved on random unit tokens (and with ``--cache`` a run's tokens);
  GFLOP/s count ``2 N_q N_r d`` per pair of valid tokens.
* ``c2f``: :func:`scripts.scoring.c2f_scores` against exhaustive fine scoring per routing budget ``L``.
* ``tokenize``: the bundle's tokenizer on a phantom volume; ``overhead = tokenize / encoder - 1``.
* ``memory``: bundle runs on B and 2B subjects (lowest peak RSS of repeats), then from their token caches.

Ratios are medians of per-round ratios of interleaved timings: on a shared machine compare ratios.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import math
import shutil
import statistics
import subprocess
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from scripts.benchmarks.common import ROOT, in_bundle, interleaved, jsonable, loadavg, machine_info, ratio, significant
from scripts.benchmarks.common import bundle_command as _bundle_command
from scripts.benchmarks.performance_c2f import bench_c2f_section

SECTIONS = ("scoring", "c2f", "tokenize", "memory")
# Larger scoring cases time ``budget_gflop`` of query volumes (``volumes=``); a case stops repeating after
# ``case_s`` seconds; ``tokenize`` lists [volume side, encoder input R].
FULL = {"repeats": 3, "d": 128, "rho": 0.1, "score_b": [8, 24, 64], "score_n": [1024, 4096], "invalid": 0.3}
FULL |= {"budget_gflop": 300.0, "case_s": 4.0, "tokenize": [[48, 112], [16, 224]], "tokenize_repeats": 3}
FULL |= {"c2f": {"B": 16, "n_coarse": 256, "h": 4, "Ls": [4, 16, 64], "repeats": 1}}
FULL |= {"memory": {"b": 8, "demo": True, "repeats": 2, "overrides": {}}}
QUICK = {**FULL, "repeats": 2, "rho": 0.5, "score_b": [3, 4], "score_n": [64, 128], "budget_gflop": 1.0, "case_s": 2.0}
QUICK |= {"c2f": {"B": 4, "n_coarse": 32, "h": 2, "Ls": [2, 8], "repeats": 1}}
QUICK |= {"tokenize": [[32, 32]], "tokenize_repeats": 1}
QUICK |= {"memory": {"b": 2, "demo": False, "shape": 32, "repeats": 1, "overrides": {"image_size": 32, "q": [8, 8, 8]}}}


# ---------------------------------------------------------------------------------------------- scoring
def synthetic_bank(
    b: int, n: int, d: int, invalid: float = 0.0, seed: int = 0, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(tokens [b, n, d] of unit norm, valid [b, n] or None)``: about ``invalid`` of the tokens are
    invalid (token 0 of every volume stays valid); ``invalid == 0`` returns no mask."""
    gen = torch.Generator().manual_seed(seed)
    tokens = F.normalize(torch.randn(b, n, d, generator=gen), dim=-1)
    valid = None
    if invalid > 0:
        valid = torch.rand(b, n, generator=gen) >= invalid
        valid[:, 0] = True
        valid = valid.to(device)
    return tokens.to(device), valid


def musc_baseline(
    tokens: torch.Tensor, valid: torch.Tensor | None = None, rho: float = 0.1, volumes: Sequence[int] | None = None
) -> torch.Tensor:
    """The straightforward MuSc-style scorer: per query volume ``torch.cdist`` to every other volume's
    valid tokens, min over them, mean of the ``K = max(1, floor(rho (B - 1)))`` smallest; invalid
    tokens and volumes not in ``volumes`` score 0. Returns ``[B, N]`` float32."""
    b, n, _ = tokens.shape
    k = max(1, math.floor(rho * (b - 1) + 1e-9))  # the epsilon keeps the floor exact (0.29 * 100)
    if valid is None:
        valid = torch.ones(b, n, dtype=torch.bool, device=tokens.device)
    scores = torch.zeros(b, n, dtype=torch.float32, device=tokens.device)
    for i in range(b) if volumes is None else volumes:
        queries = tokens[i][valid[i]].float()
        profile = torch.stack(
            [torch.cdist(queries, tokens[j][valid[j]].float()).min(dim=1).values for j in range(b) if j != i], dim=1
        )
        scores[i, valid[i]] = profile.sort(dim=1).values[:, :k].mean(dim=1)
    return scores


def effective_flops(counts: Sequence[int], d: int, query_volumes: Sequence[int]) -> int:
    """``2 N_q N_r d`` summed over every (query volume, other volume) pair, valid tokens only."""
    total = sum(counts)
    return sum(2 * counts[i] * (total - counts[i]) * d for i in query_volumes)


def _gemm_probe(n: int, d: int, device: torch.device) -> tuple[object, int]:
    """``(call, flops)``: one fp32 ``addmm [1024, d] x [d, n]`` with a norm row, the scorer's GEMM."""
    gen = torch.Generator().manual_seed(1)
    q, r = torch.randn(1024, d, generator=gen).to(device), torch.randn(n, d, generator=gen).to(device)
    norms = torch.randn(1, n, generator=gen).to(device)
    return (lambda: torch.addmm(norms, q, r.t(), alpha=-2.0)), 2 * 1024 * n * d


def score_case(name: str, tokens: torch.Tensor, valid: torch.Tensor | None, cfg: dict, device: torch.device) -> dict:
    """One row: the exact scorer, the baseline and a GEMM probe timed interleaved on ``tokens``."""
    from scripts.scoring import mutual_similarity_scores

    b, n, d = tokens.shape
    rho = cfg["rho"]
    counts = valid.sum(dim=1).tolist() if valid is not None else [n] * b
    per_volume = effective_flops(counts, d, [0]) / 1e9
    budget = cfg["budget_gflop"]
    n_query = b if per_volume * b <= budget else max(1, int(budget / per_volume))
    volumes = None if n_query == b else list(range(n_query))
    flops = effective_flops(counts, d, range(n_query))
    probe, probe_flops = _gemm_probe(n, d, device)
    fns = [lambda: mutual_similarity_scores(tokens, valid, rho, volumes=volumes)]
    fns += [lambda: musc_baseline(tokens, valid, rho, volumes), probe]
    (t32, tbase, tprobe), (s32, sbase, _) = interleaved(fns, device, cfg["repeats"], cfg["case_s"])
    rows = slice(0, n_query)
    return {
        "case": name,
        "B": b,
        "N": n,
        "valid": significant(sum(counts) / (b * n), 3),
        "query_volumes": n_query,
        "gflops": significant(flops / statistics.median(t32) / 1e9),
        "frac_roofline": significant(
            statistics.median((flops / a) / (probe_flops / p) for a, p in zip(t32, tprobe, strict=True)), 3
        ),
        "fp32_s": significant(statistics.median(t32)),
        "baseline_s": significant(statistics.median(tbase)),
        "baseline_over_fp32": significant(ratio(tbase, t32), 3),
        "diff_baseline": float((s32[rows] - sbase[rows]).abs().max()),
        "repeats": len(t32),
    }


def cache_grids(cache: str | Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{grid key: (tokens [B, N, d] fp32, valid [B, N])}`` of a bundle run's token cache (``*.pt``)."""
    entries = [torch.load(p, map_location="cpu", weights_only=True)["grids"] for p in sorted(Path(cache).glob("*.pt"))]
    if len(entries) < 2:
        raise ValueError(f"{cache}: a token cache of at least 2 volumes is needed, found {len(entries)}")
    return {
        k: (
            torch.stack([e[k][0].reshape(-1, e[k][0].shape[-1]).float() for e in entries]),
            torch.stack([e[k][1].reshape(-1) for e in entries]).bool(),
        )
        for k in entries[0]
    }


def bench_scoring(cfg: dict, device: torch.device, cache: str | Path | None) -> dict:
    """Random cases of every (B, N, invalid fraction), then every coarse grid of ``cache``."""
    rows = []
    for b, n in sorted(((b, n) for b in cfg["score_b"] for n in cfg["score_n"]), key=lambda c: c[0] * c[1]):
        for invalid in (0.0, cfg["invalid"]):
            tokens, valid = synthetic_bank(b, n, cfg["d"], invalid, seed=b * 1000 + n, device=device)
            rows.append(score_case(f"random, {invalid:.0%} invalid", tokens, valid, cfg, device))
    if cache:
        for key, (tokens, valid) in cache_grids(cache).items():
            if not key.endswith("/fine"):
                rows.append(score_case(f"real {key}", tokens.to(device), valid.to(device), cfg, device))
    return {"rows": rows, "rho": cfg["rho"]}


# --------------------------------------------------------------------------------------------- tokenize
def phantom(shape: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(image [1, S, S, S] in [0, 1], ellipsoid mask [1, S, S, S])``: smooth texture in an ellipsoid
    (tokenization cost does not depend on the anatomy)."""
    gen = torch.Generator().manual_seed(seed)
    axis = (torch.arange(shape, dtype=torch.float32) + 0.5) / shape - 0.5
    x, y, z = torch.meshgrid(axis, axis, axis, indexing="ij")
    mask = (x / 0.40) ** 2 + (y / 0.46) ** 2 + (z / 0.38) ** 2 <= 1.0
    texture = F.avg_pool3d(torch.rand(1, 1, shape, shape, shape, generator=gen), 5, stride=1, padding=2)[0]
    texture = (texture - texture.min()) / (texture.max() - texture.min())
    return torch.where(mask, 0.3 + 0.7 * texture, torch.zeros(())), mask[None].float()


def bundle_parts(overrides: dict) -> tuple[object, torch.nn.Module, dict]:
    """The inferer and encoder that ``configs/inference.json`` builds with ``overrides``, and its settings."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.json"))
    parser.update({"bundle_root": str(ROOT), "quiet": True, **overrides})
    settings = {k: parser.get_parsed_content(k) for k in ("encoder_name", "q", "d", "layers", "depth_phases")}
    return parser.get_parsed_content("inferer"), parser.get_parsed_content("network_def").encoder.eval(), settings


def bench_tokenize(cfg: dict, device: torch.device) -> dict:
    """Per (volume side, R): encoder seconds inside ``tokenize`` and the whole call's, median overhead."""
    rows, settings = [], {}
    for shape, size in cfg["tokenize"]:
        inferer, encoder, settings = bundle_parts({"image_size": size})
        encoder.to(device)
        volume, mask = (t.to(device) for t in phantom(shape))
        spent = [0.0]
        forward = encoder.forward

        def timed(*args, forward=forward, spent=spent, **kwargs):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            out = forward(*args, **kwargs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            spent[0] += time.perf_counter() - start
            return out

        encoder.forward = timed
        encoder_s, total_s = [], []
        with torch.inference_mode():
            inferer.tokenize(volume, encoder, mask)  # warm-up
            for _ in range(cfg["tokenize_repeats"]):
                spent[0], start = 0.0, time.perf_counter()
                inferer.tokenize(volume, encoder, mask)
                total_s.append(time.perf_counter() - start)
                encoder_s.append(spent[0])
        rows.append(
            {
                "volume": shape,
                "R": size,
                "encoder_s": significant(statistics.median(encoder_s)),
                "tokenize_s": significant(statistics.median(total_s)),
                "overhead": significant(ratio(total_s, encoder_s) - 1.0, 3),
                "repeats": len(total_s),
            }
        )
    return {"rows": rows, "settings": settings}


# --------------------------------------------------------------------------------------- memory and e2e
STAGES = ("load", "tokenize", "score", "write")


def _cohort(cfg: dict, out: Path, n: int) -> tuple[Path, dict]:
    """The demo cohort (``demo_data`` or generated from ``configs/inference.json#demo``) or a small one."""
    from scripts.synthetic.brain import ensure_cohort

    mem = cfg["memory"]
    if mem["demo"]:
        demo = json.loads((ROOT / "configs" / "inference.json").read_text())["demo"]
        args = {k: demo[k] for k in ("n_normal", "n_abnormal", "shape", "contrast", "seed") if k in demo}
        path = ROOT / "demo_data" if (ROOT / "demo_data" / "cohort.csv").is_file() else None
        return Path(path or ensure_cohort(out / "demo_data", **args)), {"cohort": "demo", **args}
    args = {"n_normal": n - n // 2, "n_abnormal": n // 2, "shape": mem["shape"], "seed": 0}
    return Path(ensure_cohort(out / f"cohort_{mem['shape']}_{n}", **args)), {"cohort": "synthetic", **args}


def _subset(source: Path, n: int, where: Path) -> Path:
    """A dataset folder with the first ``n`` subjects of ``source`` (folder links, a cut cohort.csv)."""
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


def _bundle_run(dataset: Path, out_dir: Path, overrides: dict, device: torch.device, fresh: bool) -> dict:
    """One ``monai.bundle run`` (fresh: no token cache); its run.json figures and wall seconds."""
    if fresh:
        shutil.rmtree(out_dir, ignore_errors=True)
    args = {"dataset_dir": dataset, "output_dir": out_dir, "quiet": True, **overrides}
    if device.type == "cuda":
        args["device"] = "$torch.device('cuda:0')"
    cmd = _bundle_command(["configs/inference.json"], args)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"bundle run failed ({' '.join(cmd[3:])}):\n{proc.stderr[-3000:]}")
    run = json.loads((out_dir / "run.json").read_text())
    return {
        "n_volumes": run["n_volumes"],
        "encoded_volumes": run.get("encoded_volumes"),
        "wall_s": round(time.perf_counter() - start, 2),
        "timings_s": run.get("timings_s", {}),
        "peak_rss_mb": run.get("peak_rss_mb"),
        "bank_mb": run.get("tokens", {}).get("bank_mb"),
    }


def bench_memory(cfg: dict, device: torch.device, out: Path) -> dict:
    """Bundle runs at B and 2B: fresh runs (lowest peak of ``repeats``), then from their caches.

    The encoding runs' peak moves from run to run (the loader's prefetch queue at the moment of the
    peak), hence the lowest of the repeats. The peak's growth is compared with the bank's.
    """
    mem = cfg["memory"]
    sizes = (mem["b"], 2 * mem["b"])
    source, desc = _cohort(cfg, out, sizes[1])
    jobs = [(_subset(source, n, out / "subsets" / f"B{n}"), out / "runs" / f"B{n}") for n in sizes]
    runs: dict[int, dict] = {}
    for _ in range(max(1, mem["repeats"])):
        for n, (dataset, run_dir) in zip(sizes, jobs, strict=True):
            run = _bundle_run(dataset, run_dir, mem["overrides"], device, fresh=True)
            run["peaks_mb"] = runs.get(n, {}).get("peaks_mb", []) + [run["peak_rss_mb"]]
            if n not in runs or run["peak_rss_mb"] < runs[n]["peak_rss_mb"]:
                runs[n] = run
            runs[n]["peaks_mb"] = run["peaks_mb"]
    cached = {n: _bundle_run(*job, mem["overrides"], device, fresh=False) for n, job in zip(sizes, jobs, strict=True)}
    b1, b2 = sizes

    def growth(rs: dict[int, dict]) -> dict:
        rss, bank = rs[b2]["peak_rss_mb"] - rs[b1]["peak_rss_mb"], rs[b2]["bank_mb"] - rs[b1]["bank_mb"]
        return {"rss_growth_mb": round(rss, 1), "bank_growth_mb": round(bank, 2), "ratio": significant(rss / bank, 3)}

    e2e = [
        {"B": n, **{s: significant(r["timings_s"].get(s, 0.0) / n, 3) for s in STAGES}}
        | {"total": significant(sum(r["timings_s"].get(s, 0.0) for s in STAGES) / n, 3)}
        | {"wall": significant(r["wall_s"] / n, 3)}
        for n, r in runs.items()
    ]
    return {
        "cohort": desc,
        "overrides": mem["overrides"],
        "runs": [{"B": n, "tokens": "encoded", **r} for n, r in runs.items()]
        + [{"B": n, "tokens": "from cache", **r} for n, r in cached.items()],
        "encoded": growth(runs),
        "cached": growth(cached),
        "e2e": e2e,
    }


# ---------------------------------------------------------------------------------------------- command
def run_performance(
    quick: bool = False,
    device: str = "cpu",
    out: str | Path = "bench_out/performance",
    sections: Sequence[str] | None = None,
    threads: int | None = None,
    cache: str | None = None,
    c2f_key: str = "axial/0",
    memory_b: int | None = None,
    doc: str | Path | None = None,
    verbose: bool = True,
) -> dict:
    """Run the chosen sections; write ``<out>/performance.json`` and the report (``doc`` or
    ``<out>/performance.md``). A failing section is recorded as ``{"error": ...}`` and the others run.

    Raises:
        ValueError: an unknown section, CUDA unavailable, or a ``doc`` without the block markers.
    """
    from scripts.benchmarks.performance_report import check_doc, evaluate_targets, write_markdown

    chosen = list(sections or SECTIONS)
    if unknown := [s for s in chosen if s not in SECTIONS]:
        raise ValueError(f"unknown sections {unknown}; choose from {list(SECTIONS)}")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but torch.cuda.is_available() is False")
    out = in_bundle(out)
    doc_path = in_bundle(doc) if doc else out / "performance.md"
    check_doc(doc_path)  # before minutes of measuring
    if threads:
        torch.set_num_threads(int(threads))
    cfg = copy.deepcopy(QUICK if quick else FULL)
    if memory_b:
        cfg["memory"]["b"] = int(memory_b)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    options = {"device": None if device == "cpu" else device, "threads": threads, "cache": cache}
    command = "python -m scripts.benchmarks performance" + (" --quick" if quick else "")
    command += "".join(f" --{k} {v}" for k, v in options.items() if v)
    res: dict = {
        "meta": {
            "command": command,
            "quick": quick,
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "sections": chosen,
            "section_s": {},
        },
        "machine": machine_info(dev),
    }
    work = {
        "scoring": lambda: bench_scoring(cfg, dev, cache),
        "c2f": lambda: bench_c2f_section(cfg, dev, cache, c2f_key),
        "tokenize": lambda: bench_tokenize(cfg, dev),
        "memory": lambda: bench_memory(cfg, dev, out),
    }
    for name in chosen:
        if verbose:
            print(f"[performance {time.perf_counter() - started:6.1f}s] {name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            res[name] = work[name]()
        except Exception as err:  # recorded and rendered: the other sections still run
            res[name] = {"error": f"{type(err).__name__}: {' '.join(str(err).split())[:500]}"}
            res["meta"].setdefault("errors", {})[name] = traceback.format_exc()[-3000:]
        res["meta"]["section_s"][name] = round(time.perf_counter() - t0, 1)
    res["targets"] = evaluate_targets(res)
    res["meta"]["wall_s"] = round(time.perf_counter() - started, 1)
    res["machine"]["loadavg_end"] = loadavg()
    res = jsonable(res)
    (out / "performance.json").write_text(json.dumps(res, indent=2))
    write_markdown(res, doc_path)
    for target in res["targets"]:
        print(f"{'MET   ' if target['met'] else 'MISSED'} {target['target']}: {target['value']}")
    return res
