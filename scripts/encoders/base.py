"""The slice-encoder interface (:class:`SliceEncoder`) and what every encoder shares: weight paths and hashes."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path

import torch
from scripts.digest import file_digest
from scripts.errors import CS3FInputError
from torch import Tensor

__all__ = ["BUNDLE_ROOT", "ENCODER_PRECISIONS", "IMAGENET_MEAN", "IMAGENET_STD", "SliceEncoder", "resolve_bundle_path"]

#: values of the ``encoder_precision`` key: autocast dtype of the encoder's forward
ENCODER_PRECISIONS = ("auto", "fp32", "fp16", "bf16")
#: the ImageNet normalisation (what DINOv2/DINOv3 were trained with)
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
_AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}

#: Root of the bundle (the repository root): this file is ``scripts/encoders/base.py`` below it.
BUNDLE_ROOT = Path(__file__).resolve().parents[2]


def resolve_bundle_path(path: str | Path) -> Path:
    """A weights path as given when absolute or found from the current directory, else under the bundle root."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    return BUNDLE_ROOT / p


class SliceEncoder(torch.nn.Module, ABC):
    """Frozen 2D encoder: slices ``[N, 3, R, R]`` in, a list of patch grids ``[N, C_l, P_l, P_l]`` out.

    Subclasses set the attributes below (``input_size``: R; ``mean``/``std``: the slices' normalisation;
    ``out_channels``: C_l per layer, in ``layers`` order), implement :meth:`extract` and call :meth:`_freeze`.
    """

    name: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    out_channels: list[int]
    layers: tuple

    precision: str = "fp32"  # autocast of the forward (:meth:`set_precision`)

    def __init__(self) -> None:
        super().__init__()
        self._grid_sizes: list[int] | None = None
        self._identity: dict | None = None

    def set_precision(self, precision: str) -> SliceEncoder:
        """Run the forward under autocast: ``"fp16"``, ``"bf16"``, ``"fp32"`` (none) or ``"auto"`` (fp16 on CUDA,
        fp32 elsewhere); returns the encoder."""
        name = str(precision).strip().lower()
        if name not in ENCODER_PRECISIONS:
            raise CS3FInputError(f"encoder_precision must be one of {', '.join(ENCODER_PRECISIONS)}, got {precision!r}")
        self.precision = name
        self._identity = None
        return self

    def autocast(self, device: torch.device) -> str:
        """The precision the forward runs with on ``device`` (``"auto"`` resolved)."""
        if self.precision == "auto":
            return "fp16" if device.type == "cuda" else "fp32"
        return self.precision

    @abstractmethod
    def extract(self, x: Tensor) -> list[Tensor]:
        """The patch grids ``[N, C_l, P_l, P_l]`` of the requested layers of validated slices ``[N, 3, R, R]``."""

    def _weights_files(self) -> list[Path]:
        """Files whose content defines the weights (hashed by :meth:`identity`)."""
        return []

    def _identity_extra(self) -> dict:
        """Encoder-specific entries of :meth:`identity`."""
        return {}

    def _freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> SliceEncoder:
        """Stay in eval mode whatever ``mode`` is (BatchNorm must not update)."""
        return super().train(False)

    def grid_sizes(self) -> list[int]:
        """P_l of each returned layer at ``input_size`` (by default from one cached dry run)."""
        if self._grid_sizes is None:
            p = next(self.parameters())
            dry = torch.zeros(1, 3, self.input_size, self.input_size, device=p.device, dtype=p.dtype)
            with torch.inference_mode():
                self._grid_sizes = [int(g.shape[-1]) for g in self.extract(dry)]
        return list(self._grid_sizes)

    def identity(self) -> dict:
        """A stable, JSON-serialisable description (weights by name and sha256) for caches and ``run.json``."""
        if self._identity is None:
            ident = {
                "name": self.name,
                "class": type(self).__name__,
                "layers": list(self.layers),
                "input_size": self.input_size,
                "mean": [float(v) for v in self.mean],
                "std": [float(v) for v in self.std],
                "out_channels": list(self.out_channels),
                "grid_sizes": self.grid_sizes(),
            }
            ident.update(self._identity_extra())
            used = self.autocast(next(self.parameters()).device)
            if used != "fp32":  # other tokens than the fp32 forward's (fp32 identities unchanged)
                ident["autocast"] = used
            ident["weights"] = [{"file": f.name, "sha256": file_digest([f])} for f in self._weights_files()]
            self._identity = ident
        return json.loads(json.dumps(self._identity))  # a deep copy callers may modify

    def forward(self, x: Tensor) -> list[Tensor]:
        """One float32 ``[N, C_l, P_l, P_l]`` per layer of normalised float slices ``x [N, 3, R, R]`` (``N >= 1``,
        ``R == input_size``), on the encoder's device; ``ValueError`` for any other ``x``."""
        r = self.input_size
        if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[1] != 3 or x.shape[2:] != (r, r):
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{self.name}: expected slices of shape [N, 3, {r}, {r}], got {got}.")
        if x.shape[0] < 1:
            raise ValueError(f"{self.name}: got an empty batch (N = 0).")
        if not x.is_floating_point():
            raise ValueError(f"{self.name}: expected floating-point slices, got dtype {x.dtype}.")
        p = next(self.parameters())
        dtype = _AUTOCAST.get(self.autocast(p.device))
        with torch.inference_mode(), torch.autocast(p.device.type, dtype=dtype, enabled=dtype is not None):
            feats = self.extract(x.to(device=p.device, dtype=p.dtype, non_blocking=True))
            return [f.float() for f in feats]

    def extra_repr(self) -> str:
        return f"name={self.name!r}, layers={list(self.layers)}, input_size={self.input_size}"
