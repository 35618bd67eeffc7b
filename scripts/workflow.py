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
"""

from __future__ import annotations

import json
import os
import platform
import resource
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor, decollate_batch
from monai.engines import Workflow

from scripts.data import CS3FInputError, find_input_error, image_stem
from scripts.inferer import CS3FInferer, VolumeTokens

__all__ = ["CS3FEvaluator", "atomic_write_text"]


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (never a truncated file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


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
        run_info: extra entries recorded in ``run.json`` (e.g. the parameters of the config).
        quiet: do not print where the outputs are at the end.
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
        self.quiet = quiet
        self.bank: dict[str, VolumeTokens] = {}
        self.token_scores: dict[str, dict[str, torch.Tensor]] = {}
        self.subject_scores: dict[str, dict[str, float]] = {}
        self.timings: dict[str, float] = {"load": 0.0, "tokenize": 0.0, "score": 0.0, "write": 0.0}
        self._batch_started = 0.0
        self.add_event_handler(Events.GET_BATCH_STARTED, self._mark_batch_start)
        self.add_event_handler(Events.GET_BATCH_COMPLETED, self._add_load_time)
        self.add_event_handler(Events.EPOCH_COMPLETED(once=1), self._score)
        self.add_event_handler(Events.COMPLETED, self._finish)
        self.logger.addFilter(self._drop_input_error_logs)

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

    def _tokenize(self, items: list[dict]) -> dict:
        start = time.perf_counter()
        names = []
        for item in items:
            name = self._name(item)
            if name in self.bank:
                raise CS3FInputError(f"two inputs are named {name!r}: output files would collide")
            mask = item.get(self.mask_key)
            self.bank[name] = self.inferer.tokenize(item[self.image_key], self.network, mask)
            names.append(name)
        self.timings["tokenize"] += time.perf_counter() - start
        return {"names": names}

    def _score(self, engine: Engine) -> None:
        start = time.perf_counter()
        names = list(self.bank)
        try:
            scores = self.inferer.score([self.bank[n] for n in names])
        except ValueError as err:
            raise CS3FInputError(str(err)) from None
        self.token_scores = dict(zip(names, scores, strict=True))
        self.timings["score"] += time.perf_counter() - start

    def _write(self, items: list[dict]) -> dict:
        start = time.perf_counter()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        names = []
        for item in items:
            name = self._name(item)
            mask = item.get(self.mask_key)
            spatial = tuple(item[self.image_key].shape[1:])
            axis_max: dict[str, float] = {}
            amap = self.inferer.voxel_map(self.token_scores[name], spatial, mask, axis_max=axis_max)
            self.subject_scores[name] = {"score": self.inferer.subject_score(amap), **axis_max}
            item[self.pred_key] = MetaTensor(amap, meta=item[self.image_key].meta)
            if self.postprocessing is not None:
                self.postprocessing(item)
            names.append(name)
        self.timings["write"] += time.perf_counter() - start
        return {"names": names}

    # ------------------------------------------------------------------ outputs
    def _finish(self, engine: Engine) -> None:
        names = list(self.bank)
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

        first = next(iter(self.bank.values()), None)
        info = {
            "inferer": self.inferer.describe(),
            "encoder": self.network.identity()
            if hasattr(self.network, "identity")
            else type(self.network).__name__,
            "n_volumes": len(self.bank),
            "volumes": list(self.bank),
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
            "seconds_per_volume": round(sum(self.timings.values()) / max(1, len(self.bank)), 3),
            "peak_rss_mb": round(_peak_rss_mb(), 1),
            "tokens": {
                "per_volume": first.num_tokens() if first else 0,
                "grids": {k: list(g.shape) for k, g in first.grids.items()} if first else {},
                "bank_mb": round(sum(v.nbytes() for v in self.bank.values()) / 2**20, 2),
            },
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "monai": monai.__version__,
                "numpy": numpy.__version__,
            },
            "device": str(self.state.device),
            "outputs": {"scores": str(self.output_dir / "scores.csv"), "maps": str(self.output_dir)},
        }
        if torch.cuda.is_available():
            info["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        info["config"] = self.run_info
        return info
