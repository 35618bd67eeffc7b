"""The scoring step of :class:`~scripts.engine.evaluator.CS3FEvaluator`, between its two passes.

After pass 1 every volume's tokens are known (gathered from all ranks under ``torchrun``). The step then
does one of three things:

* score the cohort against itself (:meth:`scripts.inferer.CS3FInferer.score`), each rank its own
  volumes as queries;
* score this run's volumes against a reference bank only (``references: bank:DIR``, the same
  :meth:`scripts.inferer.CS3FInferer.score` given the bank's tokens), after a check, at construction, that the bank
  was made with this configuration;
* save the cohort's tokens as a reference bank (``build_bank``; single-process runs stream each volume
  to the bank as it is tokenized, see :meth:`CohortScoring._bank_writer`).

:class:`CohortScoring` is a mixin of the evaluator: it reads and fills the evaluator's cohort state
(``names``, ``bank``, ``sources``, ``skipped``, ``tokenizer.counts``, ``grid``, ``token_scores``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from ignite.engine import Engine
from scripts.engine.distributed import dataset_order, gather_cohort, world
from scripts.engine.identity import encoder_identity
from scripts.engine.record import token_stats
from scripts.engine.subjects import join_identical
from scripts.errors import CS3FInputError
from scripts.storage.bank import BankWriter, TokenBank, bank_identity, save_bank

__all__ = ["CohortScoring"]


class CohortScoring:
    """The scoring step (see the module docstring), mixed into the evaluator."""

    def _init_banks(self, build_bank: str | Path | None) -> None:
        """Set up building a bank (pass 1 only) or scoring against one (the inferer's ``references``
        is ``bank:DIR``; checked here, before any encoding)."""
        folder = self.inferer.references.folder if self.inferer.references.mode == "bank" else None
        if build_bank and folder:
            raise CS3FInputError(
                f"build_bank and references {self.inferer.references} exclude each other: build a bank, or "
                f"score against one"
            )
        self.build_bank = Path(build_bank) if build_bank else None
        self.reference = TokenBank(folder) if folder else None
        self._writer: BankWriter | None = None
        self._bank_parts: set[str] = set()
        if self.reference is not None:
            self.reference.check(self._bank_identity())  # before hours of encoding
            for part in self.reference.parts:
                grid = self.reference.grid(part)
                if grid is not None:  # new volumes must be on the bank's grid
                    self.grid.expect(part, grid)

    def _score(self, engine: Engine) -> None:
        """End of pass 1: token scores of every volume (or the bank saved), then the bank released."""
        with self.times.measure("score"):
            self._score_tokens()
            self.token_stats = token_stats(self.bank)
            if self.inferer.edge == "normalized":  # pass 2 interpolates with the (small) validity grids
                self.token_validity = {
                    part: {n: {k: g.valid.clone() for k, g in vt.grids.items()} for n, vt in volumes.items()}
                    for part, volumes in self.bank.items()
                }
            if not self.keep_tokens:
                # Pass 2 needs the token scores only: the bank and its buffers go before the maps are made.
                self.bank = {part: {} for part in self.bank}
                self._buffers = {}

    def _score_tokens(self) -> None:
        self._gather_banks()
        names = self.names
        if self.build_bank is not None and len(names) >= 2:
            self._save_bank()
            return
        if self.reference is not None:
            self._score_against_bank()
            return
        if len(names) < 2:
            raise CS3FInputError(
                f"CS3F compares volumes with each other: only {len(names)} usable volume(s) "
                f"({len(self.skipped)} skipped)"
            )
        mine = set(self._my_names)
        queries = [i for i, n in enumerate(names) if n in mine]
        # Each rank scores only its own volumes as queries (against every volume as a reference).
        only_mine = {"queries": queries} if world()[1] > 1 else {}
        subjects = self._cohort_subjects()
        if len(set(subjects)) < len(subjects):
            only_mine["subjects"] = subjects
        for part, bank in self.bank.items():
            try:
                scores = self.inferer.score([bank[n] for n in names], names=names, **only_mine)
            except ValueError as err:
                raise CS3FInputError(f"{part + ': ' if part else ''}{err}") from None
            self.token_scores[part] = {names[i]: scores[i] for i in queries}

    def _gather_banks(self) -> None:
        """All-gather every rank's tokens so that each rank sees the whole cohort as references."""
        self._my_names = list(self.names)
        if world()[1] == 1:
            return
        self.names, self.bank, skipped, self.tokenizer.counts, self.sources, self.subjects = gather_cohort(
            self.names,
            self.bank,
            self.skipped,
            self.counts,
            self.sources,
            dataset_order(self.data_loader),
            self.subjects,
        )
        self.skipped[:] = skipped
        self._buffers = {}  # every grid is now a gathered copy: let the local rows go

    def _cohort_subjects(self) -> list[str]:
        """The subject of each volume of the cohort, in ``names`` order, identical volumes joined."""
        pairs = [self.subjects.get(n, ("", "")) for n in self.names]
        return join_identical(
            self.names, [s or n for n, (s, _) in zip(self.names, pairs, strict=True)], [v for _, v in pairs]
        )

    # ------------------------------------------------------------------ reference banks
    def _bank_identity(self) -> dict:
        return bank_identity(self.inferer.describe(), encoder_identity(self.network), self.preprocessing_identity)

    def _bank_writer(self) -> BankWriter | None:
        """In a single-process ``build_bank`` run, the writer that streams each volume's tokens to the
        bank as it is tokenized (with torchrun, the ranks' tokens are gathered and rank 0 saves them)."""
        if self.build_bank is None or world()[1] > 1:
            return None
        if self._writer is None:
            self._writer = BankWriter(self.build_bank, len(self.data_loader.dataset))
        return self._writer

    def _save_bank(self) -> None:
        """Pass 1 of a ``build_bank`` run: finish the streamed bank, or save the gathered one (rank 0)."""
        if world()[0] != 0:
            return
        import monai

        info = {"versions": {"torch": torch.__version__, "monai": monai.__version__}}
        parts = self._bank_parts if self._writer is not None else set(self.bank)
        grids = {part: self.grid.grids[part] for part in parts if part in self.grid.grids}
        if self._writer is not None:
            self._writer.finish(self._bank_identity(), self.sources, grids, info, self.subjects)
            return
        sources = [self.sources.get(n, "") for n in self.names]
        save_bank(self.build_bank, self._bank_identity(), self.names, sources, self.bank, grids, info, self.subjects)

    def _score_against_bank(self) -> None:
        """Score this run's volumes (this rank's share) against the reference bank's volumes only."""
        names = self.names
        if not names:
            raise CS3FInputError(f"no usable volume to score against the reference bank ({len(self.skipped)} skipped)")
        if set(self.bank) != set(self.reference.parts):
            raise CS3FInputError(
                f"reference_bank {self.reference.folder} holds parts {sorted(self.reference.parts)} but this "
                f"run makes {sorted(self.bank)}: use a bank built with the same workflow (e.g. lung_ct.json)"
            )
        mine = set(self._my_names)
        queries = [i for i, n in enumerate(names) if n in mine]
        exclude = [self.reference.same_subject(self.sources.get(n), *self.subjects.get(n, ("", ""))) for n in names]
        for part, bank in self.bank.items():
            try:
                scores = self.inferer.score(
                    [bank[n] for n in names], queries, reference_bank=self.reference.references(part), exclude=exclude
                )
            except ValueError as err:
                if isinstance(err, CS3FInputError):
                    raise
                raise CS3FInputError(f"{part + ': ' if part else ''}{err}") from None
            self.token_scores[part] = {names[i]: scores[i] for i in queries}
