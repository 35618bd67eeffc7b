"""The bundle's ``network_def``: a frozen slice encoder seen as one network with one output tensor.

MONAI's bundle tools (``verify_net_in_out``, ``ckpt_export``, ``trt_export``, ``monai.bundle.load``) and
the Model Zoo's CI treat ``network_def`` as a ``torch.nn.Module`` that maps one input tensor to one
output tensor and whose ``state_dict`` is ``models/model.pt``. A :class:`~scripts.encoders.SliceEncoder`
returns one patch grid per layer, a list; :class:`SliceFeatureNetwork` wraps it so that those tools work:

- ``forward``: slices ``[N, 3, R, R]`` -> the grids of every layer, resized (nearest) to the finest grid
  and concatenated on channels, ``[N, sum(C_l), P, P]`` (P = the largest ``P_l``). For the default
  encoder at R = 112 that is ``[N, 40 + 112, 14, 14]``.
- ``encoder``: the slice encoder itself. CS3F runs on it (``configs/inference.json``:
  ``"network": "$@network_def.encoder.to(@device)"``), never on the concatenated tensor.
- ``state_dict()``: the encoder's weights under ``encoder.``, in the encoder's inference form
  (:func:`save_network_weights` writes them as ``models/model.pt``).

``scripts.encoders.build_network(name, **kwargs)`` builds it from the same arguments as ``build_encoder``.
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
    """One-tensor view of a frozen slice encoder (the bundle's ``network_def``).

    Built by :func:`scripts.encoders.build_network` (the config's ``network_def``) from an encoder name.

    Args:
        encoder: the frozen slice encoder to wrap.

    Attributes:
        encoder: the :class:`~scripts.encoders.SliceEncoder` (frozen, eval mode).
        out_channels: channels of the concatenated output, ``sum(encoder.out_channels)``.
    """

    def __init__(self, encoder: SliceEncoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.out_channels = int(sum(self.encoder.out_channels))

    def train(self, mode: bool = True) -> SliceFeatureNetwork:
        """Stay in eval mode, like the encoder: nothing in this network is ever trained."""
        return super().train(False)

    def grid_size(self) -> int:
        """P, the side of the output grid: the finest grid among the encoder's layers."""
        return max(self.encoder.grid_sizes())

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

    The bytes depend only on the weights (and the torch serialisation format): the checkpoint is
    serialised in memory, so the archive's inner folder name does not follow the file's name, and
    then written in one piece.
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
