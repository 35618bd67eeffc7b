"""Nyúl histogram standardisation (Nyúl, Udupa & Zhang, IEEE TMI 2000; paper Sec. 4.1): each volume's
foreground landmarks mapped piecewise linearly onto a fixed standard scale (:data:`MNI152_T1_STANDARD`) or
one :meth:`NyulStandardize.fit` learns from given volumes (the cohort being scored: an explicit option)."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends, convert_to_dst_type, convert_to_tensor

__all__ = ["MNI152_T1_STANDARD", "STANDARD_SCALES", "NyulStandardize", "NyulStandardized", "nyul_landmarks"]

DECILES = tuple(range(10, 100, 10))
#: The standard scale (percentiles 1, 10, ..., 90, 99 on [0, 1]) learned once by :meth:`NyulStandardize.fit`
#: from nilearn's MNI152 T1 template (1 mm) inside its brain mask: a T1 reference for brain MRI.
MNI152_T1_STANDARD = (0.0, 0.3376, 0.4904, 0.5605, 0.6115, 0.6561, 0.7197, 0.7962, 0.8726, 0.9299, 1.0)
#: standard scales by the name a config gives them
STANDARD_SCALES = {"mni152_t1": MNI152_T1_STANDARD}


def _foreground(image: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    values = image.reshape(-1)
    if mask is not None:
        return values[mask.reshape(-1) > 0]
    return values[values > values.min()] if values.size and values.max() > values.min() else values


def nyul_landmarks(
    image: np.ndarray | torch.Tensor,
    mask: np.ndarray | torch.Tensor | None = None,
    pc_low: float = 1.0,
    pc_high: float = 99.0,
    deciles: Sequence[float] = DECILES,
) -> np.ndarray:
    """Intensity landmarks of a volume's foreground: percentiles ``[pc_low, *deciles, pc_high]``."""
    image = np.asarray(convert_to_tensor(image, track_meta=False), dtype=np.float64)
    mask = None if mask is None else np.asarray(convert_to_tensor(mask, track_meta=False))
    values = _foreground(image, mask)
    if values.size == 0:
        raise ValueError("Nyúl standardisation needs foreground voxels; the mask is empty")
    return np.percentile(values, [pc_low, *deciles, pc_high])


