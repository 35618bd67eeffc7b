"""The EfficientNet-Lite0 forward as the PyPI package computes it, for the encoder what-if.

The bundle's encoder (:class:`scripts.encoders.EfficientNetLite0Encoder`) runs an inference form of
the model: BatchNorm folded into the convs, symmetric TF-"same" pads inside the convs, channels_last.
To time that form against the package's own, this module builds a second model straight from the
package (``efficientnet_lite_pytorch``) with the same weight file and layer names, and runs the
package's modules unchanged (conv -> BatchNorm, a separate pad, NCHW). It reads only the encoder's
public attributes (``name``, ``layers``, ``input_size``, ``weights_path``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

ENCODER_NAME = "efficientnet_lite0"


def stage_last_blocks(model: torch.nn.Module) -> dict[str, int]:
    """Index of the last block of each stage of a package model: ``{"stem": -1, "stage1": 0, ...}``.

    The package builds ``round_repeats(num_repeat)`` blocks per entry of its ``blocks_args``, except
    for the first and last entries when the stem and head are fixed (Lite models); this repeats its
    rule. Stage names are those the bundle's encoder accepts as ``layers``.

    Raises:
        RuntimeError: the rule does not account for every block of ``model``.
    """
    from efficientnet_lite_pytorch.utils import round_repeats

    args, params = model._blocks_args, model._global_params
    ends, last = {"stem": -1}, -1
    for i, block_args in enumerate(args):
        fixed = model._fix_head_stem and i in (0, len(args) - 1)
        last += block_args.num_repeat if fixed else round_repeats(block_args.num_repeat, params)
        ends[f"stage{i + 1}"] = last
    if last != len(model._blocks) - 1:
        raise RuntimeError(f"{ENCODER_NAME}: stage table covers {last + 1} of {len(model._blocks)} blocks")
    return ends


def package_model(input_size: int, weights_path: str, device: torch.device) -> torch.nn.Module:
    """The package's EfficientNet-Lite0 for ``input_size`` with a state dict loaded strictly, in eval mode."""
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0", image_size=input_size)
    model.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True), strict=True)
    return model.eval().requires_grad_(False).to(device)


def unfused_encoder(encoder: torch.nn.Module) -> Callable[[torch.Tensor], list[torch.Tensor]] | None:
    """The package's unfused forward with ``encoder``'s weights and layers.

    Args:
        encoder: a slice encoder of the bundle.

    Returns:
        ``x -> [one grid per layer of encoder.layers, in that order]``, stopping after the deepest
        requested block as the encoder does; ``None`` when ``encoder`` is not EfficientNet-Lite0.
    """
    if getattr(encoder, "name", None) != ENCODER_NAME:
        return None
    device = next(encoder.parameters()).device
    model = package_model(encoder.input_size, str(encoder.weights_path), device)
    ends = stage_last_blocks(model)
    wanted = [ends[name] for name in encoder.layers]

    @torch.inference_mode()
    def forward(x: torch.Tensor) -> list[torch.Tensor]:
        x = model._swish(model._bn0(model._conv_stem(x)))
        found = {-1: x} if -1 in wanted else {}
        # Drop-connect is a no-op in eval mode, so blocks are called without a rate.
        for idx in range(max(wanted) + 1):
            x = model._blocks[idx](x)
            if idx in wanted:
                found[idx] = x
        return [found[i] for i in wanted]

    return forward
