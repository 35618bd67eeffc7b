"""The bundle draws random references by volume name (the reference sets themselves:
tests/unit/test_references.py)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from scripts.inferer import CS3FInferer
from tests.helpers import run_workflow


def _equal(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b, strict=True)
    )


def test_bundle_passes_names_for_random_references(tiny_cohort: Path, tmp_path: Path) -> None:
    """The workflow draws references by volume name: its token scores equal the inferer's on the same
    tokens given in another order with their names (a draw by position would differ)."""
    evaluator = run_workflow(
        dataset_dir=str(tiny_cohort),
        output_dir=str(tmp_path / "out"),
        references="random:2",
        rho=0.5,
        **{"evaluator#keep_tokens": True},  # the test reads evaluator.cohort.bank after the run
        **{"dataloader#num_workers": 0},
    )
    assert len(list((tmp_path / "out").glob("*_anomaly.nii.gz"))) == 6
    assert json.loads((tmp_path / "out" / "run.json").read_text())["inferer"]["references"] == "random:2"
    names = list(reversed(evaluator.cohort.names))
    bank = [evaluator.cohort.bank[""][n] for n in names]
    inferer = CS3FInferer(q=8, d=128, rho=0.5, references="random:2", variant="C")  # the default's, at FAST's q
    expected = inferer.score(bank, names=names)
    assert _equal([evaluator.scoring.token_scores[""][n] for n in names], expected)
    by_position = inferer.score(bank)
    assert not _equal(by_position, expected)
