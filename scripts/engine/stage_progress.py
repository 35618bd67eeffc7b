"""The two passes of a run (``encoding volume i/B``, ``writing maps i/B``) as :class:`scripts.progress.Progress`
stages, shown by the first process only (an ignite handler); with ``enabled`` off they still count the steps."""

from __future__ import annotations

from ignite.engine import Engine, Events
from scripts.engine.distributed import world
from scripts.progress import Progress

__all__ = ["StageProgress"]

STAGES = {1: ("encoding volume", "vol"), 2: ("writing maps", "map")}


class StageProgress:
    """Progress of each pass of a :class:`scripts.engine.evaluator.CS3FEvaluator` (``attach`` it)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.progress: Progress | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._step)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._end)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._failed)

    def _start(self, engine: Engine) -> None:
        stage, unit = STAGES.get(engine.state.epoch, (f"pass {engine.state.epoch}", "it"))
        shown = self.enabled and world()[0] == 0
        self.progress = Progress(stage, engine.state.epoch_length or 0, unit=unit, enabled=shown)

    def _step(self, engine: Engine) -> None:
        if self.progress is not None:
            self.progress.update()

    def _end(self, engine: Engine, *_: object) -> None:
        if self.progress is not None:
            self.progress.close()
            self.progress = None

    def _failed(self, engine: Engine, err: BaseException) -> None:
        """The stage ends with the run's error, which goes on up (ignite raises it only with no handler)."""
        self._end(engine)
        raise err
