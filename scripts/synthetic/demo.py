"""The bundle's demo cohorts, generated on first use when the configured dataset is the demo folder.

The configs call these from ``initialize`` (``generate_demo``); the generators are imported only when
a demo cohort has to be made.
"""

from __future__ import annotations

import importlib
from pathlib import Path

__all__ = ["ensure_demo", "ensure_lung_demo"]


def _ensure(dataset_dir: str | Path, demo_dir: str | Path, generator: str, what: str, synth_kwargs: dict) -> Path:
    """Generate the cohort of ``scripts.synthetic.<generator>`` into ``demo_dir`` when ``dataset_dir``
    is the demo folder and it is absent; returns ``dataset_dir``."""
    dataset_dir, demo_dir = Path(dataset_dir), Path(demo_dir)
    # A user-given dataset_dir that does not exist is never replaced by demo data: that is an error
    # raised later by make_datalist.
    if dataset_dir.resolve() == demo_dir.resolve() and not (demo_dir / "cohort.csv").is_file():
        module = importlib.import_module(f"scripts.synthetic.{generator}")  # lazily: it imports torch
        print(f"cs3f: {what} cohort not found, generating it in {demo_dir} ...", flush=True)
        module.ensure_cohort(demo_dir, **synth_kwargs)
    return dataset_dir


def ensure_demo(dataset_dir: str | Path, demo_dir: str | Path, **synth_kwargs) -> Path:
    """The brain demo cohort (:func:`scripts.synthetic.brain.generate_cohort` arguments in
    ``synth_kwargs``) in ``demo_dir`` if ``dataset_dir`` is that folder and it is absent."""
    return _ensure(dataset_dir, demo_dir, "brain", "demo", synth_kwargs)


def ensure_lung_demo(dataset_dir: str | Path, demo_dir: str | Path, **synth_kwargs) -> Path:
    """The chest-CT demo cohort (:func:`scripts.synthetic.lung.generate_cohort` arguments in
    ``synth_kwargs``) in ``demo_dir`` if ``dataset_dir`` is that folder and it is absent."""
    return _ensure(dataset_dir, demo_dir, "lung", "lung demo", synth_kwargs)