class NyulStandardize(Transform):
    """Piecewise-linear mapping of a volume's landmarks onto a standard scale.

    Args:
        standard: the standard landmarks (``[pc_low, *deciles, pc_high]``), a name of :data:`STANDARD_SCALES`,
            or ``None`` until :meth:`fit` learns them.
        pc_low, pc_high: the outer percentiles (Nyúl: 1 and 99).
        s_min, s_max: the standard scale's range that ``[pc_low, pc_high]`` maps to.

    Call: ``image [C, H, W, D]`` (and optionally its ``mask``) -> float32 standardised image.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self,
        standard: Sequence[float] | str | None = None,
        pc_low: float = 1.0,
        pc_high: float = 99.0,
        s_min: float = 0.0,
        s_max: float = 1.0,
    ) -> None:
        if not 0.0 <= pc_low < 10.0 or not 90.0 < pc_high <= 100.0 or not s_min < s_max:
            raise ValueError(
                f"need 0 <= pc_low < 10, 90 < pc_high <= 100 and s_min < s_max, got {pc_low}, {pc_high}, "
                f"{s_min}, {s_max}"
            )
        self.pc_low, self.pc_high, self.s_min, self.s_max = (float(pc_low), float(pc_high), float(s_min), float(s_max))
        if isinstance(standard, str):
            if standard not in STANDARD_SCALES:
                raise ValueError(f"standard must be landmarks or one of {sorted(STANDARD_SCALES)}, got {standard!r}")
            standard = STANDARD_SCALES[standard]
        self.standard = None if standard is None else np.asarray(standard, dtype=np.float64)

    def landmarks(self, image: np.ndarray | torch.Tensor, mask: np.ndarray | torch.Tensor | None = None) -> np.ndarray:
        return nyul_landmarks(image, mask, self.pc_low, self.pc_high)

    def fit(self, volumes: Iterable[tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor | None]]) -> np.ndarray:
        """Learn the standard scale from ``(image, mask or None)`` pairs; returns it (and keeps it)."""
        mapped = []
        for image, mask in volumes:
            marks = self.landmarks(image, mask)
            low, high = marks[0], marks[-1]
            if high <= low:
                continue  # a flat foreground says nothing about the scale
            mapped.append(self.s_min + (marks - low) / (high - low) * (self.s_max - self.s_min))
        if not mapped:
            raise ValueError("Nyúl standardisation: no volume with a non-constant foreground to learn from")
        self.standard = np.mean(mapped, axis=0)
        return self.standard

    def __call__(
        self, image: np.ndarray | torch.Tensor, mask: np.ndarray | torch.Tensor | None = None
    ) -> torch.Tensor | np.ndarray:
        if self.standard is None:
            raise RuntimeError("NyulStandardize has no standard scale: call fit() or pass standard=")
        marks = self.landmarks(image, mask)
        # np.interp needs increasing landmarks; ties (e.g. a binary foreground) are split by a hair.
        marks = marks + np.arange(marks.size) * 1e-9 * max(1.0, float(np.abs(marks).max()))
        image_t = convert_to_tensor(image, track_meta=False)
        values = np.asarray(image_t, dtype=np.float64)
        out = np.interp(values, marks, self.standard)
        # np.interp clamps outside the landmarks: extend the first and last segments linearly instead.
        m, t = marks, self.standard
        for outside, x, y, slope in (
            (values < m[0], m[0], t[0], (t[1] - t[0]) / (m[1] - m[0])),
            (values > m[-1], m[-1], t[-1], (t[-1] - t[-2]) / (m[-1] - m[-2])),
        ):
            out[outside] = y + (values[outside] - x) * slope
        return convert_to_dst_type(out, image, dtype=torch.float32)[0]


class NyulStandardized(MapTransform):
    """Dictionary form of :class:`NyulStandardize`; ``mask_key`` (optional) selects the foreground."""

    backend = NyulStandardize.backend

    def __init__(
        self,
        keys: KeysCollection,
        mask_key: str | None = "mask",
        standard: Sequence[float] | str | None = None,
        pc_low: float = 1.0,
        pc_high: float = 99.0,
        s_min: float = 0.0,
        s_max: float = 1.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mask_key = mask_key
        self.standardize = NyulStandardize(standard, pc_low, pc_high, s_min, s_max)

    def fit(
        self, data: Iterable[Mapping[Hashable, object]], transform: Callable | None = None, num_workers: int = 0
    ) -> np.ndarray:
        """Learn the standard scale from ``data``: dicts of arrays, or of file paths that ``transform`` (default:
        MONAI's ``LoadImage``) loads, in ``num_workers`` processes (the scale does not depend on them)."""
        from monai.transforms import LoadImage

        load = LoadImage(image_only=True)

        def loaded(row: Mapping[Hashable, object]) -> dict:
            return transform(dict(row)) if transform is not None else dict(row)

        def arrays(d: Mapping[Hashable, object]) -> tuple[object, object]:
            image = load(d[self.keys[0]]) if isinstance(d[self.keys[0]], str) else d[self.keys[0]]
            mask = d.get(self.mask_key) if self.mask_key else None
            return image, load(mask) if isinstance(mask, str) else mask

        if num_workers and int(num_workers) > 0:
            from monai.data import Dataset
            from torch.utils.data import DataLoader

            rows = [dict(row) for row in data]
            loader = DataLoader(Dataset(rows, transform=loaded), batch_size=None, num_workers=int(num_workers))
            return self.standardize.fit(arrays(d) for d in loader)
        return self.standardize.fit(arrays(loaded(row)) for row in data)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        mask = d.get(self.mask_key) if self.mask_key else None
        for key in self.key_iterator(d):
            d[key] = self.standardize(d[key], mask)
        return d
