"""The scoring step of :class:`~scripts.engine.evaluator.CS3FEvaluator`, between its two passes: score the
cohort against itself or a reference bank (``references: bank:DIR``), or save its tokens as a bank."""

from __future__ import annotations

from pathlib import Path

import torch
from scripts.engine.cohort import Cohort
from scripts.engine.distributed import world
from scripts.engine.grid import CohortGrid
from scripts.engine.identity import encoder_identity
from scripts.engine.record import token_stats
from scripts.engine.subjects import no_reference_error, without_references
from scripts.errors import CS3FInputError
from scripts.inferer import CS3FInferer
from scripts.storage.bank import BankWriter, TokenBank, bank_identity
from scripts.tokens import VolumeTokens

__all__ = ["CohortScoring"]


class CohortScoring:
    """The scoring step; single-process ``build_bank`` runs stream each volume to the bank (:meth:`bank_writer`).

    Args:
        inferer: the scoring inferer; a reference bank it names is checked here, before any encoding.
        network, preprocessing_identity: the encoder and the preprocessing's parameters (the bank identity).
        grid: the cohort's grids; new volumes must be on a reference bank's grids, a built bank records them.
        build_bank: folder to save the cohort's token bank in (``None``: score instead).
        keep_tokens: keep the tokens after scoring (by default the cohort releases them).

    Results: ``token_scores``, ``token_validity`` (``{part: {name: {axis: tensor}}}``, this rank's volumes),
    ``token_stats``.
    """

    def __init__(
        self,
        inferer: CS3FInferer,
        network: torch.nn.Module,
        preprocessing_identity: dict,
        grid: CohortGrid,
        build_bank: str | Path | None = None,
        keep_tokens: bool = False,
    ) -> None:
        self.inferer, self.network, self.preprocessing_identity = inferer, network, preprocessing_identity
        self.grid, self.keep_tokens = grid, keep_tokens
        self.token_scores: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
        self.token_validity: dict[str, dict[str, dict[str, torch.Tensor]]] = {}  # edge="normalized" only
        self.token_stats: dict = {}
        folder = inferer.references.folder if inferer.references.mode == "bank" else None
        if build_bank and folder:
            raise CS3FInputError(
                f"build_bank and references {inferer.references} exclude each other: build a bank, or score against one"
            )
        self.build_bank = Path(build_bank) if build_bank else None
        self.reference = TokenBank(folder) if folder else None
        self._writer: BankWriter | None = None
        self._bank_parts: set[str] = set()
        if self.reference is not None:
            self.reference.check(self._bank_identity())  # before hours of encoding
            for part in self.reference.parts:
                if (part_grid := self.reference.grid(part)) is not None:
                    self.grid.expect(part, part_grid)

    def __call__(self, cohort: Cohort) -> None:
        """End of pass 1 (``cohort`` gathered): token scores (or the bank saved), then the tokens released."""
        self._score_tokens(cohort)
        self.token_stats = token_stats(cohort.bank)
        if self.inferer.edge == "normalized":  # pass 2 interpolates with the (small) validity grids
            self.token_validity = {
                part: {n: {k: g.valid.clone() for k, g in vt.grids.items()} for n, vt in volumes.items()}
                for part, volumes in cohort.bank.items()
            }
        if not self.keep_tokens:  # pass 2 needs the token scores only
            cohort.release_tokens()

    def _score_tokens(self, cohort: Cohort) -> None:
        names = cohort.names
        if self.build_bank is not None and len(names) >= 2:
            self._save_bank(cohort)
            return
        if self.reference is not None:
            self._score_against_bank(cohort)
            return
        if len(names) < 2:
            raise CS3FInputError(
                f"CS3F compares volumes with each other: only {len(names)} usable volume(s) "
                f"({len(cohort.skipped)} skipped)"
            )
        queries = cohort.queries()
        # Each rank scores only its own volumes as queries (against every volume as a reference).
        only_mine = {"queries": queries} if world()[1] > 1 else {}
        subjects = cohort.joined_subjects()
        if len(set(subjects)) < len(subjects):
            only_mine["subjects"] = subjects
        lonely = without_references(subjects, self.inferer.references)  # the datalist checked them unjoined
        if lonely:
            how = "the subjects given, identical volumes joined"
            raise no_reference_error([names[i] for i in lonely], self.inferer.references, how)
        for part, bank in cohort.bank.items():
            try:
                scores = self.inferer.score([bank[n] for n in names], names=names, **only_mine)
            except ValueError as err:
                raise CS3FInputError(f"{part + ': ' if part else ''}{err}") from None
            self.token_scores[part] = {names[i]: scores[i] for i in queries}

    def _bank_identity(self) -> dict:
        return bank_identity(self.inferer.describe(), encoder_identity(self.network), self.preprocessing_identity)

    def bank_writer(self, cohort: Cohort) -> BankWriter | None:
        """The bank writer of a single-process ``build_bank`` run (under torchrun rank 0 saves the gathered bank)."""
        if self.build_bank is None or world()[1] > 1:
            return None
        if self._writer is None:
            self._writer = BankWriter(self.build_bank, cohort.capacity())
        return self._writer

    def add_to_bank(self, writer: BankWriter, name: str, part: str, tokens: VolumeTokens) -> None:
        writer.add(name, part, tokens)
        self._bank_parts.add(part)

    def abort(self) -> None:
        """A failed run: no half-built bank left behind."""
        if self._writer is not None:
            self._writer.abort()

    def _save_bank(self, cohort: Cohort) -> None:
        """Pass 1 of a ``build_bank`` run: finish the streamed bank, or save the gathered one (rank 0)."""
        if world()[0] != 0:
            return
        import monai

        info = {"versions": {"torch": torch.__version__, "monai": monai.__version__}}
        writer, parts = self._writer, self._bank_parts
        if writer is None:  # under torchrun: the gathered bank
            for part, volumes in cohort.bank.items():
                if missing := [n for n in cohort.names if n not in volumes]:
                    raise ValueError(f"part {part!r} has no tokens for {missing[:3]}")
            writer, parts = BankWriter(self.build_bank, len(cohort.names)), set(cohort.bank)
            for name in cohort.names:
                for part, volumes in cohort.bank.items():
                    writer.add(name, part, volumes[name])
        grids = {part: self.grid.grids[part] for part in parts if part in self.grid.grids}
        writer.finish(self._bank_identity(), cohort.sources, grids, info, cohort.subjects)

    def _score_against_bank(self, cohort: Cohort) -> None:
        names = cohort.names
        if not names:
            raise CS3FInputError(
                f"no usable volume to score against the reference bank ({len(cohort.skipped)} skipped)"
            )
        if set(cohort.bank) != set(self.reference.parts):
            raise CS3FInputError(
                f"reference_bank {self.reference.folder} holds parts {sorted(self.reference.parts)} but this "
                f"run makes {sorted(cohort.bank)}: use a bank built with the same workflow (e.g. lung_ct.json)"
            )
        queries = cohort.queries()
        exclude = [self.reference.same_subject(cohort.sources.get(n), *cohort.subjects.get(n, ("", ""))) for n in names]
        for part, bank in cohort.bank.items():
            try:
                scores = self.inferer.score(
                    [bank[n] for n in names], queries, reference_bank=self.reference.references(part), exclude=exclude
                )
            except ValueError as err:
                if isinstance(err, CS3FInputError):
                    raise
                raise CS3FInputError(f"{part + ': ' if part else ''}{err}") from None
            self.token_scores[part] = {names[i]: scores[i] for i in queries}
