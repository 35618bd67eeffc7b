"""Per-volume token cache: a killed run resumes without re-encoding what it already tokenized.

``<cache_dir>/<stem>.pt`` is used only when its run key (a hash of everything that shapes tokens) and
its source key (a hash of the input files' bytes) both match.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from scripts.storage.atomic import atomic_write
from scripts.tokens import TokenGrid, VolumeTokens

__all__ = ["TokenCache"]

CACHE_FORMAT = 1


class TokenCache:
    """Token cache in ``folder`` for runs identified by ``identity`` (any JSON-serialisable dict)."""

    def __init__(self, folder: str | Path, identity: dict) -> None:
        self.folder = Path(folder)
        blob = json.dumps({"format": CACHE_FORMAT, **identity}, sort_keys=True, default=str)
        self.run_key = hashlib.sha256(blob.encode()).hexdigest()

    def path(self, name: str) -> Path:
        """The entry file of ``name``."""
        return self.folder / f"{name}.pt"

    def load(self, name: str, source_key: str) -> VolumeTokens | None:
        """The cached tokens of ``name`` if they were made by this run's configuration from these bytes."""
        path = self.path(name)
        if not path.is_file():
            return None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # an unreadable entry is recomputed, never trusted
            return None
        if entry.get("run_key") != self.run_key or entry.get("source_key") != source_key:
            return None
        grids = {k: TokenGrid(tokens, valid) for k, (tokens, valid) in entry["grids"].items()}
        return VolumeTokens(spatial_shape=tuple(entry["spatial_shape"]), grids=grids)

    def save(self, name: str, source_key: str, tokens: VolumeTokens) -> None:
        """Store the tokens of ``name`` made from the source files whose digest is ``source_key``."""
        entry = {
            "run_key": self.run_key,
            "source_key": source_key,
            "spatial_shape": list(tokens.spatial_shape),
            "grids": {k: (g.tokens.cpu(), g.valid.cpu()) for k, g in tokens.grids.items()},
        }
        atomic_write(self.path(name), lambda tmp: torch.save(entry, tmp))
