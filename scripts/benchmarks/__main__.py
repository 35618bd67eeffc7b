"""``python -m scripts.benchmarks COMMAND ...``, run from the bundle root; the parser imports nothing heavy."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

PERFORMANCE_SECTIONS = ("scoring", "c2f", "tokenize", "memory")  # scripts.benchmarks.performance.SECTIONS
#: command -> (module, function) that runs it with the parsed options
RUN = {"quality": ("quality", "run_quality"), "performance": ("performance", "run_performance")}
RUN |= {"gpu": ("gpu", "main"), "registration": ("registration_accuracy", "main")}


def _csv(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m scripts.benchmarks``."""
    parser = argparse.ArgumentParser(
        prog="python -m scripts.benchmarks", description="Benchmarks of the CS3F bundle (run from the bundle root)."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{quality,performance,scaling,gpu,registration}")
    p = sub.add_parser("quality", help="detection quality of config variants and baselines (docs/quality.md)")
    p.add_argument("--out", default="bench_out/quality", help="working folder (default %(default)s)")
    p.add_argument(
        "--set",
        dest="cohort_set",
        choices=("study", "confirmation", "sealed"),
        default="study",
        help="cohort set: the study's, its confirmation seeds, or the sealed set that chooses nothing and is run "
        "once per release (default %(default)s)",
    )
    p.add_argument("--cohorts", type=_csv, help="comma-separated cohort names (default: all of the set)")
    p.add_argument("--variants", type=_csv, help="comma-separated variant names (default: all)")
    p.add_argument("--quick", action="store_true", help="tiny cohorts and encoder input: a smoke run")
    p.add_argument("--doc", help="also write the report here, e.g. docs/quality.md")

    p = sub.add_parser("performance", help="scoring, C2F, tokenization and memory figures (docs/performance.md)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: the figures exist, not meaningful")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default %(default)s)")
    p.add_argument("--out", default="bench_out/performance", help="output folder (default %(default)s)")
    p.add_argument("--sections", type=_csv, help=f"comma-separated subset of {','.join(PERFORMANCE_SECTIONS)}")
    p.add_argument("--threads", type=int, help="torch intra-op threads for the run")
    p.add_argument("--cache", help="token cache of a bundle run: also score (and with F/MS tokens route) real tokens")
    p.add_argument("--c2f_key", default="axial/0", help="axis/layer grid of --cache for C2F (default %(default)s)")
    p.add_argument("--memory_b", type=int, help="B of the B/2B bundle runs (default 8, quick 2)")
    p.add_argument("--doc", help="markdown file whose generated block is rewritten, e.g. docs/performance.md")

    p = sub.add_parser("scaling", help="the reference sets: all, chunks:N, random:N, a bank (docs/scaling.md)")
    parts = p.add_subparsers(dest="part", required=True, metavar="{metrics,costs,threads}")
    p = parts.add_parser("metrics", help="bundle + evaluation per setting; a markdown table of metrics")
    p.add_argument("--cohort", required=True, help="synthetic cohort folder (python -m scripts synth)")
    p.add_argument("--out", required=True, help="folder for the runs")
    p.add_argument("--cache", help="shared token cache (default <out>/tokens)")
    p.add_argument("--settings", help="comma-separated settings (default all)")
    p.add_argument("--threads", type=int, default=1, help="bundle threads (default %(default)s)")
    p = parts.add_parser("costs", help="scoring time and peak-memory growth per (B, setting)")
    p.add_argument("--bank", required=True, help="token bank folder (configs/build_bank.json)")
    p.add_argument("--sizes", default="16,32,64", help="batch sizes B (default %(default)s)")
    p.add_argument("--settings", default="full,chunks:16,random:16,bank", help="settings (default %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default %(default)s)")
    p = parts.add_parser("threads", help="re-scoring one cached cohort with 1, 2 and the default threads")
    p.add_argument("--out", required=True, help="folder for the cohort, its token cache and the runs")
    p.add_argument("--volumes", type=int, default=200, help="volumes (default %(default)s; the demo: 32)")
    p.add_argument("--size", type=int, default=16, help="volume side (default %(default)s; the demo: 96)")
    p.add_argument("--image_size", type=int, default=32, help="encoder input R (default %(default)s; the demo: 112)")
    p.add_argument("--settings", default="1,2,default", help="thread counts (default %(default)s)")
    p.add_argument("--rounds", type=int, default=1, help="rounds of the settings, alternated (default %(default)s)")
    p.add_argument("--busy", type=int, default=0, help="spinning processes beside each run (default %(default)s)")

    p = sub.add_parser(
        "gpu", help="the paper's brain setting end to end on a GPU, beside its Table 6 (docs/performance.md)"
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

    p = sub.add_parser("registration", help="registration to MNI152: native-space demo, Colin27 (docs/registration.md)")
    p.add_argument("--out", default="bench_out/registration", help="output folder (default %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="threads of the registration (default %(default)s)")
    p.add_argument("--limit", type=int, help="register only the first N native volumes")
    p.add_argument("--bundle", action="store_true", help="also run the bundle on both cohorts (detection)")
    p.add_argument("--sections", default="native,colin27", help="native, colin27 or none (default %(default)s)")
    p.add_argument("--libraries", type=int, default=0, help="SimpleITK, itk-elastix, ANTsPy on the first N volumes")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the command; returns the exit status."""
    args = vars(build_parser().parse_args(argv))
    command = args.pop("command")
    module, function = RUN.get(command) or ("scaling", args.pop("part"))
    status = getattr(importlib.import_module(f"scripts.benchmarks.{module}"), function)(**args)
    return status if isinstance(status, int) else 0


if __name__ == "__main__":
    sys.exit(main())
