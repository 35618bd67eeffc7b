"""The bundle's ``network_def``: a frozen slice encoder as the one-tensor network (``state_dict`` =
``models/model.pt``) that MONAI's bundle tools expect; CS3F itself runs on its ``encoder``."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import torch
from scripts.encoders.base import SliceEncoder
from torch import Tensor

__all__ = ["SliceFeatureNetwork", "save_network_weights"]


class SliceFeatureNetwork(torch.nn.Module):
    """One-tensor view of a frozen slice encoder (its weights: the ``state_dict`` under ``encoder.``)."""

    def __init__(self, encoder: SliceEncoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.out_channels = int(sum(self.encoder.out_channels))

    def train(self, mode: bool = True) -> SliceFeatureNetwork:
        return super().train(False)

    def forward(self, x: Tensor) -> Tensor:
        """Slices ``[N, 3, R, R]`` -> ``[N, sum(C_l), P, P]`` float32, every grid nearest-resized to the largest."""
        grids = self.encoder(x)
        size = max(int(g.shape[-1]) for g in grids)
        resized = [
            g if g.shape[-1] == size else torch.nn.functional.interpolate(g, size=(size, size), mode="nearest")
            for g in grids
        ]
        return torch.cat(resized, dim=1)


def save_network_weights(network: torch.nn.Module, path: str | Path) -> str:
    """Write ``network.state_dict()`` to ``path`` (serialised in memory first: the archive's inner folder name
    does not follow the file's name); return the file's sha256."""
    buffer = io.BytesIO()
    state = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    torch.save(state, buffer)
    data = buffer.getvalue()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return hashlib.sha256(data).hexdigest()
