"""The cohort state of a :class:`~scripts.engine.evaluator.CS3FEvaluator` run (filled by pass 1)."""

from __future__ import annotations

import warnings
from typing import Any

from monai.data import MetaTensor
from scripts.engine.datalist import image_stem
from scripts.engine.distributed import dataset_order, gather_cohort, world
from scripts.engine.subjects import join_identical
from scripts.errors import CS3FInputError
from scripts.tokens import BatchBuffer, VolumeTokens

__all__ = ["Cohort", "volume_name"]


def volume_name(item: dict, image_key: str = "image") -> str:
    """The name of a preprocessed item's volume: its image file's name without the extension."""
    image = item[image_key]
    source = image.meta.get("filename_or_obj", "") if isinstance(image, MetaTensor) else ""
    if not source:
        raise CS3FInputError("volumes must come with their file name (LoadImaged meta 'filename_or_obj')")
    return image_stem(source)


class Cohort:
    """The volumes of one run and their tokens; ``data_loader``'s dataset sizes the token rows and orders the
    gathered cohort; ``skipped``: volumes left out (the engine appends to it)."""

    def __init__(self, data_loader: Any, skipped: list[dict]) -> None:
        self.data_loader = data_loader
        self.skipped = skipped
        self.names: list[str] = []  # volumes tokenized, in order (after gather: the whole cohort's)
        self.my_names: list[str] = []  # this process's share of them
        self.sources: dict[str, str] = {}  # name -> sha256 of its source files
        self.subjects: dict[str, tuple[str, str]] = {}  # name -> (subject, sha256 of its voxels)
        self.bank: dict[str, dict[str, VolumeTokens]] = {}  # part ("": whole volume) -> name -> tokens
        self.buffers: dict[str, BatchBuffer] = {}

    def capacity(self) -> int:
        """Inputs of the data loader: the most volumes a run may keep."""
        return len(self.data_loader.dataset)

    def skip(self, name: str, reason: str, on_bad_input: str) -> None:
        """Leave volume ``name`` out, with a warning (``on_bad_input`` ``"skip"``), or raise ``reason``."""
        if on_bad_input != "skip":
            raise CS3FInputError(reason)
        if all(s.get("name") != name for s in self.skipped):
            warnings.warn(f"cs3f: skipping {name}: {reason}", stacklevel=2)
            self.skipped.append({"name": name, "reason": reason})

    def keep(self, part: str, name: str, tokens: VolumeTokens) -> None:
        """Keep the tokens of ``part`` of volume ``name`` in that part's rows (see BatchBuffer)."""
        if part not in self.buffers:
            self.buffers[part] = BatchBuffer(self.capacity())
        self.bank.setdefault(part, {})[name] = self.buffers[part].add(tokens)

    def gather(self, counts: dict[str, int]) -> dict[str, int]:
        """End of pass 1: note this process's share, all-gather the cohort and the tokenizer's ``counts``."""
        self.my_names = list(self.names)
        if world()[1] == 1:
            return counts
        self.names, self.bank, skipped, counts, self.sources, self.subjects = gather_cohort(
            self.names, self.bank, self.skipped, counts, self.sources, dataset_order(self.data_loader), self.subjects
        )
        self.skipped[:] = skipped
        self.buffers = {}  # every grid is now a gathered copy: let the local rows go
        return counts

    def queries(self) -> list[int]:
        """Indices in ``names`` of this process's own volumes."""
        mine = set(self.my_names)
        return [i for i, n in enumerate(self.names) if n in mine]

    def joined_subjects(self) -> list[str]:
        """The subject of each volume of the cohort, in ``names`` order, identical volumes joined."""
        pairs = [self.subjects.get(n, ("", "")) for n in self.names]
        return join_identical(
            self.names, [s or n for n, (s, _) in zip(self.names, pairs, strict=True)], [v for _, v in pairs]
        )

    def release_tokens(self) -> None:
        """Let the tokens go (the parts stay listed), once the token scores exist."""
        self.bank = {part: {} for part in self.bank}
        self.buffers = {}
