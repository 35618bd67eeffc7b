"""The unfused EfficientNet-Lite0 of the encoder what-if: the package's own modules, the encoder's layers."""

from __future__ import annotations

import torch
from scripts.benchmarks.unfused import package_model, stage_last_blocks, unfused_encoder
from scripts.encoders import build_encoder
from tests.helpers import TinyEncoder


def test_unfused_forward_equals_the_shipped_encoder_on_every_layer() -> None:
    # Out of stage order, with the stem and the last stage: each grid must come back in this order.
    encoder = build_encoder("efficientnet_lite0", input_size=32, layers=["stage5", "stem", "stage2"])
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    shipped = encoder(x)
    unfused = unfused_encoder(encoder)(x)
    assert [tuple(g.shape) for g in unfused] == [tuple(g.shape) for g in shipped]
    assert [g.shape[1] for g in unfused] == [112, 32, 24]  # stage channels of EfficientNet-Lite0
    for a, b in zip(unfused, shipped, strict=True):
        assert float((a - b).abs().max() / a.abs().max()) < 1e-4


def test_the_package_model_is_the_unfused_form() -> None:
    encoder = build_encoder("efficientnet_lite0", input_size=32)
    model = package_model(32, str(encoder.weights_path), torch.device("cpu"))
    # The shipped encoder folds every BatchNorm away; the package's model keeps them.
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in encoder.modules())
    # Last block of each stage, from the EfficientNet-Lite0 architecture (1, 2, 2, 3, 3, 4, 1 blocks).
    expected = {"stem": -1, "stage1": 0, "stage2": 2, "stage3": 4, "stage4": 7, "stage5": 10}
    assert stage_last_blocks(model) == {**expected, "stage6": 14, "stage7": 15}


def test_other_encoders_have_no_unfused_form() -> None:
    assert unfused_encoder(TinyEncoder()) is None
