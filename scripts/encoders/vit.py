"""DINOv2/DINOv3-format ViTs read with ``transformers`` from a local directory (never downloaded)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from scripts.encoders.base import IMAGENET_MEAN, IMAGENET_STD, SliceEncoder, resolve_bundle_path
from scripts.errors import CS3FInputError, WeightsNotFoundError
from torch import Tensor

__all__ = ["DOWNLOAD_HINT", "VIT_MODEL_TYPES", "Dinov2Encoder"]

DOWNLOAD_HINT = (
    "Get it with `hf download {repo_id} --local-dir {path}` (huggingface_hub; the model's own licence "
    "applies); see models/README.md."
)
#: transformers ``model_type`` values whose token layout is [CLS, registers..., patches...]
VIT_MODEL_TYPES = ("dinov2", "dinov2_with_registers", "dinov3_vit")


class Dinov2Encoder(SliceEncoder):
    """A DINOv2/DINOv3-format ViT read with ``transformers`` from a local directory (``config.json`` with a
    ``model_type`` of :data:`VIT_MODEL_TYPES`, ``*.safetensors``, optional ``preprocessor_config.json``).

    Features (Eq. 3): ``hidden_states[l]`` (0: embeddings) without the CLS and register tokens, as
    ``[N, hidden_size, P, P]`` (``P = R // patch_size``), by default through the final LayerNorm (as MuSc).

    ``layers``: hidden-state indices, in output order (``None``: the quarters of the depth, the paper's
    ``(6, 12, 18, 24)`` for ViT-L); ``repo_id``: the Hugging Face repository named when weights are missing.
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
        if config.model_type not in VIT_MODEL_TYPES:
            raise CS3FInputError(
                f"{name}: {self.model_dir}/config.json has model_type {config.model_type!r}; "
                f"supported: {list(VIT_MODEL_TYPES)}."
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
        model, info = AutoModel.from_pretrained(self.model_dir, local_files_only=True, output_loading_info=True)
        # mask_token is used only for masked-image pre-training, never at inference.
        missing = sorted(k for k in info.get("missing_keys", ()) if not k.endswith("mask_token"))
        mismatched = sorted(str(k) for k in info.get("mismatched_keys", ()))
        if missing or mismatched:
            raise RuntimeError(
                f"{name}: the checkpoint in {self.model_dir} does not match its config "
                f"(missing: {missing[:5]}, mismatched: {mismatched[:5]}); refusing a partly random model."
            )
        model = model.float()  # fp32 whatever the checkpoint dtype (portable across transformers versions)
        # At least one block stays: hidden_states[0] (the embeddings) is recorded as the first block's input.
        self._truncate(model, max(1, *layers), depth)
        self.model = model
        self.out_channels = [int(config.hidden_size)] * len(layers)
        self._freeze()

    @staticmethod
    def _check_files(model_dir: Path, repo_id: str) -> None:
        hint = DOWNLOAD_HINT.format(repo_id=repo_id, path=model_dir)
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
        norm = getattr(self.model, "layernorm", getattr(self.model, "norm", None))
        if norm is None:  # pragma: no cover - all supported model types have one
            raise RuntimeError(f"{self.name}: no final norm found on {type(self.model).__name__}.")
        return norm

    def grid_sizes(self) -> list[int]:
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
