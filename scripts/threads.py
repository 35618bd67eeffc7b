"""torch's CPU threads fitted to the machine's load for the whole run, not only at its start.

On busy cores every parallel GEMM waits for the time slice of its slowest thread: a run that keeps two
threads after another job started beside it can be several times slower than with one. So a run probes at
its start which thread count is faster now, and probes again at the next progress step once
:data:`RECHECK_S` seconds have passed (:func:`recheck`, called by :class:`scripts.progress.Progress`).
Threads change only between two steps, and the kernels CS3F runs give the same bits with 1 or 2 threads
(tested), so outputs do not depend on when the probe changed its mind.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

__all__ = ["RECHECK_S", "TORCH_THREADS", "FittedThreads", "probe_threads", "recheck"]

TORCH_THREADS = torch.get_num_threads()  # OMP_NUM_THREADS or the cores, before any run changes it
RECHECK_S = 10.0  # seconds between two probes: a probe costs about 0.1 % of that


def probe_threads(most: int | None = None, calls: int = 16) -> int:
    """``most`` threads (default :data:`TORCH_THREADS`) if ``calls`` small GEMMs take less time with them
    than with one (on busy cores every parallel call stalls for a time slice), else 1. Leaves torch's
    threads at the count it tried last."""
    most = TORCH_THREADS if most is None else most
    if most <= 1:
        return 1
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, 128, generator=gen), torch.randn(128, 256, generator=gen)
    spent = {}
    for threads in (1, most):
        torch.set_num_threads(threads)
        start = time.perf_counter()
        for _ in range(calls):
            torch.mm(a, b).amin(dim=1)
            if threads > 1 and time.perf_counter() - start > spent[1]:
                return 1
        spent[threads] = time.perf_counter() - start
    return most


class FittedThreads:
    """The CPU threads of one run: ``fixed`` if given, else what :func:`probe_threads` finds, re-probed at most
    every ``interval`` seconds by :meth:`recheck`. A context manager: on exit torch's threads are restored.

    Args:
        fixed: a thread count to keep (``None``: probe).
        interval: seconds between two probes (default :data:`RECHECK_S`).
        probe: returns the thread count to use now (default :func:`probe_threads`).
        clock: seconds of a monotonic clock.
    """

    def __init__(
        self,
        fixed: int | None = None,
        interval: float | None = None,
        probe: Callable[[], int] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.fixed, self.clock = fixed, clock
        self.interval = RECHECK_S if interval is None else float(interval)
        self.probe = probe or probe_threads
        self.counts: list[int] = []  # every count set, in order (for the run record)
        self._previous, self._last = torch.get_num_threads(), -float("inf")

    def __enter__(self) -> FittedThreads:
        global _active
        self._previous, _active = torch.get_num_threads(), self
        self._set(self.fixed or self.probe())
        return self

    def __exit__(self, *exc: object) -> None:
        global _active
        if _active is self:
            _active = None
        torch.set_num_threads(self._previous)

    def recheck(self) -> None:
        """Probe again if ``interval`` seconds have passed since the last probe (a fixed count stays)."""
        if self.fixed is None and self.clock() - self._last >= self.interval:
            self._set(self.probe())

    def _set(self, threads: int) -> None:
        torch.set_num_threads(threads)
        self._last = self.clock()
        if not self.counts or self.counts[-1] != threads:
            self.counts.append(threads)


_active: FittedThreads | None = None


def recheck() -> None:
    """Between two steps of a long loop: let the running :class:`FittedThreads`, if any, probe again."""
    if _active is not None:
        _active.recheck()
