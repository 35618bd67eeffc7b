"""Helper commands of the bundle (the bundle itself runs through ``python -m monai.bundle``).

Usage from the bundle root::

    python -m scripts synth --out demo_data --n_normal 20 --n_abnormal 12
"""

from __future__ import annotations

import fire


def synth(**kwargs):
    """Generate a synthetic registered brain-MRI cohort (see ``scripts.synth.generate_cohort``)."""
    from scripts.synth import cli  # imported lazily: nilearn is needed by the generator only

    return cli(**kwargs)


def main() -> None:
    fire.Fire({"synth": synth})


if __name__ == "__main__":
    main()
