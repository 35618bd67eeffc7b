"""``CS3FEvaluator``: the bundle's cohort workflow as a MONAI/ignite engine.

CS3F needs the whole cohort before it can score any volume, so the engine makes two passes over the
data loader (two ignite epochs), with the batch scoring step between them:

1. **tokenize** (epoch 1): load + preprocess one volume, tokenize it, keep only its tokens.
2. **score** (after epoch 1): cross-subject scoring of the token bank, per axis x layer.
3. **write** (epoch 2): reload + preprocess each volume (cheap next to encoding, and it keeps memory at
   the token bank), fuse its token scores into a voxel map, run ``postprocessing`` (``Invertd`` back
   to the input grid, ``SaveImaged``), record the subject score.

At the end ``scores.csv`` and ``run.json`` are written atomically. Handlers (``val_handlers``, e.g.
ignite's ``ProgressBar``) attach to the engine as in any MONAI evaluator.

Parts: a subclass may split each volume into parts scored independently (:meth:`CS3FEvaluator.split`,
e.g. the left and right lung) and merge their maps (:meth:`CS3FEvaluator.merge`).

Distributed (``torchrun``, see ``configs/multi_gpu_inference.json``): each rank tokenizes its shard of
volumes (a ``DistributedSampler`` without shuffling), the token banks are all-gathered, each rank scores
and writes its own volumes, and rank 0 gathers the subject scores and writes ``scores.csv`` and
``run.json``. The outputs are identical to a single-process run.

Reference bank (``configs/build_bank.json``, :mod:`scripts.storage.bank`): with ``build_bank`` the
engine makes pass 1 only and saves the cohort's tokens as a bank; with ``reference_bank`` each volume
of the run is scored against that bank's volumes only (never against the other new volumes, nor against
itself when the same scan is in the bank), after a check that the bank was made with this configuration.
"""

from __future__ import annotations

import json
import platform
import resource
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor, decollate_batch
from monai.engines import Workflow

from scripts.engine.datalist import image_stem
from scripts.errors import CS3FInputError, find_input_error
from scripts.inferer import BatchBuffer, CS3FInferer, TokenGrid, VolumeTokens
from scripts.storage.atomic import atomic_write_text
from scripts.storage.bank import BankWriter, TokenBank, bank_identity, save_bank
from scripts.storage.cache import TokenCache, file_digest

__all__ = ["CS3FEvaluator"]


# Inferer parameters that change scores but not tokens: a run that changes only these reuses the cache.
_SCORING_ONLY = ("rho", "k_rule", "variant", "L", "chunk_size", "n_references")


