"""The fixed cohorts of the quality study (arguments of ``scripts.synthetic.brain.generate_cohort``) and the
metrics it reports: T1 and T2, two seeds each, B = 32 and 64, and one cohort of smaller, fainter lesions."""

from __future__ import annotations

_B32, _B64 = {"n_normal": 20, "n_abnormal": 12}, {"n_normal": 40, "n_abnormal": 24}
_SMALL_FAINT = {"lesion_volume": (20.0, 2000.0), "lesion_contrast": (0.05, 0.3)}
COHORTS: dict[str, dict] = {
    "t1-seed0-b32": {"contrast": "t1", "seed": 0, **_B32},
    "t1-seed1-b64": {"contrast": "t1", "seed": 1, **_B64},
    "t2-seed0-b32": {"contrast": "t2", "seed": 0, **_B32},
    "t2-seed1-b64": {"contrast": "t2", "seed": 1, **_B64},
    "t1-seed2-small-faint": {"contrast": "t1", "seed": 2, **_B32, **_SMALL_FAINT},
}
#: the same five with new seeds: a finding chosen after seeing COHORTS is judged on these (not run by default)
CONFIRMATION_COHORTS: dict[str, dict] = {
    "t1-seed10-b32": {**COHORTS["t1-seed0-b32"], "seed": 10},
    "t2-seed11-b32": {**COHORTS["t2-seed0-b32"], "seed": 11},
    "t1-seed12-small-faint": {**COHORTS["t1-seed2-small-faint"], "seed": 12},
    "t1-seed13-b64": {**COHORTS["t1-seed1-b64"], "seed": 13},
    "t2-seed14-b64": {**COHORTS["t2-seed1-b64"], "seed": 14},
}
#: tiny cohorts for a smoke run (tests, CI)
QUICK_COHORTS: dict[str, dict] = {
    "t1-tiny": {"contrast": "t1", "seed": 0, "n_normal": 3, "n_abnormal": 2, "shape": 32},
    "t2-tiny": {"contrast": "t2", "seed": 1, "n_normal": 3, "n_abnormal": 2, "shape": 32},
}
METRICS = ("patient_auroc", "patient_ap", "voxel_ap", "dice_max", "ltpr99_small", "ltpr99_medium", "ltpr99_large")
METRICS += ("fp_per_volume",)
