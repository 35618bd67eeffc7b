"""The bundle's demo cohorts: generated on first use when the configured dataset is the demo folder."""

from __future__ import annotations

from pathlib import Path

__all__ = ["ensure_demo", "ensure_lung_demo"]


def ensure_demo(dataset_dir: str | Path, demo_dir: str | Path, **synth_kwargs) -> Path:
    """Generate the demo cohort into ``demo_dir`` when ``dataset_dir`` is the demo folder and absent.

    A user-given ``dataset_dir`` that does not exist is never replaced by demo data: that is an error
    raised later by :func:`make_datalist`.
    """
    dataset_dir, demo_dir = Path(dataset_dir), Path(demo_dir)
    if dataset_dir.resolve() == demo_dir.resolve() and not (demo_dir / "cohort.csv").is_file():
        from scripts.synthetic.brain import generate_cohort

        print(f"cs3f: demo cohort not found, generating it in {demo_dir} ...", flush=True)
        generate_cohort(demo_dir, **synth_kwargs)
    return dataset_dir



def ensure_lung_demo(dataset_dir: str | Path, demo_dir: str | Path, **synth_kwargs) -> Path:
    """Generate the synthetic lung CT demo cohort into ``demo_dir`` when ``dataset_dir`` is the demo
    folder and absent (a user-given folder that does not exist is left to :func:`make_datalist`'s error)."""
    dataset_dir, demo_dir = Path(dataset_dir), Path(demo_dir)
    if dataset_dir.resolve() == demo_dir.resolve() and not (demo_dir / "cohort.csv").is_file():
        from scripts.synthetic.lung import ensure_cohort

        print(f"cs3f: lung demo cohort not found, generating it in {demo_dir} ...", flush=True)
        ensure_cohort(demo_dir, **synth_kwargs)
    return dataset_dir

