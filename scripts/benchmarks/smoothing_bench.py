"""Map smoothing: MONAI's ``GaussianSmooth`` against the bundle's banded-matrix filter, interleaved.

``python -m scripts.benchmarks.smoothing_bench [--size 96] [--sigma 3] [--rounds 7]`` times the normalised
smoothing of one map and its mask (two channels, as :func:`scripts.anomaly_map.smooth_map` filters them)
three ways, interleaved (A B C A B C ...): MONAI one channel at a time (map, then mask), MONAI both channels
in one call, and the banded matrices of :func:`scripts.anomaly_map.gaussian_filter`. It prints the median
seconds, the median per-round ratios to the banded filter and the largest difference from MONAI.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from monai.transforms import GaussianSmooth
from scripts.anomaly_map import gaussian_filter
from scripts.benchmarks.timing import interleaved, ratio


def bench_smoothing(size: int = 96, sigma: float = 3.0, rounds: int = 7) -> dict:
    """Interleaved timing of the three ways on a ``[2, size, size, size]`` volume (sigma in voxels)."""
    volume = torch.rand(2, size, size, size, generator=torch.Generator().manual_seed(0))
    sigmas = [sigma] * 3
    monai_filter = GaussianSmooth(sigma=sigmas)
    ways = {
        "monai_per_channel": lambda: torch.cat([torch.as_tensor(monai_filter(c[None])) for c in volume]),
        "monai_two_channels": lambda: torch.as_tensor(monai_filter(volume)),
        "banded": lambda: gaussian_filter(volume, sigmas),
    }
    times, outs = interleaved(list(ways.values()), torch.device("cpu"), rounds, time_budget=120.0)
    res: dict = {"size": size, "sigma_voxels": sigma, "threads": torch.get_num_threads()}
    for (name, _), t, out in zip(ways.items(), times, outs, strict=True):
        res[name] = {
            "s": statistics.median(t),
            "ratio_to_banded": ratio(t, times[-1]),
            "max_abs_diff_to_monai": float((out - outs[0]).abs().max()),
        }
    return res


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=96, help="edge of the cubic volume (default %(default)s)")
    parser.add_argument("--sigma", type=float, default=3.0, help="sigma in voxels (default %(default)s: 6 mm at 2 mm)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default %(default)s)")
    args = parser.parse_args(argv)
    res = bench_smoothing(args.size, args.sigma, args.rounds)
    print(f"{res['size']}^3 x 2 channels, sigma {res['sigma_voxels']} voxels, {res['threads']} threads")
    for name in ("monai_per_channel", "monai_two_channels", "banded"):
        r = res[name]
        print(
            f"{name:20s} {r['s'] * 1e3:7.1f} ms  {r['ratio_to_banded']:5.1f}x the banded filter  "
            f"max |difference| to MONAI per channel {r['max_abs_diff_to_monai']:.1e}"
        )


if __name__ == "__main__":
    main()
