"""The bundle's demo cohorts, generated on first use when the configured dataset is the demo folder.

The configs call these in their ``datalist`` expression; the generators are imported only when a demo
cohort has to be made.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["ensure_demo", "ensure_lung_demo"]


def _is_missing_demo(dataset_dir: Path, demo_dir: Path) -> bool:
    # A user-given dataset_dir that does not exist is never replaced by demo data: that is an error
    # raised later by make_datalist.
    return dataset_dir.resolve() == demo_dir.resolve() and not (demo_dir / "cohort.csv").is_file()


def ensure_demo(dataset_dir: str | Path, demo_dir: str | Path, **synth_kwargs) -> Path:
    """Generate the brain demo cohort into ``demo_dir`` when ``dataset_dir`` is the demo folder and it
    is absent; returns ``dataset_dir``.

    Args:
        dataset_dir: the configured dataset folder.
        demo_dir: the demo folder (``demo#dir`` of the config).
        synth_kwargs: arguments of :func:`scripts.synthetic.brain.generate_cohort`.
    """
    dataset_dir, demo_dir = Path(dataset_dir), Path(demo_dir)
    if _is_missing_demo(dataset_dir, demo_dir):
        from scripts.synthetic.brain import ensure_cohort  # lazily: only a missing demo needs it

        print(f"cs3f: demo cohort not found, generating it in {demo_dir} ...", flush=True)
        ensure_cohort(demo_dir, **synth_kwargs)
    return dataset_dir


def ensure_lung_demo(dataset_dir: str | Path, demo_dir: str | Path, **synth_kwargs) -> Path:
    """Generate the chest-CT demo cohort into ``demo_dir`` when ``dataset_dir`` is the demo folder and
    it is absent; returns ``dataset_dir``.

    Args:
        dataset_dir: the configured dataset folder.
        demo_dir: the demo folder (``demo#dir`` of the config).
        synth_kwargs: arguments of :func:`scripts.synthetic.lung.generate_cohort`.
    """
    dataset_dir, demo_dir = Path(dataset_dir), Path(demo_dir)
    if _is_missing_demo(dataset_dir, demo_dir):
        from scripts.synthetic.lung import ensure_cohort  # lazily: only a missing demo needs it

        print(f"cs3f: lung demo cohort not found, generating it in {demo_dir} ...", flush=True)
        ensure_cohort(demo_dir, **synth_kwargs)
    return dataset_dir