def _peak_rss_mb() -> float:
    """Peak resident memory of this process (MB): ``VmHWM`` where Linux's /proc has it.

    Not ``ru_maxrss`` first: Linux carries it across ``execve``, so a bundle started by a large Python
    process (``subprocess``, a notebook) would report its parent's peak (1099.8 MB measured for a run
    whose own peak was 580.8 MB).
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux, bytes on macOS


class CS3FEvaluator(Workflow):
    """Two-pass cohort inference engine (see the module docstring).

    Args:
        device: device of the encoder.
        val_data_loader: loader of preprocessed dicts (``image`` and optionally ``mask``); must iterate
            in the same order both times (no shuffling).
        network: frozen 2D slice encoder.
        inferer: :class:`scripts.inferer.CS3FInferer`.
        output_dir: where ``scores.csv``, ``run.json`` and the maps (by ``postprocessing``) go.
        postprocessing: transform on ``{"pred": map, "image": ..., "mask": ...}`` dicts, e.g.
            ``Invertd`` + ``SaveImaged``.
        val_handlers: ignite/MONAI handlers attached to this engine.
        image_key, mask_key, pred_key: dictionary keys.
        run_info: extra entries recorded in ``run.json`` (e.g. the parameters of the config); also part
            of the token-cache key, so put every preprocessing parameter here.
        quiet: do not print where the outputs are at the end.
        cache_dir: folder of the per-volume token cache (``None``: no cache). A re-run with the same
            configuration loads cached tokens instead of encoding again (resume after a crash).
        on_bad_input: ``"error"`` or ``"skip"``: what to do with a volume the loader marks as bad
            (see :class:`scripts.engine.datalist.CheckedDataset`) or that is off the cohort's grid.
        skipped: list of volumes skipped before the run (e.g. by ``make_datalist``); the engine adds its
            own and records them all in ``run.json``.
        build_bank: folder to save the cohort's token bank in; the run then stops after pass 1 (no
            scoring, no maps).
        reference_bank: a bank folder to score this run's volumes against (reference-bank mode).
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
        run_info: dict | None = None,
        quiet: bool = False,
        cache_dir: str | Path | None = None,
        on_bad_input: str = "error",
        skipped: list | None = None,
        build_bank: str | Path | None = None,
        reference_bank: str | Path | None = None,
        keep_tokens: bool = False,
    ) -> None:
        super().__init__(
            device=device,
            max_epochs=2,
            data_loader=val_data_loader,
            handlers=val_handlers,
            decollate=False,  # items are decollated in _iteration, where the pass is known
        )
        self.network = network
        self.inferer = inferer
        self.output_dir = Path(output_dir)
        self.postprocessing = postprocessing
        self.image_key, self.mask_key, self.pred_key = image_key, mask_key, pred_key
        self.run_info = dict(run_info or {})
        self.keep_tokens = bool(keep_tokens)
        self._bank_stats: dict = {}
        self.quiet = quiet
        self.on_bad_input = on_bad_input
        if not 0.0 < float(inferer.rho) <= 1.0:  # checked here, before hours of encoding, not at scoring
            raise CS3FInputError(
                f"rho must be in (0, 1] so that K = max(1, floor(rho (B - 1))) <= B - 1, got {inferer.rho}"
            )
        self.skipped: list[dict] = skipped if skipped is not None else []
        self.cache = (
            TokenCache(
                cache_dir,
                {
                    "inferer": {  # what shapes tokens; the scoring options (rho, variant, L, batching) do not
                        k: v for k, v in inferer.describe().items() if k not in _SCORING_ONLY
                    },
                    "encoder": self._encoder_identity(network),
                    "preprocessing": {k: v for k, v in self.run_info.items() if k != "dataset_dir"},
                },
            )
            if cache_dir is not None
            else None
        )
        self.counts = {"encoded": 0, "cached": 0}
        self._grid: dict[str, tuple] = {}
        # part -> volume name -> tokens / token scores (part "" is the whole volume)
        self.bank: dict[str, dict[str, VolumeTokens]] = {}
        self.token_scores: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
        self.names: list[str] = []
        self._my_names: list[str] = []
        self._buffers: dict[str, BatchBuffer] = {}
        self.subject_scores: dict[str, dict[str, float]] = {}
        self.timings: dict[str, float] = {"load": 0.0, "tokenize": 0.0, "score": 0.0, "write": 0.0}
        self._batch_started = 0.0
        self.add_event_handler(Events.GET_BATCH_STARTED, self._mark_batch_start)
        self.add_event_handler(Events.GET_BATCH_COMPLETED, self._add_load_time)
        self.add_event_handler(Events.EPOCH_COMPLETED(once=1), self._score)
        self.add_event_handler(Events.COMPLETED, self._finish)
        self.logger.addFilter(self._drop_input_error_logs)
        # Reference banks: build one (pass 1 only) or score against one.
        if build_bank and reference_bank:
            raise CS3FInputError("build_bank and reference_bank exclude each other: build a bank, or use one")
        self.build_bank = Path(build_bank) if build_bank else None
        self.reference = TokenBank(reference_bank) if reference_bank else None
        self.sources: dict[str, str] = {}  # name -> sha256 of its source files (bank modes)
        self._writer: BankWriter | None = None
        self._bank_parts: set[str] = set()
        if self.reference is not None:
            batching = {k: getattr(inferer, k, None) for k in ("chunk_size", "n_references")}
            if any(v is not None for v in batching.values()):
                raise CS3FInputError(
                    f"reference_bank scores each volume against the whole bank; {batching} apply to "
                    f"scoring a cohort against itself: leave them null"
                )
            self.reference.check(self._bank_identity())  # before hours of encoding
            for part in self.reference.parts:
                grid = self.reference.grid(part)
                if grid is not None:  # new volumes must be on the bank's grid
                    self._grid[part] = grid
        if self.build_bank is not None:
            self.state.max_epochs = 1

    @staticmethod
    def _drop_input_error_logs(record) -> bool:  # noqa: ANN001 - logging.Filter protocol
        """ignite logs a terminating exception with its traceback; an input error gets one line instead."""
        return find_input_error(RuntimeError(record.getMessage())) is None

    def run(self) -> None:  # type: ignore[override]
        """Run both passes; a bad input file surfaces as one :class:`CS3FInputError` naming it."""
        try:
            super().run()
        except Exception as err:
            found = find_input_error(err)
            if found is None:
                raise
            raise found from None

    # ------------------------------------------------------------------ bookkeeping
    def _mark_batch_start(self, engine: Engine) -> None:
        self._batch_started = time.perf_counter()

    def _add_load_time(self, engine: Engine) -> None:
        self.timings["load"] += time.perf_counter() - self._batch_started

    def _name(self, item: dict) -> str:
        image = item[self.image_key]
        source = image.meta.get("filename_or_obj", "") if isinstance(image, MetaTensor) else ""
        if not source:
            raise CS3FInputError("volumes must come with their file name (LoadImaged meta 'filename_or_obj')")
        return image_stem(source)

    # ------------------------------------------------------------------ passes
    def _iteration(self, engine: Engine, batchdata: dict) -> dict:
        items = decollate_batch(batchdata) if isinstance(batchdata, dict) else list(batchdata)
        if engine.state.epoch == 1:
            return self._tokenize(items)
        return self._write(items)

    @staticmethod
    def _encoder_identity(network: torch.nn.Module) -> dict | str:
        return network.identity() if hasattr(network, "identity") else type(network).__name__

    def _skip(self, name: str, reason: str) -> None:
        if self.on_bad_input != "skip":
            raise CS3FInputError(reason)
        if all(s.get("name") != name for s in self.skipped):
            warnings.warn(f"cs3f: skipping {name}: {reason}", stacklevel=2)
            self.skipped.append({"name": name, "reason": reason})

    # ------------------------------------------------------------------ parts (override in subclasses)
    def split(self, item: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """Parts of one preprocessed item that are scored independently: ``{part: (image, mask)}``.

        Each part's bank (that part of every volume) is scored on its own. Default: the whole volume.
        """
        return {"": (item[self.image_key], item.get(self.mask_key))}

    def merge(self, item: dict, maps: dict[str, torch.Tensor]) -> torch.Tensor:
        """The ``[1, H, W, D]`` map of the whole preprocessed item from its parts' maps."""
        return maps[""]

    def check_registration(self, part: str, image: torch.Tensor) -> bool:
        """Whether the volumes of ``part`` must share one affine (registered data); shapes always must."""
        return True

    def _check_grid(self, name: str, part: str, image: torch.Tensor) -> str | None:
        """All volumes must share the preprocessed grid (shape, and affine if registered) of the first."""
        affine = image.affine if isinstance(image, MetaTensor) else torch.eye(4)
        grid = (tuple(image.shape[1:]), affine.double())
        first = self._grid.setdefault(part, grid)
        same_affine = torch.allclose(grid[1], first[1], atol=1e-3) or not self.check_registration(part, image)
        if grid[0] != first[0] or not same_affine:
            where = f" ({part})" if part else ""
            return (
                f"{name}{where} is not on the cohort's grid after preprocessing (shape {grid[0]} vs "
                f"{first[0]}, or a different affine): volumes must be registered to one space"
            )
        return None

    def _source_files(self, item: dict) -> list[str]:
        files = []
        for key in (self.image_key, self.mask_key):
            value = item.get(key)
            if isinstance(value, MetaTensor) and value.meta.get("filename_or_obj"):
                files.append(str(value.meta["filename_or_obj"]))
        return files

    def _tokenize(self, items: list[dict]) -> dict:
        start = time.perf_counter()
        names = []
        for item in items:
            if "bad_input" in item:
                self._skip(item["name"], item["bad_input"])
                continue
            name = self._name(item)
            if name in self.names:
                raise CS3FInputError(f"two inputs are named {name!r}: output files would collide")
            parts = self.split(item)
            off_grid = next(
                (e for p, (img, _) in parts.items() if (e := self._check_grid(name, p, img))), None
            )
            if off_grid:
                self._skip(name, off_grid)
                continue
            banks = self.build_bank is not None or self.reference is not None
            source_key = file_digest(self._source_files(item)) if self.cache is not None or banks else ""
            self.sources[name] = source_key
            writer = self._bank_writer()
            for part, (image, mask) in parts.items():
                tokens = self._tokens(f"{name}.{part}" if part else name, source_key, image, mask)
                if writer is not None:  # building a bank: straight to disk, never the whole bank in RAM
                    writer.add(name, part, tokens)
                    self._bank_parts.add(part)
                else:
                    self.bank.setdefault(part, {})[name] = self._batch_buffer(part).add(tokens)
            self.names.append(name)
            names.append(name)
        self.timings["tokenize"] += time.perf_counter() - start
        return {"names": names}

    def _batch_buffer(self, part: str) -> BatchBuffer:
        """The rows this process's tokens of ``part`` are kept in, one per input (see BatchBuffer)."""
        if part not in self._buffers:
            self._buffers[part] = BatchBuffer(len(self.data_loader.dataset))
        return self._buffers[part]

    def _tokens(
        self, key: str, source_key: str, image: torch.Tensor, mask: torch.Tensor | None
    ) -> VolumeTokens:
        tokens = self.cache.load(key, source_key) if self.cache is not None else None
        if tokens is not None:
            self.counts["cached"] += 1
            return tokens
        try:
            tokens = self.inferer.tokenize(image, self.network, mask)
        except ValueError as err:  # geometry/parameter problems (e.g. q not dividing an axis)
            raise CS3FInputError(f"{key}: {' '.join(str(err).split())}") from None
        self.counts["encoded"] += 1
        if self.cache is not None:
            self.cache.save(key, source_key, tokens)
        return tokens

    def _score(self, engine: Engine) -> None:
        """End of pass 1: token scores of every volume (or the bank saved), then the bank released."""
        start = time.perf_counter()
        self._score_tokens()
        self._bank_stats = self._token_stats()
        if not self.keep_tokens:
            # Pass 2 needs the token scores only: the bank and its buffers go before the maps are made.
            self.bank = {part: {} for part in self.bank}
            self._buffers = {}
        self.timings["score"] += time.perf_counter() - start

    def _score_tokens(self) -> None:
        self._gather_banks()
        names = self.names
        if self.build_bank is not None and len(names) >= 2:
            self._save_bank()
            return
        if self.reference is not None:
            self._score_against_bank()
            return
        if len(names) < 2:
            raise CS3FInputError(
                f"CS3F compares volumes with each other: only {len(names)} usable volume(s) "
                f"({len(self.skipped)} skipped)"
            )
        mine = set(self._my_names)
        queries = [i for i, n in enumerate(names) if n in mine]
        # Each rank scores only its own volumes as queries (against every volume as a reference).
        only_mine = {"queries": queries} if self._world()[1] > 1 else {}
        for part, bank in self.bank.items():
            try:
                scores = self.inferer.score([bank[n] for n in names], names=names, **only_mine)
            except ValueError as err:
                raise CS3FInputError(f"{part + ': ' if part else ''}{err}") from None
            self.token_scores[part] = {names[i]: scores[i] for i in queries}

    def _token_stats(self) -> dict:
        """Token counts and bank size for run.json (recorded before the bank is released)."""
        volumes = [b for bank in self.bank.values() for b in bank.values()]
        first = volumes[0] if volumes else None
        return {
            "per_volume": first.num_tokens() if first else 0,
            "grids": {k: list(g.shape) for k, g in first.grids.items()} if first else {},
            "bank_mb": round(sum(v.nbytes() for v in volumes) / 2**20, 2),
        }

    # ------------------------------------------------------------------ reference banks
    def _bank_identity(self) -> dict:
        preprocessing = {k: v for k, v in self.run_info.items() if k != "dataset_dir"}
        return bank_identity(self.inferer.describe(), self._encoder_identity(self.network), preprocessing)

    def _bank_writer(self) -> BankWriter | None:
        """In a single-process ``build_bank`` run, the writer that streams each volume's tokens to the
        bank as it is tokenized (with torchrun, the ranks' tokens are gathered and rank 0 saves them)."""
        if self.build_bank is None or self._world()[1] > 1:
            return None
        if self._writer is None:
            self._writer = BankWriter(self.build_bank, len(self.data_loader.dataset))
        return self._writer

    def _save_bank(self) -> None:
        """Pass 1 of a ``build_bank`` run: finish the streamed bank, or save the gathered one (rank 0)."""
        if self._world()[0] != 0:
            return
        import monai

        info = {"versions": {"torch": torch.__version__, "monai": monai.__version__}}
        parts = self._bank_parts if self._writer is not None else set(self.bank)
        grids = {part: self._grid[part] for part in parts if part in self._grid}
        if self._writer is not None:
            self._writer.finish(self._bank_identity(), self.sources, grids, info)
            return
        sources = [self.sources.get(n, "") for n in self.names]
        save_bank(self.build_bank, self._bank_identity(), self.names, sources, self.bank, grids, info)

    def _score_against_bank(self) -> None:
        """Score this run's volumes (this rank's share) against the reference bank's volumes only."""
        names = self.names
        if not names:
            raise CS3FInputError(
                f"no usable volume to score against the reference bank ({len(self.skipped)} skipped)"
            )
        if set(self.bank) != set(self.reference.parts):
            raise CS3FInputError(
                f"reference_bank {self.reference.folder} holds parts {sorted(self.reference.parts)} but this "
                f"run makes {sorted(self.bank)}: use a bank built with the same workflow (e.g. lung_ct.json)"
            )
        mine = set(self._my_names)
        queries = [i for i, n in enumerate(names) if n in mine]
        exclude = [self.reference.index_of_source(self.sources.get(n)) for n in names]
        for part, bank in self.bank.items():
            try:
                scores = self.inferer.score_references(
                    self.reference.references(part), [bank[n] for n in names], queries, exclude
                )
            except ValueError as err:
                if isinstance(err, CS3FInputError):
                    raise
                raise CS3FInputError(f"{part + ': ' if part else ''}{err}") from None
            self.token_scores[part] = {names[i]: scores[i] for i in queries}

    def _write(self, items: list[dict]) -> dict:
        start = time.perf_counter()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        names = []
        for item in items:
            if "bad_input" in item:
                continue
            name = self._name(item)
            if name not in self._my_names:  # skipped in pass 1
                continue
            axis_max: dict[str, float] = {}
            maps = {}
            for part, (image, mask) in self.split(item).items():
                part_max: dict[str, float] = {}
                maps[part] = self.inferer.voxel_map(
                    self.token_scores[part][name], tuple(image.shape[1:]), mask, axis_max=part_max
                )
                for axis, value in part_max.items():
                    axis_max[axis] = max(axis_max.get(axis, 0.0), value)
            amap = self.merge(item, maps)
            mask = item.get(self.mask_key)
            if mask is not None:
                amap = amap * (torch.as_tensor(mask) > 0).to(amap.device)
            self.subject_scores[name] = {"score": self.inferer.subject_score(amap), **axis_max}
            item[self.pred_key] = MetaTensor(amap, meta=item[self.image_key].meta)
            if self.postprocessing is not None:
                self.postprocessing(item)
            names.append(name)
        self.timings["write"] += time.perf_counter() - start
        return {"names": names}

    # ------------------------------------------------------------------ distributed
    @staticmethod
    def _world() -> tuple[int, int]:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def _dataset_order(self) -> list[str] | None:
        data = getattr(getattr(self.data_loader, "dataset", None), "data", None)
        if isinstance(data, Sequence) and all(isinstance(r, dict) and "name" in r for r in data):
            return [r["name"] for r in data]
        return None

    def _gather_banks(self) -> None:
        """All-gather every rank's tokens so that each rank sees the whole cohort as references."""
        self._my_names = list(self.names)
        rank, world = self._world()
        if world == 1:
            return
        # Compact copies: a grid is a row of this rank's BatchBuffer, and pickling a view sends its
        # whole buffer.
        bank = {
            part: {
                n: VolumeTokens(
                    vt.spatial_shape,
                    {k: TokenGrid(g.tokens.clone(), g.valid.clone()) for k, g in vt.grids.items()},
                )
                for n, vt in volumes.items()
            }
            for part, volumes in self.bank.items()
        }
        local = {"names": self.names, "bank": bank, "skipped": self.skipped, "counts": self.counts}
        local["sources"] = self.sources
        gathered: list[dict] = [None] * world  # type: ignore[list-item]
        torch.distributed.all_gather_object(gathered, local)
        order = self._dataset_order()
        names = [n for g in gathered for n in g["names"]]
        if order is not None:  # the single-process order, so that scores.csv is identical
            position = {n: i for i, n in enumerate(order)}
            names.sort(key=lambda n: position.get(n, len(position)))
        self.names = names
        self.bank = {
            part: {n: b for g in gathered for n, b in g["bank"].get(part, {}).items()} for part in self.bank
        }
        self._buffers = {}  # every grid is now a gathered copy: let the local rows go
        self.skipped[:] = [s for g in gathered for s in g["skipped"] if s not in self.skipped] + self.skipped
        self.counts = {k: sum(g["counts"][k] for g in gathered) for k in self.counts}
        self.sources = {n: s for g in gathered for n, s in g["sources"].items()}

    def _gather_scores(self) -> bool:
        """Collect the subject scores of all ranks on rank 0; True on the rank that writes the tables."""
        rank, world = self._world()
        if world == 1:
            return True
        local = {"scores": self.subject_scores, "timings": self.timings}
        gathered: list[dict] = [None] * world  # type: ignore[list-item]
        torch.distributed.all_gather_object(gathered, local)
        self.subject_scores = {n: v for g in gathered for n, v in g["scores"].items()}
        self.timings = {k: max(g["timings"][k] for g in gathered) for k in self.timings}
        return rank == 0

    # ------------------------------------------------------------------ outputs
    def _finish(self, engine: Engine) -> None:
        if not self._gather_scores():
            return
        names = self.names
        if self.build_bank is not None:
            atomic_write_text(self.output_dir / "run.json", json.dumps(self.summary(), indent=2, default=str))
            if not self.quiet:
                print(f"cs3f: token bank of {len(names)} volumes in {self.build_bank}", flush=True)
            return
        axes = [k for k in next(iter(self.subject_scores.values())) if k != "score"]
        lines = [",".join(["image", "score", *[f"score_{a}" for a in axes]])]
        for name in names:
            row = self.subject_scores[name]
            lines.append(",".join([name, f"{row['score']:.6g}", *[f"{row[a]:.6g}" for a in axes]]))
        atomic_write_text(self.output_dir / "scores.csv", "\n".join(lines) + "\n")
        atomic_write_text(self.output_dir / "run.json", json.dumps(self.summary(), indent=2, default=str))
        if not self.quiet:
            print(
                f"cs3f: {len(names)} anomaly maps in {self.output_dir}/<image>_anomaly.nii.gz, scores "
                f"in {self.output_dir / 'scores.csv'}, run record in {self.output_dir / 'run.json'}",
                flush=True,
            )

    def summary(self) -> dict:
        """Run record: parameters, encoder identity, versions, timings, memory and token counts."""
        import monai
        import numpy

        info = {
            "inferer": self.inferer.describe(),
            "encoder": self._encoder_identity(self.network),
            "n_volumes": len(self.names),
            "volumes": self.names,
            "parts": list(self.bank),
            "world_size": self._world()[1],
            "skipped": self.skipped,
            "encoded_volumes": self.counts["encoded"],
            "cached_volumes": self.counts["cached"],
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
            "seconds_per_volume": round(sum(self.timings.values()) / max(1, len(self.names)), 3),
            "peak_rss_mb": round(_peak_rss_mb(), 1),
            "tokens": self._bank_stats or self._token_stats(),
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "monai": monai.__version__,
                "numpy": numpy.__version__,
            },
            "device": str(self.state.device),
            "outputs": {"scores": str(self.output_dir / "scores.csv"), "maps": str(self.output_dir)},
        }
        if self.build_bank is not None:
            info["outputs"] = {"bank": str(self.build_bank)}
        if self.reference is not None:
            info["reference_bank"] = {
                "folder": str(self.reference.folder),
                "n_volumes": len(self.reference),
                "version": self.reference.manifest["version"],
                "excluded_self": sorted(
                    n for n in self.names if self.reference.index_of_source(self.sources.get(n)) is not None
                ),
            }
        if torch.cuda.is_available():
            info["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        info["config"] = self.run_info
        return info
