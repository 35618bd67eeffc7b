"""Command line of the benchmarks: ``python -m scripts.benchmarks {run,c2f,scaling} ...``.

Usage from the bundle root::

    python -m scripts.benchmarks run --quick                       # all sections, bench_out/performance.md
    python -m scripts.benchmarks run --sections scoring,profile --threads 1
    python -m scripts.benchmarks run --doc docs/performance.md     # rewrite the tracked report
    python -m scripts.benchmarks c2f --B 24 --n_coarse 2048 --h 4 --Ls 1,4,16,64
    python -m scripts.benchmarks mixed --cache eval/tokens           # mixed precision vs fp32 vs baseline
    python -m scripts.benchmarks gpu                                 # the paper's brain setting on a GPU
    python -m scripts.benchmarks scaling metrics --cohort COHORT --out RUNS
    python -m scripts.benchmarks scaling costs --bank BANK --sizes 16,32,64

The parser imports nothing heavy: torch and the measuring modules load only when a command runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from scripts.benchmarks.settings import SECTIONS

# Defaults of scripts.benchmarks.c2f.bench_c2f, for the help text (a test keeps them equal). Options
# left out on the command line are not passed, so bench_c2f's own defaults apply.
C2F_DEFAULTS = {
    "B": 24,
    "n_coarse": 2048,
    "h": 4,
    "d": 128,
    "Ls": (1, 4, 16, 64),
    "repeats": 1,
    "device": "cpu",
    "rho": 0.1,
    "query_volumes": 2,
    "tokens": "random",
    "threads": None,
    "seed": 0,
}
C2F_KEY = "axial/0"  # default grid of a token cache (scripts.benchmarks.c2f.main)


def _int_list(text: str) -> list[int]:
    """``"1,4,16"`` or ``"[1,4,16]"`` -> ``[1, 4, 16]``."""
    return [int(v) for v in text.strip("[]() ").split(",") if v.strip()]


def _optional_int(text: str) -> int | None:
    """An integer, or ``all``/``none`` for ``None``."""
    return None if text.lower() in ("all", "none") else int(text)


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="the benchmark harness: " + ", ".join(SECTIONS),
        description="Measure the harness sections; write <out>/bench.json and the markdown report "
        "(<out>/performance.md unless --doc names another file).",
    )
    p.add_argument(
        "--quick", action="store_true", help="tiny sizes (about half a minute): figures exist, not meaningful"
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (default %(default)s)")
    p.add_argument(
        "--out", default="bench_out", help="output folder, relative to the bundle root (default %(default)s)"
    )
    p.add_argument("--sections", help="comma-separated subset of " + ",".join(SECTIONS) + " (default all)")
    p.add_argument("--threads", type=int, help="torch intra-op threads for the run")
    p.add_argument("--memory_b", "--memory-b", dest="memory_b", type=int, help="B of the B/2B bundle runs")
    p.add_argument(
        "--doc",
        help="markdown file whose generated block is rewritten, e.g. docs/performance.md "
        "(default <out>/performance.md)",
    )


def _add_c2f(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "c2f",
        help="coarse-to-fine routing vs exhaustive fine scoring",
        description="Time C2F against exhaustive fine scoring and measure their agreement "
        "(scripts.benchmarks.c2f.bench_c2f); print a table and the JSON result.",
        argument_default=argparse.SUPPRESS,
    )
    d = C2F_DEFAULTS
    p.add_argument("--B", type=int, help=f"volumes in the batch (default {d['B']})")
    p.add_argument("--n_coarse", type=int, help=f"coarse tokens per volume N_c (default {d['n_coarse']})")
    p.add_argument("--h", type=int, help=f"fine children per coarse token (default {d['h']})")
    p.add_argument("--d", type=int, help=f"token dimension (default {d['d']})")
    p.add_argument(
        "--Ls", type=_int_list, help=f"routing budgets, e.g. 1,4,16,64 (default {','.join(map(str, d['Ls']))})"
    )
    p.add_argument("--repeats", type=int, help=f"interleaved timing rounds (default {d['repeats']})")
    p.add_argument("--device", help=f"cpu or cuda (default {d['device']})")
    p.add_argument("--rho", type=float, help=f"neighbour ratio (default {d['rho']})")
    p.add_argument(
        "--query_volumes", type=_optional_int, help=f"query volumes timed, or 'all' (default {d['query_volumes']})"
    )
    p.add_argument("--tokens", choices=("random", "structured"), help=f"synthetic token kind (default {d['tokens']})")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: unchanged)")
    p.add_argument("--seed", type=int, help=f"token seed (default {d['seed']})")
    p.add_argument("--cache", help="token cache folder of an F/MS bundle run: real tokens instead of synthetic")
    p.add_argument("--key", help=f"axis/layer grid of the cache (default {C2F_KEY})")


def _add_scaling(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "scaling",
        help="the reference sets: all, chunks:N, random:N, a bank (docs/scaling.md)",
        description="The measurements behind docs/scaling.md (scripts.benchmarks.scaling).",
    )
    parts = p.add_subparsers(dest="part", required=True, metavar="{metrics,costs}")
    m = parts.add_parser("metrics", help="bundle + evaluation per setting; a markdown table of metrics")
    m.add_argument("--cohort", required=True, help="synthetic cohort folder (python -m scripts synth)")
    m.add_argument("--out", required=True, help="folder for the runs")
    m.add_argument("--cache", help="shared token cache (default <out>/tokens)")
    m.add_argument("--settings", help="comma-separated settings (default all)")
    m.add_argument("--threads", type=int, default=1, help="bundle threads (default %(default)s)")
    c = parts.add_parser("costs", help="scoring time and peak-memory growth per (B, setting)")
    c.add_argument("--bank", required=True, help="token bank folder (configs/build_bank.json)")
    c.add_argument("--sizes", default="16,32,64", help="batch sizes B (default %(default)s)")
    c.add_argument(
        "--settings", default="full,chunks:16,random:16,bank", help="comma-separated settings (default %(default)s)"
    )
    c.add_argument("--threads", type=int, default=1, help="torch threads (default %(default)s)")


def _add_quality(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quality",
        help="detection quality of config variants and baselines over fixed cohorts (docs/quality.md)",
        description="Every variant on every cohort with configs/evaluate.json, two baselines, mean ± sd "
        "over the cohorts (scripts.benchmarks.quality).",
    )
    p.add_argument("--out", default="bench_out/quality", help="working folder (default %(default)s)")
    p.add_argument(
        "--cohorts", help="comma-separated cohort names (default: the five study cohorts; confirmation ones by name)"
    )
    p.add_argument("--variants", help="comma-separated variant names (default: all)")
    p.add_argument("--quick", action="store_true", help="tiny cohorts and encoder input: a smoke run")
    p.add_argument("--doc", help="also write the report here, e.g. docs/quality.md")
    p.add_argument("--maps", help="map variants from one MS scoring pass per cohort, e.g. C,F,MS")
    p.add_argument("--smooth", default="0", help="smooth_mm values of the map variants (default %(default)s)")


def _add_mixed(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "mixed",
        help="mixed-precision scoring vs the exact fp32 scorer vs the MuSc-style baseline",
        description="Time the three scorers interleaved on random unit tokens and on the real tokens of a "
        "token cache; print a table and the JSON result (scripts.benchmarks.mixed_bench).",
    )
    p.add_argument("--B", type=int, default=24, help="volumes of the random case (default %(default)s)")
    p.add_argument("--N", type=int, default=2048, help="tokens per volume (default %(default)s)")
    p.add_argument("--d", type=int, default=128, help="token dimension (default %(default)s)")
    p.add_argument("--cache", help="token cache of a bundle run (e.g. eval/tokens after the demo): real tokens")
    p.add_argument("--keys", choices=("all", "largest"), default="all", help="(axis, layer) grids of the cache")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (default %(default)s)")
    p.add_argument("--rho", type=float, default=0.1, help="neighbour ratio (default %(default)s)")
    p.add_argument("--threads", dest="threads_", type=int, help="torch intra-op threads (default: unchanged)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default %(default)s)")
    p.add_argument(
        "--precision", default="auto", help="reduced-precision pass: auto, bf16 or tf32 (default %(default)s)"
    )


def _add_gpu(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "gpu",
        help="the paper's brain setting end to end on a GPU (beside the paper's Table 6)",
        description="Synthetic 224^3 cohort, DINOv2-L/14 (models/dinov2-large, or random weights of its "
        "shapes), configs/paper_brain_mri.json, C and MS: seconds per volume and stage, peak VRAM, GPU "
        "utilisation, distance passes of the scorer (scripts.benchmarks.gpu). --tiny: the CPU smoke run.",
    )
    p.add_argument("--B", type=int, default=180, help="volumes (default %(default)s, the paper's)")
    p.add_argument("--size", type=int, default=224, help="volume side in voxels (default %(default)s)")
    p.add_argument("--variants", default="C,MS", help="comma-separated variants (default %(default)s)")
    p.add_argument("--out", default="bench_out/gpu", help="output folder (default %(default)s)")
    p.add_argument("--tiny", action="store_true", help="toy sizes on the CPU (B 4, 28^3, a 2-layer ViT): CI")
    p.add_argument("--workers", type=int, default=8, help="data loader processes (default %(default)s)")
    p.add_argument("--pool", type=int, default=32, help="distinct synthetic subjects (default %(default)s)")
    p.add_argument("--score_precision", default="auto", help="score_precision of the runs (default auto)")
    p.add_argument("--encoder_precision", default="auto", help="encoder_precision of the runs (default auto)")
    p.add_argument("--timeout_s", type=int, default=1800, help="limit per bundle run (default %(default)s)")
    p.add_argument("--precision_repeats", type=int, default=2, help="rounds of the distance-pass timing")
    p.add_argument("--doc", help="also rewrite the GPU block of this file, e.g. docs/performance.md")
    p.add_argument("--render", dest="render_json", help="only render this gpu.json (e.g. from a GPU machine)")


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m scripts.benchmarks``."""
    parser = argparse.ArgumentParser(
        prog="python -m scripts.benchmarks", description="Benchmarks of the CS3F bundle (run from the bundle root)."
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="{run,c2f,scaling,quality,mixed,gpu,registration}"
    )
    _add_run(sub)
    _add_c2f(sub)
    _add_mixed(sub)
    _add_gpu(sub)
    _add_scaling(sub)
    _add_quality(sub)
    from scripts.benchmarks.registration import add_parser as add_registration  # light: argparse only

    add_registration(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the command; returns the exit status."""
    args = vars(build_parser().parse_args(argv))
    command = args.pop("command")
    if command == "run":
        from scripts.benchmarks.harness import print_targets, run_bench

        print_targets(run_bench(**args))
    elif command == "c2f":
        from scripts.benchmarks.c2f import main as c2f_main

        c2f_main(**args)
    elif command == "gpu":
        from scripts.benchmarks.gpu import main as gpu_main

        return gpu_main(**args)
    elif command == "mixed":
        from scripts.benchmarks.mixed_bench import main as mixed_main

        mixed_main(**args)
    elif command == "registration":
        from scripts.benchmarks.registration import main as registration_main

        return registration_main(**args)
    elif command == "quality":
        from scripts.benchmarks.quality import run_quality

        for key in ("cohorts", "variants", "maps"):
            args[key] = args[key].split(",") if args[key] else None
        args["smooth"] = [float(v) for v in args["smooth"].split(",")]
        run_quality(**args)
    else:
        from scripts.benchmarks import scaling

        getattr(scaling, args.pop("part"))(**args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
