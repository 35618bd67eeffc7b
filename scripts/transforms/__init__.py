"""CS3F's steps as MONAI transforms (array + dictionary forms): tokenization and checked loading.

The lung CT transforms live in :mod:`scripts.transforms.lung_crops`.
"""

from scripts.transforms.inputs import CheckedLoadImaged, CheckVolumed
from scripts.transforms.tokenization import (
    AXES,
    DepthPool,
    DepthPoold,
    MultiAxisSlice,
    MultiAxisSliced,
    RandomProjection,
    RandomProjectiond,
    TokenValidity,
    TokenValidityd,
    axis_index,
    check_divisible,
    projection_matrix,
    restore_axis,
    slices_first,
)

__all__ = [
    "AXES",
    "axis_index",
    "check_divisible",
    "CheckedLoadImaged",
    "CheckVolumed",
    "DepthPool",
    "DepthPoold",
    "MultiAxisSlice",
    "MultiAxisSliced",
    "projection_matrix",
    "RandomProjection",
    "RandomProjectiond",
    "restore_axis",
    "slices_first",
    "TokenValidity",
    "TokenValidityd",
]
