"""CS3F tokenization steps as MONAI transforms (paper Sec. 3.3), array and dictionary forms.

Dims ``(1, 2, 3)`` of a RAS ``[C, H, W, D]`` volume are ``(sagittal, coronal, axial)``; slicing along an axis
moves that dim first, the two others keep their order as the slice plane.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Mapping, Sequence

import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends, convert_to_tensor

__all__ = [
    "AXES",
    "axis_index",
    "slices_first",
    "restore_axis",
    "check_divisible",
    "MultiAxisSlice",
    "MultiAxisSliced",
    "DepthPool",
    "DepthPoold",
    "projection_matrix",
    "RandomProjection",
    "RandomProjectiond",
    "TokenValidity",
    "TokenValidityd",
]

AXES: tuple[str, str, str] = ("sagittal", "coronal", "axial")
_AXIS_ALIASES = {"s": "sagittal", "c": "coronal", "a": "axial", "sag": "sagittal", "cor": "coronal", "ax": "axial"}


def axis_index(axis: str | int) -> int:
    """Spatial index (0, 1, 2) of an axis given by name (``"sagittal"``, ``"S"``, ...) or index."""
    if isinstance(axis, int):
        if axis not in (0, 1, 2):
            raise ValueError(f"axis index must be 0, 1 or 2, got {axis}")
        return axis
    name = _AXIS_ALIASES.get(axis.lower(), axis.lower())
    if name not in AXES:
        raise ValueError(f"unknown axis {axis!r}; use one of {AXES} (or S, C, A)")
    return AXES.index(name)


def slices_first(volume: torch.Tensor, axis: str | int) -> torch.Tensor:
    """``[C, H, W, D]`` (or ``[H, W, D]``) to ``[T, C, h, w]`` slices along ``axis`` (a view)."""
    if volume.ndim == 3:
        volume = volume.unsqueeze(0)
    if volume.ndim != 4:
        raise ValueError(f"expected a channel-first volume [C, H, W, D], got shape {tuple(volume.shape)}")
    dim = axis_index(axis) + 1
    order = [dim, 0] + [k for k in (1, 2, 3) if k != dim]
    return volume.permute(order)


def restore_axis(grid: torch.Tensor, axis: str | int) -> torch.Tensor:
    """Inverse of :func:`slices_first` for a ``[T, h, w]`` grid: back to ``[H, W, D]`` order."""
    dim = axis_index(axis)
    order = [dim, *[d for d in (0, 1, 2) if d != dim]]
    return grid.permute([order.index(k) for k in range(3)])


def check_divisible(count: int, q: int, axis: str | int) -> int:
    """Number of depth blocks ``count / q``; ``ValueError`` if ``q`` does not divide ``count``."""
    if q < 1:
        raise ValueError(f"pooling size q must be >= 1, got {q}")
    if count % q:
        try:
            name = AXES[axis_index(axis)]
        except ValueError:
            name = str(axis) or "slicing"
        raise ValueError(
            f"depth pooling q={q} does not divide the {count} slices along the {name} axis; pad the volume "
            f"with MONAI's DivisiblePadd(k={q}) (or choose q dividing {count})"
        )
    return count // q


class MultiAxisSlice(Transform):
    """Slice a volume in ``[0, 1]`` along ``axes`` into encoder-ready stacks: each slice resized to ``size``
    (bilinear, anti-aliased when shrinking), replicated to 3 channels and normalised with ``mean``/``std``.

    Call: ``volume [1, H, W, D]`` -> ``{axis: [T, 3, R, R]}``; :meth:`slab` for a range of slices.
    """

    backend = [TransformBackends.TORCH]

    def __init__(
        self, axes: Sequence[str | int] = AXES, size: int = 224, *, mean: Sequence[float], std: Sequence[float]
    ) -> None:
        self.axes = [AXES[axis_index(a)] for a in axes]
        self.size = int(size)
        self.mean = torch.as_tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def slab(self, volume: torch.Tensor, axis: str | int, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Slices ``start:stop`` along ``axis`` of a ``[1, H, W, D]`` volume -> ``[n, 3, R, R]``."""
        slices = slices_first(convert_to_tensor(volume, track_meta=False), axis)[start:stop]
        if slices.shape[1] != 1:
            raise ValueError(f"expected a single-channel volume, got {slices.shape[1]} channels")
        slices = slices.float()
        if tuple(slices.shape[-2:]) != (self.size, self.size):
            shrink = min(slices.shape[-2:]) > self.size
            slices = F.interpolate(
                slices, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=shrink
            )
        mean, std = self.mean.to(slices.device), self.std.to(slices.device)
        return (slices.expand(-1, 3, -1, -1) - mean) / std

    def __call__(self, volume: torch.Tensor) -> dict[str, torch.Tensor]:
        return {axis: self.slab(volume, axis) for axis in self.axes}


