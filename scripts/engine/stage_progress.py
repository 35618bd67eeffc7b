"""The two passes of a run (``encoding volume i/B``, ``writing maps i/B``) as :class:`scripts.progress.Progress`
stages, shown by the first process only (an ignite handler)."""

from __future__ import annotations

from ignite.engine import Engine, Events
from scripts.engine.distributed import world
from scripts.progress import Progress

__all__ = ["StageProgress"]

STAGES = {1: ("encoding volume", "vol"), 2: ("writing maps", "map")}


class StageProgress:
    """Progress of each pass of a :class:`scripts.engine.evaluator.CS3FEvaluator` (``attach`` it)."""

    def __init__(self) -> None:
        self.progress: Progress | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._step)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._end)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._end)

    def _start(self, engine: Engine) -> None:
        stage, unit = STAGES.get(engine.state.epoch, (f"pass {engine.state.epoch}", "it"))
        self.progress = Progress(stage, engine.state.epoch_length or 0, unit=unit, enabled=world()[0] == 0)

    def _step(self, engine: Engine) -> None:
        if self.progress is not None:
            self.progress.update()

    def _end(self, engine: Engine, *_: object) -> None:
        if self.progress is not None:
            self.progress.close()
            self.progress = None
