"""The bundle's ``network_def``: a frozen slice encoder seen as one network with one output tensor.

MONAI's bundle tools and the Model Zoo's CI expect ``network_def`` to map one tensor to one tensor, with
``models/model.pt`` as its ``state_dict``; CS3F itself runs on its ``encoder``
(``"network": "$@network_def.encoder.to(@device)"``).
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import torch
from scripts.encoders.base import SliceEncoder
from torch import Tensor

__all__ = ["SliceFeatureNetwork", "save_network_weights"]


class SliceFeatureNetwork(torch.nn.Module):
    """One-tensor view of a frozen slice encoder (built by :func:`scripts.encoders.build_network`).

    Args:
        encoder: the frozen slice encoder to wrap; its weights are the ``state_dict`` under ``encoder.``.
    """

    def __init__(self, encoder: SliceEncoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.out_channels = int(sum(self.encoder.out_channels))

    def train(self, mode: bool = True) -> SliceFeatureNetwork:
        """Stay in eval mode, like the encoder: nothing in this network is ever trained."""
        return super().train(False)

    def forward(self, x: Tensor) -> Tensor:
        """Slices ``[N, 3, R, R]`` (normalised with ``encoder.mean``/``encoder.std``) ->
        ``[N, sum(C_l), P, P]`` float32: every layer's patch grid, nearest-resized to ``P x P``."""
        grids = self.encoder(x)
        size = max(int(g.shape[-1]) for g in grids)
        resized = [
            g if g.shape[-1] == size else torch.nn.functional.interpolate(g, size=(size, size), mode="nearest")
            for g in grids
        ]
        return torch.cat(resized, dim=1)


def save_network_weights(network: torch.nn.Module, path: str | Path) -> str:
    """Write ``network.state_dict()`` to ``path`` with ``torch.save``; return the file's sha256.

    Serialised in memory first, so the archive's inner folder name does not follow the file's name.
    """
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
