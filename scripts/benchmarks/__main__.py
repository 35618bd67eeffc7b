"""Command line of the benchmarks: ``python -m scripts.benchmarks {quality,performance,scaling,gpu} ...``.

Usage from the bundle root::

    python -m scripts.benchmarks quality --quick                     # detection quality (docs/quality.md)
    python -m scripts.benchmarks performance --doc docs/performance.md
    python -m scripts.benchmarks scaling metrics --cohort COHORT --out RUNS
    python -m scripts.benchmarks scaling costs --bank BANK --sizes 16,32,64
    python -m scripts.benchmarks gpu --B 32 --doc docs/performance.md  # on a CUDA machine; --tiny on a CPU

The parser imports nothing heavy: torch and the measuring modules load only when a command runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

PERFORMANCE_SECTIONS = ("scoring", "c2f", "tokenize", "memory")  # scripts.benchmarks.performance.SECTIONS


def _csv(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _add_quality(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quality",
        help="detection quality of config variants and baselines over fixed cohorts (docs/quality.md)",
        description="Every variant on every cohort with configs/evaluate.json, two baselines, mean ± sd "
        "over the cohorts (scripts.benchmarks.quality).",
    )
    p.add_argument("--out", default="bench_out/quality", help="working folder (default %(default)s)")
    p.add_argument("--cohorts", type=_csv, help="comma-separated cohort names (default: the five study cohorts)")
    p.add_argument("--variants", type=_csv, help="comma-separated variant names (default: all)")
    p.add_argument("--quick", action="store_true", help="tiny cohorts and encoder input: a smoke run")
    p.add_argument("--doc", help="also write the report here, e.g. docs/quality.md")


def _add_performance(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "performance",
        help="scoring, C2F, tokenization and memory figures (docs/performance.md)",
        description="Measure the sections; write <out>/performance.json and the markdown report "
        "(<out>/performance.md unless --doc names another file) (scripts.benchmarks.performance).",
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes: the figures exist, not meaningful")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default %(default)s)")
    p.add_argument("--out", default="bench_out/performance", help="output folder (default %(default)s)")
    p.add_argument(
        "--sections", type=_csv, help="comma-separated subset of " + ",".join(PERFORMANCE_SECTIONS) + " (default all)"
    )
    p.add_argument("--threads", type=int, help="torch intra-op threads for the run")
    p.add_argument("--cache", help="token cache of a bundle run: also score (and with F/MS tokens route) real tokens")
    p.add_argument("--c2f_key", default="axial/0", help="axis/layer grid of --cache for C2F (default %(default)s)")
    p.add_argument("--memory_b", type=int, help="B of the B/2B bundle runs (default 8, quick 2)")
    p.add_argument("--doc", help="markdown file whose generated block is rewritten, e.g. docs/performance.md")


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
    p.add_argument("--tiny", action="store_true", help="toy sizes on the CPU (B 4, 28^3, a 2-layer ViT)")
    p.add_argument("--workers", type=int, default=8, help="data loader processes (default %(default)s)")
    p.add_argument("--pool", type=int, default=32, help="distinct synthetic subjects (default %(default)s)")
    p.add_argument("--score_precision", default="auto", help="score_precision of the runs (default auto)")
    p.add_argument("--encoder_precision", default="auto", help="encoder_precision of the runs (default auto)")
    p.add_argument("--timeout_s", type=int, default=1800, help="limit per bundle run (default %(default)s)")
    p.add_argument("--doc", help="also rewrite the GPU block of this file, e.g. docs/performance.md")
    p.add_argument("--render", dest="render_json", help="only render this gpu.json (e.g. from a GPU machine)")


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m scripts.benchmarks``."""
    parser = argparse.ArgumentParser(
        prog="python -m scripts.benchmarks", description="Benchmarks of the CS3F bundle (run from the bundle root)."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{quality,performance,scaling,gpu,registration}")
    _add_quality(sub)
    _add_performance(sub)
    _add_scaling(sub)
    _add_gpu(sub)
    from scripts.benchmarks.registration_accuracy import add_parser as add_registration  # light: argparse only

    add_registration(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the command; returns the exit status."""
    args = vars(build_parser().parse_args(argv))
    command = args.pop("command")
    if command == "quality":
        from scripts.benchmarks.quality import run_quality

        run_quality(**args)
    elif command == "performance":
        from scripts.benchmarks.performance import run_performance

        run_performance(**args)
    elif command == "gpu":
        from scripts.benchmarks.gpu import main as gpu_main

        return gpu_main(**args)
    elif command == "registration":
        from scripts.benchmarks.registration_accuracy import main as registration_main

        return registration_main(**args)
    else:
        from scripts.benchmarks import scaling

        getattr(scaling, args.pop("part"))(**args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
