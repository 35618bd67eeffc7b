"""``CS3FEvaluator``: the bundle's cohort workflow as a MONAI/ignite engine of two passes (epochs).

1. **tokenize**: per volume, check its grid (:mod:`~scripts.engine.grid`), keep its tokens (encoded or
   cached: :mod:`~scripts.engine.cached_tokens`); then score the cohort (:mod:`~scripts.engine.scoring_step`).
2. **write**: reload each volume, fuse its token scores into a voxel map, run ``postprocessing``.

The handlers (:mod:`~scripts.engine.handlers`) write the tables once every process's results are gathered;
everything is published as one set at the end (:class:`scripts.storage.outputs.Publication`). Helpers:
:class:`~scripts.engine.cohort.Cohort`, :class:`~scripts.engine.scoring_step.CohortScoring` and ``parts``
(:class:`~scripts.engine.parts.WholeVolume`, :class:`~scripts.engine.lung_parts.LungParts`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor, decollate_batch
from monai.engines import Workflow
from scripts.engine.cached_tokens import (
    CachedTokenizer,
    registration_of,
    source_digest,
    voxel_digest,
    with_registration,
)
from scripts.engine.cohort import Cohort, volume_name
from scripts.engine.datalist import MAP_SUFFIX, check_on_bad_input
from scripts.engine.distributed import broadcast, dataset_order, gather_scores, world
from scripts.engine.grid import CohortGrid
from scripts.engine.identity import preprocessing_identity, token_identity
from scripts.engine.parts import WholeVolume
from scripts.engine.record import StageTimes, run_record
from scripts.engine.scoring_step import CohortScoring
from scripts.engine.stage_progress import StageProgress
from scripts.errors import CS3FInputError, as_bool, as_int, find_input_error
from scripts.inferer import CS3FInferer
from scripts.scoring.scorer import resolve_precision
from scripts.storage.cache import TokenCache
from scripts.storage.outputs import Publication, check_name_lengths, check_output_dir
from scripts.threads import FittedThreads

__all__ = ["CS3FEvaluator"]


class CS3FEvaluator(Workflow):
    """Two-pass cohort inference engine (see the module docstring).

    Args:
        device: device of the encoder.
        val_data_loader: loader of preprocessed dicts (``image``, optionally ``mask``), in the same order both
            times; its dataset's ``transform`` keys the token cache and the bank identity.
        network: frozen 2D slice encoder.
        inferer: :class:`scripts.inferer.CS3FInferer`.
        output_dir: where ``postprocessing`` (e.g. ``Invertd`` + ``SaveImaged``) writes the maps.
        postprocessing: transform on ``{"pred": map, "image": ..., "mask": ...}`` dicts.
        val_handlers: handlers (:mod:`scripts.engine.handlers`), attached last: they see gathered results.
        image_key, mask_key, pred_key: dictionary keys.
        quiet: no progress, and no closing line saying where the maps are.
        cache_dir: folder of the per-volume token cache (``None``: none); a re-run loads cached tokens.
        on_bad_input: ``"error"`` or ``"skip"`` a volume the loader marks as bad or that is off the cohort's
            grid; default: the dataset's.
        skipped: volumes left out before the run (default: the datalist's), recorded in ``run.json``.
        build_bank: folder to save the cohort's token bank in; the run then stops after pass 1.
        keep_tokens: keep the token bank (``self.cohort.bank``) after scoring (by default released before writing).
        num_threads: CPU threads of torch (``None``: fitted to the machine's load through the run,
            :class:`scripts.threads.FittedThreads`).
        parts: how each volume is cut into parts scored independently (default: ``WholeVolume``).

    Raises:
        CS3FInputError: an output or cache folder that cannot be written, a score precision the device
            lacks, a bad ``on_bad_input``, ``quiet``, ``keep_tokens`` or ``num_threads``.
    """

    def __init__(
        self,
        device: torch.device | str,
        val_data_loader: Any,
        network: torch.nn.Module,
        inferer: CS3FInferer,
        output_dir: str | Path,
        postprocessing: Callable | None = None,
        val_handlers: Sequence | None = None,
        image_key: str = "image",
        mask_key: str = "mask",
        pred_key: str = "pred",
        quiet: bool | str = False,
        cache_dir: str | Path | None = None,
        on_bad_input: str | None = None,
        skipped: Sequence[dict] | None = None,
        build_bank: str | Path | None = None,
        keep_tokens: bool | str = False,
        num_threads: int | None = None,
        parts: WholeVolume | None = None,
    ) -> None:
        # items are decollated in _iteration, where the pass is known; handlers are attached last
        super().__init__(device=device, max_epochs=2, data_loader=val_data_loader, decollate=False)
        dataset = getattr(val_data_loader, "dataset", None)
        _say_foreground(getattr(dataset, "data", None), getattr(dataset, "transform", None))
        try:  # the score precision on this device (tf32 needs CUDA), before any encoding
            resolve_precision(inferer.scorer.precision, inferer.scorer.score_device or device)
        except ValueError as err:
            raise CS3FInputError(str(err)) from None
        self.threads = FittedThreads(as_int(num_threads, "num_threads", 1, allow_none=True))
        self.network, self.inferer, self.postprocessing = network, inferer, postprocessing
        self.output_dir = Path(output_dir)
        self.image_key, self.mask_key, self.pred_key = image_key, mask_key, pred_key
        self.quiet, self.keep_tokens = as_bool(quiet, "quiet"), as_bool(keep_tokens, "keep_tokens")
        self.on_bad_input = check_on_bad_input(on_bad_input or getattr(dataset, "on_bad_input", "error"))
        listed = getattr(getattr(dataset, "data", None), "skipped", ())  # the datalist's
        self.cohort = Cohort(val_data_loader, list(listed if skipped is None else skipped))
        self.parts = parts if parts is not None else WholeVolume(image_key, mask_key)
        transform = getattr(dataset, "transform", None)
        self.preprocessing_identity = preprocessing_identity(transform, self.parts.split_transform())
        identity = token_identity(inferer.describe(), network, self.preprocessing_identity)
        self.cache = TokenCache(cache_dir, identity) if cache_dir is not None else None
        self._check_outputs(dataset_order(val_data_loader) or [])
        self.publication = Publication(output_dir)
        _stage_maps(postprocessing, self.publication)
        self.tokenizer = CachedTokenizer(inferer, network, self.cache)
        self.grid = CohortGrid()
        self.registration: dict[str, dict] = {}  # name -> its registration (transform, quality), if any
        self.subject_scores: dict[str, dict[str, float]] = {}
        self.times = StageTimes()
        self.times.attach(self)
        self.scoring = CohortScoring(
            inferer, network, self.preprocessing_identity, self.grid, build_bank, keep_tokens=self.keep_tokens
        )
        self.outputs = (
            {"bank": str(self.scoring.build_bank)} if self.scoring.build_bank else {"maps": str(self.output_dir)}
        )
        if self.scoring.build_bank is not None:
            self.state.max_epochs = 1
        self.add_event_handler(Events.EPOCH_COMPLETED(once=1), self._score)
        self.add_event_handler(Events.COMPLETED, self._finish)
        self.logger.addFilter(self._drop_input_error_logs)
        inferer.progress = not self.quiet  # the scoring's progress bars, with the engine's own
        self._register_handlers([StageProgress(enabled=not self.quiet), *(val_handlers or ())])
        self.parts.check(inferer)

    @staticmethod
    def _drop_input_error_logs(record) -> bool:  # noqa: ANN001 - logging.Filter protocol
        """ignite logs a terminating exception with its traceback (an input error gets one line instead)
        and its epochs, which here are the two passes (the stage progress names them instead)."""
        message = record.getMessage()
        return not message.startswith(("Engine run ", "Epoch[")) and find_input_error(RuntimeError(message)) is None

    def _check_outputs(self, names: list[str]) -> None:
        """Before any work: the output folder writable, the outputs it will replace too, and every file
        name of the run (temporary ones included) within its file system's limit."""
        maps = [f"{n}{MAP_SUFFIX}" for n in names]
        check_output_dir(self.output_dir, ["scores.csv", "run.json", *maps])
        check_name_lengths(self.output_dir, maps, keep_suffix=True)
        if self.cache is not None:
            check_output_dir(self.cache.folder)
            keys = [f"{n}.{part}" if part else n for n in names for part in self.parts.names]
            check_name_lengths(self.cache.folder, [self.cache.path(k).name for k in keys])

    def run(self) -> None:  # type: ignore[override]
        """Run both passes holding the output folder's lock, then publish the outputs as one set (rank 0);
        a bad input file or an OS fault surfaces as one :class:`CS3FInputError` naming it."""
        rank, size = world()
        try:
            refused = None
            if rank == 0:
                try:
                    self.publication.open()
                except CS3FInputError as err:
                    refused = str(err)
            if size > 1:
                refused = broadcast(refused)  # every rank stops; the first to stop prints the line
            if refused is not None:
                raise CS3FInputError(refused)
            with self.threads:
                super().run()
            if rank == 0:
                self.publication.publish()
        except BaseException as err:
            self.scoring.abort()  # no half-built bank left behind
            found = find_input_error(err) if isinstance(err, Exception) else None
            if found is None:
                raise
            raise found from None
        finally:
            if rank == 0:
                self.publication.close()

    # ------------------------------------------------------------------ passes
    def _iteration(self, engine: Engine, batchdata: dict) -> dict:
        items = decollate_batch(batchdata) if isinstance(batchdata, dict) else list(batchdata)
        stage, step = ("tokenize", self._tokenize) if engine.state.epoch == 1 else ("write", self._write)
        with self.times.measure(stage):
            names = [step(item) for item in items]
        return {"names": [name for name in names if name is not None]}

    def _tokenize(self, item: dict) -> str | None:
        """Pass 1 on one item: its tokens kept (or streamed to the bank being built); its name, or
        ``None`` if it is left out."""
        if "bad_input" in item:
            self.cohort.skip(item["name"], item["bad_input"], self.on_bad_input)
            return None
        name = volume_name(item, self.image_key)
        if name in self.cohort.names:
            raise CS3FInputError(f"two inputs are named {name!r}: output files would collide")
        parts = self.parts.split(item, name)
        for part, (image, _) in parts.items():
            off_grid = self.grid.check(name, part, image, self.parts.check_registration(part, image))
            if off_grid:
                self.cohort.skip(name, off_grid, self.on_bad_input)
                return None
        digest = self.cache is not None or self.scoring.build_bank is not None or self.scoring.reference is not None
        source_key = source_digest(item, (self.image_key, self.mask_key)) if digest else ""
        registration = registration_of(item[self.image_key])
        if registration is not None:  # tokens of another registration of the same file are other tokens
            self.registration[name] = registration
            source_key = with_registration(source_key, registration)
        self.cohort.sources[name] = source_key
        # The subject as given (cohort.csv column or subject_pattern; "" if none) and the voxels' digest.
        self.cohort.subjects[name] = (str(item.get("subject") or ""), voxel_digest(item[self.image_key]))
        writer = self.scoring.bank_writer(self.cohort)
        for part, (image, mask) in parts.items():
            tokens = self.tokenizer(f"{name}.{part}" if part else name, source_key, image, mask)
            if writer is not None:  # building a bank: straight to disk, never the whole bank in RAM
                self.scoring.add_to_bank(writer, name, part, tokens)
            else:
                self.cohort.keep(part, name, tokens)
        self.cohort.names.append(name)
        return name

    def _write(self, item: dict) -> str | None:
        """Pass 2 on one item: its voxel map made and post-processed, its subject score recorded."""
        if "bad_input" in item:
            return None
        name = volume_name(item, self.image_key)
        if name not in self.cohort.my_names:  # skipped in pass 1
            return None
        amap, axis_max = self.parts.voxel_map(
            self.inferer, item, name, self.scoring.token_scores, self.scoring.token_validity
        )
        mask = item.get(self.mask_key)
        if mask is not None:
            amap = amap * (torch.as_tensor(mask) > 0).to(amap.device)
        amap, score = self.inferer.finish_map(amap, mask, getattr(item[self.image_key], "pixdim", None))
        self.subject_scores[name] = {"score": score, **axis_max}
        item[self.pred_key] = MetaTensor(amap, meta=item[self.image_key].meta)
        if self.postprocessing is not None:
            self.postprocessing(item)
        return name

    # ------------------------------------------------------------------ end of the run
    def _score(self, engine: Engine) -> None:
        """End of pass 1: the cohort gathered from every process, then scored (or saved as a bank)."""
        with self.times.measure("score"):
            self.tokenizer.counts = self.cohort.gather(self.tokenizer.counts)
            self.scoring(self.cohort)

    def _finish(self, engine: Engine) -> None:
        """Gather every process's scores, timings and registrations (before the handlers write them)."""
        if world()[1] > 1:
            self.subject_scores, self.times.seconds, self.registration = gather_scores(
                self.subject_scores, self.times.seconds, self.registration
            )
        if self.quiet or world()[0] != 0:
            return
        made = (
            f"token bank of {len(self.cohort.names)} volumes in {self.scoring.build_bank}"
            if self.scoring.build_bank is not None
            else f"{len(self.cohort.names)} anomaly maps in {self.output_dir}/<image>_anomaly.nii.gz"
        )
        print(f"cs3f: {made}", flush=True)

    def summary(self) -> dict:
        """The run record (:func:`scripts.engine.record.run_record`) and the parts' entries."""
        return {**run_record(self), **self.parts.record()}


def _stage_maps(postprocessing: Any, publication: Publication) -> None:
    """Point the ``SaveImage(d)`` transforms of ``postprocessing`` that write into the publication's folder
    at its staging folder."""
    for transform in getattr(postprocessing, "transforms", [postprocessing]):
        layout = getattr(getattr(transform, "saver", transform), "folder_layout", None)
        if layout is not None and Path(layout.output_dir).absolute() == publication.folder:
            layout.output_dir = publication.staging


def _makes_masks(transform: Any) -> bool:
    """Whether ``transform`` (or one it composes) puts a mask on items without one (``makes_masks``)."""
    return bool(getattr(transform, "makes_masks", False)) or any(
        _makes_masks(t) for t in getattr(transform, "transforms", ())
    )


def _say_foreground(datalist: Any, transform: Any = None) -> None:
    """One warning line when masks were asked for but the cohort has none and ``transform`` makes none:
    then every voxel counts."""
    rows = datalist if isinstance(datalist, Sequence) else []
    if _makes_masks(transform):
        return
    if rows and getattr(datalist, "masks", False) and not any("mask" in r or "foreground" in r for r in rows):
        warnings.warn(
            f"cs3f: no foreground masks in {getattr(datalist, 'folder', '') or 'the dataset'}: every voxel is "
            "foreground (give masks/ beside images/, or a mask column; --use_masks false says so)",
            stacklevel=3,
        )
