"""Frozen 2D slice encoders (Eq. 3): slices ``[N, 3, R, R]`` in, one ``[N, C_l, P_l, P_l]`` float32 grid per
chosen layer out. Nothing here downloads; missing weights raise an error that says how to get them."""

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
    """A frozen slice encoder by name (one of :data:`ENCODER_NAMES`, case and ``-``/``_`` insensitive).

    ``kwargs`` go to the encoder's constructor (``None``: its default), except ``precision``, the autocast of
    the forward (:meth:`SliceEncoder.set_precision`). The ViT aliases take any DINOv2/DINOv3 ``model_dir=``.
    """
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    precision = kwargs.pop("precision", "fp32")
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
    """The bundle's ``network_def``: :func:`build_encoder` wrapped as a :class:`SliceFeatureNetwork`."""
    return SliceFeatureNetwork(build_encoder(name, **kwargs))
