"""Tokens of one preprocessed volume (or part of one): from the token cache when it holds an entry made
by this configuration from the same source files, else encoded by the inferer and cached."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch
from monai.data import MetaTensor
from scripts.digest import file_digest
from scripts.errors import CS3FInputError
from scripts.inferer import CS3FInferer
from scripts.storage.cache import TokenCache
from scripts.tokens import VolumeTokens

__all__ = ["CachedTokenizer", "registration_of", "source_digest", "voxel_digest", "with_registration"]


def voxel_digest(image: torch.Tensor) -> str:
    """sha256 of a preprocessed volume's shape, dtype and voxel values."""
    array = np.ascontiguousarray(torch.as_tensor(image).detach().cpu().numpy())
    return hashlib.sha256(repr((array.shape, array.dtype.str)).encode() + array.tobytes()).hexdigest()


def source_digest(item: dict, keys: tuple[str, ...] = ("image", "mask")) -> str:
    """sha256 of the files ``item``'s ``keys`` were loaded from (their ``filename_or_obj`` meta) and of how a
    transform made any of them (``meta["made_by"]``, e.g. :class:`~scripts.transforms.lung_masks.LungMasksd`)."""
    files, made = [], []
    for value in (item.get(key) for key in keys):
        if isinstance(value, MetaTensor) and value.meta.get("filename_or_obj"):
            files.append(str(value.meta["filename_or_obj"]))
        if isinstance(value, MetaTensor) and "made_by" in value.meta:
            made.append(value.meta["made_by"])
    digest = file_digest(files)
    return hashlib.sha256(json.dumps([digest, *made]).encode()).hexdigest() if made else digest


def registration_of(image: torch.Tensor) -> dict | None:
    """``meta["registration"]`` (set by :class:`scripts.transforms.registration.Registerd`), or ``None``."""
    record = image.meta.get("registration") if isinstance(image, MetaTensor) else None
    return json.loads(record) if isinstance(record, str) else None


def with_registration(source_key: str, registration: dict) -> str:
    """``source_key`` combined with the template and transform of ``registration``."""
    blob = json.dumps([source_key, registration["template"], registration["transform"]])
    return hashlib.sha256(blob.encode()).hexdigest()


class CachedTokenizer:
    """``inferer.tokenize`` behind a :class:`~scripts.storage.cache.TokenCache` (``None``: no cache),
    counting the volumes ``encoded`` and those read from the ``cached`` entries."""

    def __init__(self, inferer: CS3FInferer, network: torch.nn.Module, cache: TokenCache | None) -> None:
        self.inferer, self.network, self.cache = inferer, network, cache
        self.counts = {"encoded": 0, "cached": 0}

    def __call__(self, key: str, source_key: str, image: torch.Tensor, mask: torch.Tensor | None) -> VolumeTokens:
        """The tokens of ``image`` (cache entry ``key``, made from files of digest ``source_key``)."""
        tokens = self.cache.load(key, source_key) if self.cache is not None else None
        if tokens is not None:
            self.counts["cached"] += 1
            return tokens
        try:
            tokens = self.inferer.tokenize(image, self.network, mask)
        except ValueError as err:  # geometry/parameter problems (e.g. q not dividing an axis)
            raise CS3FInputError(f"{key}: {' '.join(str(err).split())}") from None
        self.counts["encoded"] += 1
        if self.cache is not None:
            self.cache.save(key, source_key, tokens)
        return tokens
