"""Per-volume token cache ``<cache_dir>/<stem>.pt``, used only when its run key (everything that shapes
tokens), source key (the input files' bytes) and content sha256 match; a damaged entry warns."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import torch
from scripts.storage.atomic import atomic_write
from scripts.tokens import TokenGrid, VolumeTokens

__all__ = ["TokenCache", "entry_digest"]

CACHE_FORMAT = 2


def entry_digest(entry: dict) -> str:
    """sha256 of a cache entry's keys, spatial shape and every tensor's shape, dtype and bytes."""
    digest = hashlib.sha256(json.dumps([entry["run_key"], entry["source_key"], entry["spatial_shape"]]).encode())
    for key in sorted(entry["grids"]):
        for tensor in entry["grids"][key]:
            tensor = tensor.detach().cpu().contiguous()
            digest.update(repr((key, tuple(tensor.shape), str(tensor.dtype))).encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


class TokenCache:
    """Token cache in ``folder`` for runs identified by ``identity`` (any JSON-serialisable dict)."""

    def __init__(self, folder: str | Path, identity: dict) -> None:
        self.folder = Path(folder)
        blob = json.dumps({"format": CACHE_FORMAT, **identity}, sort_keys=True, default=str)
        self.run_key = hashlib.sha256(blob.encode()).hexdigest()

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.pt"

    def load(self, name: str, source_key: str) -> VolumeTokens | None:
        """The cached tokens of ``name`` if they were made by this run's configuration from these bytes."""
        path = self.path(name)
        if not path.is_file():
            return None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            if entry.get("format") != CACHE_FORMAT:  # another bundle version's entry: stale, not damaged
                return None
            intact = entry.get("sha256") == entry_digest(entry)
        except Exception:  # noqa: BLE001 - whatever the damage, the entry is encoded again
            intact = False
        if not intact:
            warnings.warn(f"cs3f: token cache entry {path} is damaged: encoding it again", stacklevel=3)
            return None
        if entry["run_key"] != self.run_key or entry["source_key"] != source_key:
            return None
        grids = {k: TokenGrid(tokens, valid) for k, (tokens, valid) in entry["grids"].items()}
        return VolumeTokens(spatial_shape=tuple(entry["spatial_shape"]), grids=grids)

    def save(self, name: str, source_key: str, tokens: VolumeTokens) -> None:
        """Store the tokens of ``name`` made from the source files whose digest is ``source_key``."""
        entry = {
            "format": CACHE_FORMAT,
            "run_key": self.run_key,
            "source_key": source_key,
            "spatial_shape": list(tokens.spatial_shape),
            "grids": {k: (g.tokens.cpu(), g.valid.cpu()) for k, g in tokens.grids.items()},
        }
        entry["sha256"] = entry_digest(entry)
        atomic_write(self.path(name), lambda tmp: torch.save(entry, tmp))
