"""Helper commands of the bundle (the bundle itself runs through ``python -m monai.bundle``).

Usage from the bundle root::

    python -m scripts synth --out demo_data --n_normal 20 --n_abnormal 12   # a synthetic cohort
    python -m scripts synth --help
    python -m scripts export_model                                           # models/model.pt

Benchmarks are not a command of the bundle: they run with ``python -m scripts.benchmarks``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

USAGE = """usage: python -m scripts COMMAND [options]

commands:
  synth           write a synthetic brain-MRI or chest-CT cohort (python -m scripts synth --help)
  export_model    write models/model.pt, the weights of network_def (python -m scripts export_model --help)

Benchmarks run with python -m scripts.benchmarks."""


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch ``argv`` (default ``sys.argv[1:]``) to its command; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "synth":
        from scripts.synthetic.cli import main as synth  # lazily: the generators import torch

        return synth(rest)
    if command == "export_model":
        from scripts.export import main as export_model  # lazily: imports torch and monai

        return export_model(rest)
    print(
        f"cs3f: error: unknown command {command!r}; known: synth, export_model (see python -m scripts --help)",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
