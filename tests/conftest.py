import os
import sys
from pathlib import Path

# Tests run from the bundle root, as the bundle itself does (`scripts` is not installed).
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory) -> Path:
    """A 6-subject synthetic cohort at 32^3 (4 normal, 2 abnormal), generated once per session."""
    from scripts.synthetic.brain import generate_cohort

    return generate_cohort(tmp_path_factory.mktemp("cohort") / "tiny", n_normal=4, n_abnormal=2, shape=32, seed=1)