class MultiAxisSliced(MapTransform):
    """Dictionary wrapper of :class:`MultiAxisSlice`: writes ``{key}_{axis}`` entries ``[T, 3, R, R]``."""

    backend = MultiAxisSlice.backend

    def __init__(
        self,
        keys: KeysCollection,
        axes: Sequence[str | int] = AXES,
        size: int = 224,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.slicer = MultiAxisSlice(axes, size, mean=mean, std=std)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            for axis, stack in self.slicer(d[key]).items():
                d[f"{key}_{axis}"] = stack
        return d


class DepthPool(Transform):
    """Mean of ``q`` consecutive slice features, then L2 normalisation over channels (Eq. 4; ``normalize``);
    ``axis`` names the axis in the divisibility error.

    Call: ``features [T, C, P, P]`` -> ``tokens [T/q, C, P, P]`` (fp32).
    """

    backend = [TransformBackends.TORCH]

    def __init__(self, q: int, normalize: bool = True, axis: str | int = "") -> None:
        self.q = int(q)
        self.normalize = normalize
        self.axis = axis

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        features = convert_to_tensor(features, track_meta=False)
        if features.ndim != 4:
            raise ValueError(f"expected slice features [T, C, P, P], got shape {tuple(features.shape)}")
        t, c, p1, p2 = features.shape
        m = check_divisible(t, self.q, self.axis)
        pooled = features.float().reshape(m, self.q, c, p1, p2).mean(dim=1)
        return F.normalize(pooled, dim=1) if self.normalize else pooled


class DepthPoold(MapTransform):
    """Dictionary wrapper of :class:`DepthPool`."""

    backend = DepthPool.backend

    def __init__(self, keys: KeysCollection, q: int, normalize: bool = True, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.pool = DepthPool(q, normalize)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            self.pool.axis = str(key)
            d[key] = self.pool(d[key])
        return d


def projection_matrix(in_channels: int, d: int = 128, seed: int = 0, name: str = "") -> torch.Tensor:
    """The ``[in_channels, d]`` projection with entries ``N(0, 1/d)``, drawn on the CPU from ``seed`` and a
    stable hash of ``name`` (e.g. ``"axial/1"``): the same on every process and machine."""
    salt = int.from_bytes(hashlib.sha256(f"{name}|{in_channels}|{d}".encode()).digest()[:6], "little")
    generator = torch.Generator(device="cpu").manual_seed((int(seed) * 1_000_003 + salt) % (2**63 - 1))
    return torch.randn(in_channels, d, generator=generator, dtype=torch.float32) / d**0.5


class RandomProjection(Transform):
    """Project ``in_channels`` token channels to ``d`` dims with :func:`projection_matrix` (Sec. 3.3.3).

    Call: ``tokens [M, C, P, P]`` -> ``[M, d, P, P]`` (fp32).
    """

    backend = [TransformBackends.TORCH]

    def __init__(self, in_channels: int, d: int = 128, seed: int = 0, name: str = "") -> None:
        self.matrix = projection_matrix(in_channels, d, seed, name)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = convert_to_tensor(tokens, track_meta=False)
        if tokens.ndim < 2 or tokens.shape[1] != self.matrix.shape[0]:
            raise ValueError(f"expected tokens [M, {self.matrix.shape[0]}, ...], got shape {tuple(tokens.shape)}")
        matrix = self.matrix.to(tokens.device)
        return torch.einsum("mc...,cd->md...", tokens.float(), matrix)


class RandomProjectiond(MapTransform):
    """Dictionary wrapper of :class:`RandomProjection` (one matrix per key, named by the key)."""

    backend = RandomProjection.backend

    def __init__(
        self, keys: KeysCollection, in_channels: int, d: int = 128, seed: int = 0, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.projections = {key: RandomProjection(in_channels, d, seed, str(key)) for key in self.keys}

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.projections[key](d[key])
        return d


class TokenValidity(Transform):
    """Tokens whose foreground fraction (the mask's mean over their ``q`` slices and patch of the ``grid``)
    is ``> delta`` (Remark 1).

    Call: ``mask [1, H, W, D]`` -> ``[T/q, P, P]`` bool.
    """

    backend = [TransformBackends.TORCH]

    def __init__(self, axis: str | int, q: int, grid: int | Sequence[int], delta: float = 0.0) -> None:
        self.axis = axis
        self.q = int(q)
        self.grid = (grid, grid) if isinstance(grid, int) else tuple(grid)
        self.delta = float(delta)

    def fraction(self, mask: torch.Tensor) -> torch.Tensor:
        """Foreground fraction ``[T/q, P, P]`` of every token (foreground: ``mask > 0``)."""
        stack = slices_first(convert_to_tensor(mask, track_meta=False), self.axis)[:, 0] > 0  # [T, h, w]
        stack = stack.float()
        m = check_divisible(stack.shape[0], self.q, self.axis)
        return F.adaptive_avg_pool3d(stack[None, None], (m, *self.grid))[0, 0]

    def __call__(self, mask: torch.Tensor) -> torch.Tensor:
        return self.fraction(mask) > self.delta


class TokenValidityd(MapTransform):
    """Dictionary wrapper of :class:`TokenValidity`: writes ``{key}_valid_{axis}``."""

    backend = TokenValidity.backend

    def __init__(
        self,
        keys: KeysCollection,
        q: Sequence[int],
        grid: int | Sequence[int],
        axes: Sequence[str | int] = AXES,
        delta: float = 0.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(q) != len(axes):
            raise ValueError(f"q needs one value per axis: got q={tuple(q)} for axes {tuple(axes)}")
        self.validity = {AXES[axis_index(a)]: TokenValidity(a, qa, grid, delta) for a, qa in zip(axes, q, strict=True)}

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            for axis, validity in self.validity.items():
                d[f"{key}_valid_{axis}"] = validity(d[key])
        return d
