"""The run record (``run.json``): what a run did, with what, how long it took and how much memory it held."""

from __future__ import annotations

import platform
import resource
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from ignite.engine import Engine, Events
from scripts.engine.distributed import world
from scripts.engine.identity import encoder_identity
from scripts.engine.machine import machine_rate
from scripts.scoring.scorer import resolve_precision

__all__ = ["StageTimes", "peak_rss_mb", "run_record", "token_stats", "versions"]


class StageTimes:
    """Seconds per stage: ``load`` (the data loader, once :meth:`attach` ed) and ``with times.measure(stage)``."""

    def __init__(self, stages: Iterable[str] = ("tokenize", "score", "write")) -> None:
        self.seconds: dict[str, float] = {"load": 0.0, **dict.fromkeys(stages, 0.0)}
        self._batch_started = 0.0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.GET_BATCH_STARTED, self._start_loading)
        engine.add_event_handler(Events.GET_BATCH_COMPLETED, self._stop_loading)

    def _start_loading(self, engine: Engine) -> None:
        self._batch_started = time.perf_counter()

    def _stop_loading(self, engine: Engine) -> None:
        self.seconds["load"] += time.perf_counter() - self._batch_started

    @contextmanager
    def measure(self, stage: str) -> Iterator[None]:
        """Add the time spent in the ``with`` block to ``stage``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - start


def peak_rss_mb() -> float:
    """Peak resident memory of this process (MB): ``VmHWM`` where Linux's /proc has it (``ru_maxrss`` is
    carried across ``execve``: it would report a large parent process's peak)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux, bytes on macOS


def versions() -> dict[str, str]:
    """Versions of Python and of the libraries that shape the results."""
    import monai
    import numpy

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "numpy": numpy.__version__,
    }


def token_stats(bank: Mapping[str, Mapping[str, Any]]) -> dict:
    """Token counts and size of a bank ``{part: {name: VolumeTokens}}``."""
    volumes = [b for part in bank.values() for b in part.values()]
    first = volumes[0] if volumes else None
    return {
        "per_volume": first.num_tokens() if first else 0,
        "grids": {k: list(g.shape) for k, g in first.grids.items()} if first else {},
        "bank_mb": round(sum(v.nbytes() for v in volumes) / 2**20, 2),
    }


def run_record(evaluator: Any) -> dict:  # a CS3FEvaluator: evaluator.py imports this module
    """The run record of a finished :class:`~scripts.engine.evaluator.CS3FEvaluator` run."""
    names, seconds = evaluator.cohort.names, evaluator.times.seconds
    scorer = evaluator.inferer.scorer
    precision = "fp32"  # of the exact C scorer's distance pass; the others run in fp32
    if scorer.variant == "C" and evaluator.inferer.references.mode in ("all", "chunks"):
        precision = resolve_precision(scorer.precision, scorer.score_device or evaluator.state.device)
    info = {
        "inferer": evaluator.inferer.describe(),
        "encoder": encoder_identity(evaluator.network),
        "preprocessing": evaluator.preprocessing_identity,
        "n_volumes": len(names),
        "volumes": names,
        "parts": list(evaluator.cohort.bank),
        "world_size": world()[1],
        "skipped": evaluator.cohort.skipped,
        "encoded_volumes": evaluator.tokenizer.counts["encoded"],
        "cached_volumes": evaluator.tokenizer.counts["cached"],
        "timings_s": {k: round(v, 3) for k, v in seconds.items()},
        "seconds_per_volume": round(sum(seconds.values()) / max(1, len(names)), 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "tokens": evaluator.scoring.token_stats or token_stats(evaluator.cohort.bank),
        "versions": versions(),
        "device": str(evaluator.state.device),
        "machine": {**machine_rate(), "threads_during_run": evaluator.threads.counts},
        "score_precision": precision,
        "outputs": dict(evaluator.outputs),
    }
    if getattr(evaluator, "registration", None):
        info["registration"] = {n: evaluator.registration[n] for n in names if n in evaluator.registration}
    if (reference := evaluator.scoring.reference) is not None:
        info["reference_bank"] = {
            "folder": str(reference.folder),
            "n_volumes": len(reference),
            "version": reference.manifest["version"],
            "excluded_self": sorted(
                n for n in names if reference.index_of_source(evaluator.cohort.sources.get(n)) is not None
            ),
        }
    if torch.cuda.is_available():
        info["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return info
