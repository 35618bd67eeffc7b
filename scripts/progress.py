"""Named stages with counts, rate and time left: a tqdm bar on a terminal, else plain lines (at most one
every ``interval`` seconds, plus the last), e.g. ``cs3f: encoding volume 12/32 [0.81 vol/s, 25 s left]``.

Every step of a stage, shown or not, is also where the run may fit its CPU threads to the machine's load
again (:func:`scripts.threads.recheck`): steps are the points between two pieces of work."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from scripts.threads import recheck as recheck_threads

__all__ = ["INTERVAL_S", "Progress", "format_seconds", "now"]

INTERVAL_S = 5.0  # seconds between two plain lines of one stage


def now() -> float:
    """Seconds of a monotonic clock (the default time source)."""
    return time.monotonic()


def format_seconds(seconds: float) -> str:
    """``42 s``, ``3 min 5 s`` or ``1 h 02 min``."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class Progress:
    """One named stage of ``total`` steps.

    Args:
        stage, total, unit: what is being done (``"encoding volume"``), its steps, the rate's unit (``"vol"``).
        enabled: ``False`` shows nothing (``--quiet``).
        stream, interval, clock: default ``sys.stderr``, :data:`INTERVAL_S`, :func:`now`.
    """

    def __init__(
        self,
        stage: str,
        total: int,
        unit: str = "it",
        enabled: bool = True,
        stream: TextIO | None = None,
        interval: float | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.stage, self.total, self.unit = stage, int(total), unit
        self.enabled, self.clock = bool(enabled), clock or now
        self.interval = INTERVAL_S if interval is None else float(interval)
        self.stream = sys.stderr if stream is None else stream
        self.done, self.detail, self.start = 0, "", self.clock()
        self._last_line = -float("inf")
        self._bar = None
        if self.enabled and _is_terminal(self.stream):
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, desc=stage, unit=unit, file=self.stream, dynamic_ncols=True)

    def update(self, n: int = 1, detail: str = "") -> None:
        """``n`` more steps done; ``detail`` says where inside the stage the work is."""
        self.done, self.detail = self.done + n, detail
        recheck_threads()
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            if detail:
                self._bar.set_postfix_str(detail, refresh=False)
        elif self.done >= self.total or self.clock() - self._last_line >= self.interval:
            self._write_line()

    def update_to(self, done: int, total: int, detail: str = "") -> None:
        """Progress as ``done`` of ``total`` steps (a callback for loops that count their own work)."""
        self.total = int(total)
        if self._bar is not None:
            self._bar.total = self.total
        self.update(done - self.done, detail)

    def close(self) -> None:
        """End the stage (the bar stays on screen; a plain stream gets its last line if not yet written)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled and self._last_line < self.start and self.done:
            self._write_line()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def line(self) -> str:
        elapsed = self.clock() - self.start
        text = f"cs3f: {self.stage} {self.done}/{self.total}"
        if self.detail:
            text += f" ({self.detail})"
        if elapsed > 0 and self.done:
            rate = self.done / elapsed
            left = (self.total - self.done) / rate
            text += f" [{rate:.3g} {self.unit}/s, {format_seconds(left)} left]"
        return text

    def _write_line(self) -> None:
        self._last_line = self.clock()
        self.stream.write(self.line() + "\n")
        self.stream.flush()


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False
