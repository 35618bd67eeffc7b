"""Timing helpers shared by the sections: medians of repeats and interleaved A/B rounds.

The benchmark machines are shared, so absolute times drift with the load. Every figure is a median
of repeats, and comparisons are interleaved (A B A B ...) so that a load change hits both sides alike
and the per-round ratios stay meaningful.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence

import torch


def sync(device: torch.device) -> None:
    """Wait for queued kernels on ``device`` (CUDA runs asynchronously; the CPU needs nothing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sample(fn: Callable[[], object], device: torch.device, min_time: float = 0.0) -> tuple[float, object]:
    """One timing sample of ``fn``.

    Args:
        fn: the operation to time.
        device: where it runs (synchronised around the calls).
        min_time: ``fn`` is called repeatedly until this many seconds have elapsed, so that a
            short operation is not measured below the timer's resolution.

    Returns:
        ``(seconds per call, the last call's output)``.
    """
    sync(device)
    calls, start = 0, time.perf_counter()
    while True:
        out = fn()
        calls += 1
        sync(device)
        elapsed = time.perf_counter() - start
        if elapsed >= min_time:
            return elapsed / calls, out


def median_time(fn: Callable[[], object], device: torch.device, repeats: int, min_time: float) -> float:
    """Median seconds per call over ``repeats`` samples, after one warm-up call.

    The warm-up pays one-off costs (allocations, oneDNN primitive caches) outside the samples.
    """
    fn()
    return statistics.median(sample(fn, device, min_time)[0] for _ in range(max(1, repeats)))


def interleaved(
    fns: Sequence[Callable[[], object] | None],
    device: torch.device,
    repeats: int,
    time_budget: float,
    warmup: bool = True,
    min_times: Sequence[float] | None = None,
) -> tuple[list[list[float]], list[object]]:
    """Interleaved timing (A B C A B C ...): load changes hit all alike, so per-round ratios are robust.

    Args:
        fns: the operations; ``None`` entries are skipped (their sample list stays empty).
        device: where they run.
        repeats: number of rounds.
        time_budget: stop after the round in which this many seconds were exceeded (at least one round).
        warmup: call every function once before the first round.
        min_times: per function, the ``min_time`` of :func:`sample`.

    Returns:
        Per-function sample lists (seconds) and each function's last output.
    """
    times: list[list[float]] = [[] for _ in fns]
    outs: list[object] = [None for _ in fns]
    min_times = list(min_times) if min_times is not None else [0.0] * len(fns)
    if warmup:
        for fn in fns:
            if fn is not None:
                fn()
    start = time.perf_counter()
    for _ in range(max(1, repeats)):
        for k, fn in enumerate(fns):
            if fn is not None:
                t, outs[k] = sample(fn, device, min_times[k])
                times[k].append(t)
        if time.perf_counter() - start > time_budget:
            break
    return times, outs


def paired(
    fn_a: Callable[[], object],
    fn_b: Callable[[], object] | None,
    device: torch.device,
    repeats: int,
    time_budget: float,
    warmup: bool = True,
) -> tuple[list[float], list[float], object, object]:
    """Interleaved A/B timing (see :func:`interleaved`): ``(times_a, times_b, out_a, out_b)``."""
    (ta, tb), (out_a, out_b) = interleaved([fn_a, fn_b], device, repeats, time_budget, warmup)
    return ta, tb, out_a, out_b


def ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median of the per-round ratios ``num[i] / den[i]`` of an interleaved timing."""
    return statistics.median(a / b for a, b in zip(num, den, strict=True))


@contextlib.contextmanager
def threads(n: int | None) -> Iterator[None]:
    """Temporarily run torch ops with ``n`` intra-op threads (``None`` or 0: unchanged)."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def thread_counts(device: torch.device) -> list[int]:
    """The configured thread count, and 1 on a multi-threaded CPU run.

    On a shared CPU one thread can beat an oversubscribed team (threads stall in OpenMP barriers
    while another process holds a core), so CPU figures are measured both ways.
    """
    counts = [torch.get_num_threads()]
    if device.type == "cpu" and counts[0] > 1:
        counts.append(1)
    return counts


def loadavg() -> list[float] | None:
    """The 1/5/15-minute load averages, rounded (``None`` where the OS has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover - not on Linux
        return None
