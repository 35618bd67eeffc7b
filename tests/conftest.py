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


#: Slow tests (more than ~20 s, see the `slow` marker in pyproject.toml) in files that cannot import pytest:
#: tests/zoo/ holds the Model Zoo's unittest files, copied as they are into a Zoo checkout.
SLOW_WITHOUT_PYTEST = {
    "tests/zoo/test_brain_mri_cs3f_anomaly_detection_dist.py::TestCS3FAnomalyDetectionMGPU::test_mgpu_infer_eval_config"
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.nodeid in SLOW_WITHOUT_PYTEST:
            item.add_marker(pytest.mark.slow)
