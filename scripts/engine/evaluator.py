"""``CS3FEvaluator``: the bundle's cohort workflow as a MONAI/ignite engine.

CS3F needs the whole cohort before it can score any volume, so the engine makes two passes over the
data loader (two ignite epochs) with the scoring step (:mod:`scripts.engine.scoring_step`) between:

1. **tokenize** (epoch 1): per volume, check its grid (:mod:`scripts.engine.grid`) and keep its tokens
   (encoded, or read from the cache: :mod:`scripts.engine.tokens`).
2. **score**: the cohort against itself, or against a reference bank; or save the bank (``build_bank``).
3. **write** (epoch 2): reload each volume (cheap next to encoding, and memory stays at the token bank),
   fuse its token scores into a voxel map, run ``postprocessing`` (``Invertd``, ``SaveImaged``).

The handlers of :mod:`scripts.engine.handlers` write the tables once the results of every process are
gathered (:mod:`scripts.engine.distributed`). A subclass may score parts of each volume independently
(:meth:`CS3FEvaluator.split`, e.g. the two lungs) and merge their maps (:meth:`CS3FEvaluator.merge`).
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
from scripts.engine.datalist import image_stem
from scripts.engine.distributed import gather_scores, world
from scripts.engine.grid import CohortGrid
from scripts.engine.identity import preprocessing_identity, token_identity
from scripts.engine.parts import WholeVolume
from scripts.engine.record import StageTimes, run_record
from scripts.engine.scoring_step import CohortScoring
from scripts.engine.tokens import CachedTokenizer, registration_of, source_digest, voxel_digest, with_registration
from scripts.errors import CS3FInputError, find_input_error
from scripts.inferer import BatchBuffer, CS3FInferer, VolumeTokens
from scripts.mixed_precision import resolve_precision
from scripts.references import reject_replaced_keys
from scripts.storage.cache import TokenCache

__all__ = ["CS3FEvaluator"]


class CS3FEvaluator(WholeVolume, CohortScoring, Workflow):
    """Two-pass cohort inference engine (see the module docstring); the part hooks (``split``, ``merge``,
    ``split_transform``, ``check_registration``) are those of :class:`scripts.engine.parts.WholeVolume`.

    Args:
        device: device of the encoder.
        val_data_loader: loader of preprocessed dicts (``image`` and optionally ``mask``); must iterate
            in the same order both times (no shuffling). Its dataset's ``transform`` is the preprocessing
            whose parameters key the token cache and the bank identity.
        network: frozen 2D slice encoder.
        inferer: :class:`scripts.inferer.CS3FInferer`.
        output_dir: where ``postprocessing`` writes the maps (recorded in ``run.json``).
        postprocessing: transform on ``{"pred": map, "image": ..., "mask": ...}`` dicts, e.g.
            ``Invertd`` + ``SaveImaged``.
        val_handlers: ignite/MONAI handlers, e.g. ``ProgressBar`` and the writers of
            :mod:`scripts.engine.handlers`; attached after the engine's own, so they see gathered results.
        image_key, mask_key, pred_key: dictionary keys.
        quiet: do not print where the maps are at the end.
        cache_dir: folder of the per-volume token cache (``None``: no cache). A re-run with the same
            configuration loads cached tokens instead of encoding again (resume after a crash).
        on_bad_input: ``"error"`` or ``"skip"``: what to do with a volume the loader marks as bad
            (see :class:`scripts.engine.datalist.CheckedDataset`) or that is off the cohort's grid.
        skipped: volumes left out before the run (:attr:`scripts.engine.datalist.Datalist.skipped`);
            recorded in ``run.json`` with those the engine leaves out.
        build_bank: folder to save the cohort's token bank in; the run then stops after pass 1.
        reference_bank: replaced by the inferer's ``references="bank:DIR"``; setting it is an error
            naming the new spelling.
        keep_tokens: keep the token bank (``self.bank``) after scoring, e.g. to inspect it; by default
            it is released once the token scores exist, so that writing the maps does not hold it.
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
        quiet: bool = False,
        cache_dir: str | Path | None = None,
        on_bad_input: str = "error",
        skipped: Sequence[dict] = (),
        build_bank: str | Path | None = None,
        reference_bank: str | Path | None = None,
        keep_tokens: bool = False,
    ) -> None:
        # items are decollated in _iteration, where the pass is known; handlers are attached last
        super().__init__(device=device, max_epochs=2, data_loader=val_data_loader, decollate=False)
        if not 0.0 < float(inferer.rho) <= 1.0:  # checked here, before hours of encoding, not at scoring
            raise CS3FInputError(
                f"rho must be in (0, 1] so that K = max(1, floor(rho (B - 1))) <= B - 1, got {inferer.rho}"
            )
        try:  # tf32 off CUDA, before any encoding
            resolve_precision(inferer.scorer.precision, inferer.scorer.score_device or device)
        except ValueError as err:
            raise CS3FInputError(str(err)) from None
        self.network, self.inferer, self.postprocessing = network, inferer, postprocessing
        self.output_dir = Path(output_dir)
        self.image_key, self.mask_key, self.pred_key = image_key, mask_key, pred_key
        self.quiet, self.on_bad_input, self.keep_tokens = quiet, on_bad_input, bool(keep_tokens)
        self.skipped: list[dict] = list(skipped)
        transform = getattr(getattr(val_data_loader, "dataset", None), "transform", None)
        self.preprocessing_identity = preprocessing_identity(transform, self.split_transform())
        identity = token_identity(inferer.describe(), network, self.preprocessing_identity)
        self.cache = TokenCache(cache_dir, identity) if cache_dir is not None else None
        self.tokenizer = CachedTokenizer(inferer, network, self.cache)
        self.grid = CohortGrid()
        self.names: list[str] = []  # volumes tokenized, in order (after pass 1: the whole cohort's)
        self._my_names: list[str] = []  # this process's share of them
        self.sources: dict[str, str] = {}  # name -> sha256 of its source files
        self.subjects: dict[str, tuple[str, str]] = {}  # name -> (subject, sha256 of its voxels)
        self.registration: dict[str, dict] = {}  # name -> its registration (transform, quality), if any
        # part -> volume name -> tokens / token scores (part "" is the whole volume)
        self.bank: dict[str, dict[str, VolumeTokens]] = {}
        self._buffers: dict[str, BatchBuffer] = {}
        self.token_scores: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
        self.token_validity: dict[str, dict[str, dict[str, torch.Tensor]]] = {}  # edge="normalized" only
        self.token_stats: dict = {}
        self.subject_scores: dict[str, dict[str, float]] = {}
        self.times = StageTimes()
        self.times.attach(self)
        reject_replaced_keys(reference_bank=reference_bank)
        self._init_banks(build_bank)
        self.outputs = {"bank": str(self.build_bank)} if self.build_bank else {"maps": str(self.output_dir)}
        if self.build_bank is not None:
            self.state.max_epochs = 1
        self.add_event_handler(Events.EPOCH_COMPLETED(once=1), self._score)
        self.add_event_handler(Events.COMPLETED, self._finish)
        self.logger.addFilter(self._drop_input_error_logs)
        if val_handlers:
            self._register_handlers(val_handlers)

    @staticmethod
    def _drop_input_error_logs(record) -> bool:  # noqa: ANN001 - logging.Filter protocol
        """ignite logs a terminating exception with its traceback; an input error gets one line instead."""
        return find_input_error(RuntimeError(record.getMessage())) is None

    def run(self) -> None:  # type: ignore[override]
        """Run both passes; a bad input file surfaces as one :class:`CS3FInputError` naming it."""
        try:
            super().run()
        except Exception as err:
            if self._writer is not None:
                self._writer.abort()  # no half-built bank left behind
            found = find_input_error(err)
            if found is None:
                raise
            raise found from None

    @property
    def counts(self) -> dict[str, int]:
        """Volumes ``encoded`` and read from the token cache (``cached``), by all processes after pass 1."""
        return self.tokenizer.counts

    # ------------------------------------------------------------------ passes
    def _iteration(self, engine: Engine, batchdata: dict) -> dict:
        items = decollate_batch(batchdata) if isinstance(batchdata, dict) else list(batchdata)
        stage, step = ("tokenize", self._tokenize) if engine.state.epoch == 1 else ("write", self._write)
        with self.times.measure(stage):
            names = [step(item) for item in items]
        return {"names": [name for name in names if name is not None]}

    def _name(self, item: dict) -> str:
        image = item[self.image_key]
        source = image.meta.get("filename_or_obj", "") if isinstance(image, MetaTensor) else ""
        if not source:
            raise CS3FInputError("volumes must come with their file name (LoadImaged meta 'filename_or_obj')")
        return image_stem(source)

    def _skip(self, name: str, reason: str) -> None:
        if self.on_bad_input != "skip":
            raise CS3FInputError(reason)
        if all(s.get("name") != name for s in self.skipped):
            warnings.warn(f"cs3f: skipping {name}: {reason}", stacklevel=2)
            self.skipped.append({"name": name, "reason": reason})

    def _tokenize(self, item: dict) -> str | None:
        """Pass 1 on one item: its tokens kept (or streamed to the bank being built); its name, or
        ``None`` if it is left out."""
        if "bad_input" in item:
            self._skip(item["name"], item["bad_input"])
            return None
        name = self._name(item)
        if name in self.names:
            raise CS3FInputError(f"two inputs are named {name!r}: output files would collide")
        parts = self.split(item)
        for part, (image, _) in parts.items():
            off_grid = self.grid.check(name, part, image, self.check_registration(part, image))
            if off_grid:
                self._skip(name, off_grid)
                return None
        banks = self.build_bank is not None or self.reference is not None
        digest = self.cache is not None or banks
        source_key = source_digest(item, (self.image_key, self.mask_key)) if digest else ""
        registration = registration_of(item[self.image_key])
        if registration is not None:  # tokens of another registration of the same file are other tokens
            self.registration[name] = registration
            source_key = with_registration(source_key, registration)
        self.sources[name] = source_key
        # The subject as given (cohort.csv column or subject_pattern; "" if none) and the voxels' digest.
        self.subjects[name] = (str(item.get("subject") or ""), voxel_digest(item[self.image_key]))
        writer = self._bank_writer()
        for part, (image, mask) in parts.items():
            tokens = self.tokenizer(f"{name}.{part}" if part else name, source_key, image, mask)
            if writer is not None:  # building a bank: straight to disk, never the whole bank in RAM
                writer.add(name, part, tokens)
                self._bank_parts.add(part)
            else:
                self.bank.setdefault(part, {})[name] = self._batch_buffer(part).add(tokens)
        self.names.append(name)
        return name

    def _batch_buffer(self, part: str) -> BatchBuffer:
        """The rows this process's tokens of ``part`` are kept in, one per input (see BatchBuffer)."""
        if part not in self._buffers:
            self._buffers[part] = BatchBuffer(len(self.data_loader.dataset))
        return self._buffers[part]

    def _write(self, item: dict) -> str | None:
        """Pass 2 on one item: its voxel map made and post-processed, its subject score recorded."""
        if "bad_input" in item:
            return None
        name = self._name(item)
        if name not in self._my_names:  # skipped in pass 1
            return None
        axis_max: dict[str, float] = {}
        maps = {}
        for part, (image, mask) in self.split(item).items():
            part_max: dict[str, float] = {}
            maps[part] = self.inferer.voxel_map(
                self.token_scores[part][name],
                tuple(image.shape[1:]),
                mask,
                axis_max=part_max,
                validity=self.token_validity.get(part, {}).get(name),
            )
            for axis, value in part_max.items():
                axis_max[axis] = max(axis_max.get(axis, 0.0), value)
        amap = self.merge(item, maps)
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
    def _finish(self, engine: Engine) -> None:
        """Gather every process's scores and timings (before the handlers write them)."""
        if world()[1] > 1:
            self.subject_scores, self.times.seconds = gather_scores(self.subject_scores, self.times.seconds)
        if self.quiet or world()[0] != 0:
            return
        made = (
            f"token bank of {len(self.names)} volumes in {self.build_bank}"
            if self.build_bank is not None
            else f"{len(self.names)} anomaly maps in {self.output_dir}/<image>_anomaly.nii.gz"
        )
        print(f"cs3f: {made}", flush=True)

    def summary(self) -> dict:
        """The run record (:func:`scripts.engine.record.run_record`); subclasses may add to it."""
        return run_record(self)
