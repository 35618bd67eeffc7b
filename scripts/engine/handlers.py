"""Output writers of a :class:`~scripts.engine.evaluator.CS3FEvaluator` run, as ignite handlers (listed under
``handlers`` in ``configs/inference.json``, like MONAI's ``ClassificationSaver``): :class:`ScoresSaver`
(``scores.csv``; the maps of volumes an earlier run listed and this one does not, and an earlier
evaluation's report, go when the run is published) and :class:`RunRecorder` (``run.json``). Both write
into the engine's publication (:class:`scripts.storage.outputs.Publication`): a failed run publishes
neither. The rank comes from ``torch.distributed``, not ``ignite.distributed``, whose first call runs
collectives and would hang a run whose handlers are on one rank only (``multi_gpu_inference.json``).
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events
from scripts.engine.datalist import MAP_SUFFIX
from scripts.engine.distributed import world
from scripts.errors import as_bool
from scripts.evaluation.report import report_files
from scripts.storage.atomic import atomic_write_csv, atomic_write_json

__all__ = ["RunRecorder", "ScoresSaver", "stale_outputs"]

#: columns of ``registration.csv`` (after ``image``)
REGISTRATION_COLUMNS = (
    "template",
    "final_metric",
    "metric",
    "mirror_gain",
    "coverage",
    "foreground_dice",
    "cpu_seconds",
)


def registration_table(engine: Engine) -> tuple[list[list[str]], list[str]]:
    """Rows of ``registration.csv`` (one per registered volume, datalist order) and the writer's header."""
    rows = []
    for name in engine.cohort.names:
        entry = engine.registration.get(name)
        if entry is not None:
            scales = ";".join(f"{v:.4g}" for v in entry["scales"])
            rows.append([name, *(str(entry[k]) for k in REGISTRATION_COLUMNS), scales])
    return rows, ["image", *REGISTRATION_COLUMNS, "scales"]


def _listed(table: Path) -> list[str]:
    """The image names of an earlier ``scores.csv`` (none if there is none or it is unreadable)."""
    try:
        with table.open(newline="") as f:
            return [row["image"] for row in csv.DictReader(f) if row.get("image")]
    except (OSError, KeyError, csv.Error, UnicodeDecodeError):
        return []


def stale_outputs(table: Path, names: Iterable[str]) -> list[Path]:
    """Files of the run before this one in ``table``'s folder that this one does not replace: the maps of
    volumes its ``table`` listed and ``names`` does not, ``registration.csv`` and an evaluation's report."""
    keep, folder = set(names), table.parent
    stale = [folder / f"{n}{MAP_SUFFIX}" for n in _listed(table) if n not in keep and "/" not in n]
    return [p for p in stale if p.is_file()] + [folder / "registration.csv"] + report_files(folder)


class _RunFile:
    """A file of the run, ``<output_dir>/<filename>``, written into the engine's publication when the run
    completes, by the process ``save_rank`` (the results of every process are gathered there).

    Args:
        output_dir: its folder (default: the engine's ``output_dir``).
        filename: its name.
        save_rank: the process that writes.
        quiet: do not print where it is (default: the engine's ``quiet``).
    """

    def __init__(self, output_dir: str | Path | None, filename: str, save_rank: int, quiet: bool | str | None) -> None:
        self.output_dir, self.filename, self.save_rank = output_dir, filename, save_rank
        self.quiet = None if quiet is None else as_bool(quiet, "quiet")

    def attach(self, engine: Engine) -> None:
        """Write at ``engine``'s completion."""
        self.path = Path(engine.output_dir if self.output_dir is None else self.output_dir) / self.filename
        self.quiet = engine.quiet if self.quiet is None else self.quiet
        engine.add_event_handler(Events.COMPLETED, self)


class ScoresSaver(_RunFile):
    """The subject scores of a run (arguments as :class:`_RunFile`'s), listed among the engine's outputs.

    Columns: ``image`` (the volume's name), ``score`` (the subject score, ``subject_score``) and
    ``score_<axis>`` per slicing axis; numbers with 6 significant digits. A ``build_bank`` run scores
    nothing and writes no table.
    """

    def __init__(
        self,
        output_dir: str | Path | None = None,
        filename: str = "scores.csv",
        save_rank: int = 0,
        quiet: bool | str | None = None,
    ) -> None:
        super().__init__(output_dir, filename, save_rank, quiet)

    def attach(self, engine: Engine) -> None:
        super().attach(engine)
        if "bank" not in engine.outputs:  # a run that builds a bank writes no scores
            engine.outputs[self.path.stem] = str(self.path)

    def __call__(self, engine: Engine) -> None:
        if world()[0] != self.save_rank or not engine.subject_scores:
            return
        publication = engine.publication
        rows = [(name, engine.subject_scores[name]) for name in engine.cohort.names]
        axes = [k for k in rows[0][1] if k != "score"]
        atomic_write_csv(
            publication.staged(self.path),
            ([name, *(f"{row[k]:.6g}" for k in ("score", *axes))] for name, row in rows),
            header=["image", "score", *(f"score_{a}" for a in axes)],
            lineterminator="\n",
        )
        publication.stale += stale_outputs(self.path, engine.cohort.names)
        if getattr(engine, "registration", None):  # registered runs: each volume's registration quality
            rows, header = registration_table(engine)
            table = publication.staged(self.path.parent / "registration.csv")
            atomic_write_csv(table, rows, header=header, lineterminator="\n")
        if not self.quiet:
            print(f"cs3f: scores in {self.path}", flush=True)


class RunRecorder(_RunFile):
    """The run record (:func:`scripts.engine.record.run_record`); arguments as :class:`_RunFile`'s, and
    ``config``: entries of the bundle config to record (default: the datalist's ``dataset_dir`` and
    ``use_masks``)."""

    def __init__(
        self,
        output_dir: str | Path | None = None,
        filename: str = "run.json",
        config: Mapping[str, Any] | None = None,
        save_rank: int = 0,
        quiet: bool | str | None = None,
    ) -> None:
        super().__init__(output_dir, filename, save_rank, quiet)
        self.config = None if config is None else dict(config)

    def attach(self, engine: Engine) -> None:
        super().attach(engine)
        if self.config is None:  # the dataset folder and whether masks were asked for, from the datalist
            data = getattr(getattr(engine.data_loader, "dataset", None), "data", None)
            self.config = {"dataset_dir": data.folder, "use_masks": data.masks} if hasattr(data, "folder") else {}

    def __call__(self, engine: Engine) -> None:
        if world()[0] != self.save_rank:
            return
        atomic_write_json(engine.publication.staged(self.path), {**engine.summary(), "config": self.config})
        if not self.quiet:
            print(f"cs3f: run record in {self.path}", flush=True)
