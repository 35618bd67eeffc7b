"""The run's CPU threads: the probe, and the re-probe between progress steps."""

from __future__ import annotations

import pytest
import torch
from scripts import threads
from scripts.progress import Progress


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.mark.parametrize(("slow_with", "expected"), [(4, 1), (1, 4)])
def test_the_probe_keeps_one_thread_where_the_threads_stall(
    monkeypatch: pytest.MonkeyPatch, slow_with: int, expected: int
) -> None:
    """The probe keeps torch's threads (here 4) only when its GEMMs take less time with them than with one."""
    now, calls, clock = {"threads": 1}, [], _Clock()
    monkeypatch.setattr(threads.torch, "set_num_threads", lambda n: now.update(threads=n))
    monkeypatch.setattr(threads.time, "perf_counter", clock)  # GEMM times set here, not by the machine's load

    def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        calls.append(now["threads"])
        clock.t += 0.004 if now["threads"] == slow_with else 0.001
        return torch.zeros(a.shape[0], b.shape[1])

    monkeypatch.setattr(threads.torch, "mm", mm)
    assert threads.probe_threads(4) == expected
    assert set(calls) == {1, 4} and (expected == 4 or calls.count(4) < calls.count(1))  # a stalled probe stops early
    calls.clear()
    assert threads.probe_threads(1) == 1 and calls == []  # OMP_NUM_THREADS=1: nothing to probe


def test_threads_are_probed_again_once_the_interval_has_passed() -> None:
    """Probed on entry, again at a step only after ``interval`` seconds; torch's count restored on exit."""
    before = torch.get_num_threads()
    answers, clock = iter([2, 1, 1, 2]), _Clock()
    fitted = threads.FittedThreads(interval=10.0, probe=lambda: next(answers), clock=clock)
    try:
        with fitted:
            assert torch.get_num_threads() == 2
            clock.t = 9.9
            threads.recheck()  # too soon: no probe
            assert torch.get_num_threads() == 2
            clock.t = 10.0
            threads.recheck()
            assert torch.get_num_threads() == 1
            clock.t = 25.0
            Progress("steps", 3, enabled=False).update()  # a step of any stage, shown or not, is a recheck
            assert torch.get_num_threads() == 1
            clock.t = 40.0
            Progress("steps", 3, enabled=False).update_to(2, 3)
            assert torch.get_num_threads() == 2
        assert fitted.counts == [2, 1, 2]  # the counts the run went through, for its record
        assert torch.get_num_threads() == before
        threads.recheck()  # no run: nothing happens
        assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)


def test_a_fixed_thread_count_is_never_probed() -> None:
    before = torch.get_num_threads()

    def probe() -> int:
        raise AssertionError("probed")

    clock = _Clock()
    with threads.FittedThreads(fixed=1, interval=0.0, probe=probe, clock=clock) as fitted:
        clock.t = 100.0
        threads.recheck()
        assert torch.get_num_threads() == 1 and fitted.counts == [1]
    assert torch.get_num_threads() == before
