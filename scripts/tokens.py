"""Volumetric tokens (paper Sec. 3.3): :class:`Tokenizer` streams a volume into a :class:`VolumeTokens`,
:class:`BatchBuffer` holds a batch as rows of one tensor per key, which :func:`batch_of` views as ``[B, N, d]``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from monai.utils import convert_to_tensor
from scripts.encoders.base import IMAGENET_MEAN, IMAGENET_STD
from scripts.transforms.tokenization import (
    AXES,
    DepthPool,
    MultiAxisSlice,
    RandomProjection,
    TokenValidity,
    axis_index,
    check_divisible,
)

__all__ = [
    "FINE_SUFFIX",
    "BatchBuffer",
    "ShiftedPool",
    "TokenGrid",
    "Tokenizer",
    "VolumeTokens",
    "as_volume",
    "batch_of",
    "check_same_grids",
    "canonical_axes",
    "check_depth_phases",
    "children_last",
    "per_axis",
    "phase_shifts",
]

FINE_SUFFIX = "/fine"


@dataclass
class TokenGrid:
    """Tokens ``[M, P, P, d]`` (the tokenizer's storage dtype) and their validity ``[M, P, P]`` (Remark 1) of
    one volume for one (axis, layer)."""

    tokens: torch.Tensor
    valid: torch.Tensor

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.valid.shape)  # type: ignore[return-value]


@dataclass
class VolumeTokens:
    """All token grids of one volume, keyed ``"{axis}/{layer}"`` (e.g. ``"axial/1"``), plus
    ``"{axis}/{layer}/fine"`` grids ``[M * h, P, P, d]`` for the F/MS variants."""

    spatial_shape: tuple[int, int, int]
    grids: dict[str, TokenGrid] = field(default_factory=dict)

    def num_tokens(self) -> int:
        return sum(g.valid.numel() for g in self.grids.values())

    def nbytes(self) -> int:
        return sum(g.tokens.numel() * g.tokens.element_size() for g in self.grids.values())

    def validity(self) -> dict[str, torch.Tensor]:
        """``{key: [M, P, P]}`` token validity of every grid."""
        return {k: g.valid for k, g in self.grids.items()}


def per_axis(value: int | Sequence[int], name: str) -> list[int]:
    """One positive int per axis (sagittal, coronal, axial) from one int or three."""
    values = [int(value)] * 3 if isinstance(value, int) else [int(v) for v in value]
    if len(values) != 3 or min(values) < 1:
        raise ValueError(f"{name} must be one positive int or one per axis (sagittal, coronal, axial), got {value}")
    return values


def as_volume(volume: torch.Tensor) -> torch.Tensor:
    """A plain ``[1, H, W, D]`` tensor from ``[1, H, W, D]`` or ``[H, W, D]`` (metadata dropped)."""
    volume = convert_to_tensor(volume, track_meta=False)
    if volume.ndim == 3:
        volume = volume.unsqueeze(0)
    if volume.ndim != 4 or volume.shape[0] != 1:
        raise ValueError(f"expected a single-channel volume [1, H, W, D], got shape {tuple(volume.shape)}")
    return volume


def children_last(grid: torch.Tensor, h: int) -> torch.Tensor:
    """Fine grid ``[M * h, P, P, ...]`` -> ``[M * P * P, h, ...]``: the ``h`` depth children of each coarse token."""
    m = grid.shape[0] // h
    rest = grid.shape[3:]
    grid = grid.reshape(m, h, *grid.shape[1:3], *rest).movedim(1, 3)  # [M, P, P, h, ...]
    return grid.reshape(-1, h, *rest)


def check_same_grids(bank: Sequence[VolumeTokens], what: str = "volume 0") -> list[str]:
    """The grid keys of ``bank``; ``ValueError`` unless every volume has the same keys and shapes."""
    keys = list(bank[0].grids)
    for i, vt in enumerate(bank):
        if list(vt.grids) != keys:
            raise ValueError(f"volume {i} has token grids {list(vt.grids)}, {what} has {keys}")
        for key in keys:
            if vt.grids[key].shape != bank[0].grids[key].shape:
                raise ValueError(
                    f"token grids do not agree for {key}: volume {i} has {vt.grids[key].shape}, "
                    f"{what} has {bank[0].grids[key].shape}; volumes must share the grid along each "
                    f"slicing axis (resample or pad them to one shape, e.g. MONAI ResizeWithPadOrCropd)"
                )
    return keys


def _rows_of(tensors: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The first ``B`` rows of the tensor that the ``B`` tensors are rows ``0..B-1`` of, or ``None``."""
    base = tensors[0]._base
    if base is None or base.shape[0] < len(tensors) or not base.is_contiguous():
        return None
    step = base[0].numel() * base.element_size()
    for i, t in enumerate(tensors):
        if t._base is not base or not t.is_contiguous() or t.data_ptr() != base.data_ptr() + i * step:
            return None
    return base[: len(tensors)]


def batch_of(bank: Sequence[VolumeTokens], key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens [B, N, d], valid [B, N])`` of one (axis, layer) of the batch: a view when the grids are rows of
    one tensor (a :class:`BatchBuffer`), else a stacked copy."""
    grids = [vt.grids[key] for vt in bank]
    out = []
    for attr in ("tokens", "valid"):
        parts = [getattr(g, attr) for g in grids]
        base = _rows_of(parts)
        out.append(torch.stack(parts) if base is None else base)
    tokens, valid = out
    return tokens.reshape(len(bank), -1, tokens.shape[-1]), valid.reshape(len(bank), -1)


class BatchBuffer:
    """Token grids of a batch held as rows of one ``[capacity, ...]`` tensor per key, the layout the scorer
    reads in place; a volume that does not match the first one's grids, or beyond ``capacity``, stays as is."""

    def __init__(self, capacity: int) -> None:
        self.capacity = int(capacity)
        self.count = 0
        self._rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _fits(self, volume: VolumeTokens) -> bool:
        if list(volume.grids) != list(self._rows):
            return False
        return all(
            g.tokens.shape == t.shape[1:] and g.tokens.dtype == t.dtype and g.valid.shape == v.shape[1:]
            for g, (t, v) in zip(volume.grids.values(), self._rows.values(), strict=True)
        )

    def add(self, volume: VolumeTokens) -> VolumeTokens:
        """Copy ``volume``'s grids into the next row and point them there; returns ``volume``."""
        if self.count >= self.capacity or not volume.grids:
            return volume
        if not self._rows:
            self._rows = {
                key: tuple(
                    torch.empty((self.capacity, *t.shape), dtype=t.dtype, device=t.device) for t in (g.tokens, g.valid)
                )
                for key, g in volume.grids.items()
            }
        elif not self._fits(volume):
            return volume
        row = self.count
        for key, grid in volume.grids.items():
            tokens, valid = self._rows[key]
            tokens[row].copy_(grid.tokens)
            valid[row].copy_(grid.valid)
            grid.tokens, grid.valid = tokens[row], valid[row]
        self.count += 1
        return volume


class Tokenizer:
    """One volume -> :class:`VolumeTokens`, streamed slab by slab (Sec. 3.3.1-3.3.3, Remark 1); arguments as
    :class:`scripts.inferer.CS3FInferer`'s, ``q`` and ``q_fine`` (F/MS, else ``None``) per axis name.

    ``depth_phases = n``: phase ``j`` pools from slice ``floor(j q / n)`` on, as the ``j``-th block of ``M`` rows
    of each coarse grid; its last token is invalid (it wraps round the volume's end).
    """

    def __init__(
        self,
        axes: Sequence[str],
        q: dict[str, int],
        q_fine: dict[str, int] | None,
        d: int,
        delta: float,
        seed: int,
        slab_size: int,
        token_dtype: torch.dtype,
        depth_phases: int = 1,
    ) -> None:
        self.axes, self.q, self.q_fine = list(axes), q, q_fine
        self.d, self.delta, self.seed = d, delta, seed
        self.slab_size, self.token_dtype = slab_size, token_dtype
        self.depth_phases = check_depth_phases(depth_phases, q, q_fine, axes)
        self._projections: dict[tuple[str, int, int], RandomProjection] = {}

    def projection(self, axis: str, layer: int, channels: int) -> RandomProjection:
        key = (axis, layer, channels)
        if key not in self._projections:
            self._projections[key] = RandomProjection(channels, self.d, self.seed, f"{axis}/{layer}")
        return self._projections[key]

    @torch.inference_mode()
    def __call__(self, volume: torch.Tensor, encoder: Callable, mask: torch.Tensor | None = None) -> VolumeTokens:
        """Tokens of ``volume [1, H, W, D]`` in ``[0, 1]``; tokens of foreground fraction ``<= delta`` in ``mask``
        (optional, same shape) are invalid."""
        volume = as_volume(volume)
        params = list(encoder.parameters()) if isinstance(encoder, torch.nn.Module) else []
        device = params[0].device if params else volume.device
        slicer = MultiAxisSlice(
            self.axes,
            size=encoder.input_size,
            mean=getattr(encoder, "mean", IMAGENET_MEAN),
            std=getattr(encoder, "std", IMAGENET_STD),
        )
        volume_dev = volume.to(device, non_blocking=True)  # from pinned memory: no wait on the host
        out = VolumeTokens(spatial_shape=tuple(volume.shape[1:]))
        for axis in self.axes:
            grids = self._axis_grids(volume_dev, encoder, slicer, axis, device)
            for suffix, qs in self._scales(axis):
                for layer, by_scale in enumerate(grids):
                    grid = by_scale[suffix]
                    valid = self._validity(axis, qs, grid.shape, mask, phased=not suffix)
                    out.grids[f"{axis}/{layer}{suffix}"] = TokenGrid(grid, valid.to(device))
        return out

    def _validity(self, axis: str, q: int, shape: torch.Size, mask: torch.Tensor | None, phased: bool) -> torch.Tensor:
        """``[rows, P, P]`` validity of a grid of ``shape`` (all phases of a coarse one, ``phased``)."""
        shifts = phase_shifts(q, self.depth_phases) if phased else [0]
        rows = shape[0] // len(shifts)
        blocks = []
        for shift in shifts:
            if mask is None:
                valid = torch.ones((rows, *shape[1:3]), dtype=torch.bool)
            else:
                rolled = torch.roll(as_volume(mask), -shift, dims=1 + axis_index(axis)) if shift else as_volume(mask)
                valid = TokenValidity(axis, q, tuple(shape[1:3]), self.delta)(rolled)
            if shift:
                valid[-1] = False  # it wraps round the volume's end
            blocks.append(valid)
        return torch.cat(blocks)

    def _scales(self, axis: str) -> list[tuple[str, int]]:
        """``(key suffix, pooling)`` of each scale: the coarse ``q``, then (F/MS) the fine ``q_fine``."""
        fine = [(FINE_SUFFIX, self.q_fine[axis])] if self.q_fine is not None else []
        return [("", self.q[axis]), *fine]

    def _axis_grids(
        self, volume: torch.Tensor, encoder: Callable, slicer: MultiAxisSlice, axis: str, device: torch.device
    ) -> list[dict[str, torch.Tensor]]:
        """Per encoder layer, ``{suffix: [count // q_s, P, P, d]}`` token grids of one axis."""
        q = self.q[axis]
        count = volume.shape[1 + axis_index(axis)]
        check_divisible(count, q, axis)
        # q = h * q_fine, so a slab of whole coarse tokens also pools into whole fine tokens.
        scales = self._scales(axis)
        pools = [DepthPool(qs, axis=axis) for _, qs in scales]
        step = q * max(1, self.slab_size // q)
        grids: list[dict[str, torch.Tensor]] = []
        shifted: list[list[ShiftedPool]] = []  # per layer, the coarse tokens' other phases
        for start in range(0, count, step):
            features = encoder(slicer.slab(volume, axis, start, min(start + step, count)))
            for layer, feat in enumerate(features):
                projection = self.projection(axis, layer, feat.shape[1])
                if start == 0:
                    grids.append({})
                    shifted.append([ShiftedPool(pools[0], s) for s in phase_shifts(q, self.depth_phases)[1:]])
                for phase in shifted[layer]:
                    phase.feed(feat)
                for (suffix, qs), pool in zip(scales, pools, strict=True):
                    tokens = projection(pool(feat)).permute(0, 2, 3, 1).to(self.token_dtype)  # [m, P, P, d]
                    if start == 0:
                        grids[layer][suffix] = torch.empty(
                            (count // qs, *tokens.shape[1:]), dtype=self.token_dtype, device=device
                        )
                    grids[layer][suffix][start // qs : start // qs + tokens.shape[0]] = tokens
            del features  # the raw features of this slab are gone before the next forward
        for layer, phases in enumerate(shifted):
            if phases:
                projection = self.projection(axis, layer, phases[0].channels)
                others = [projection(p.finish()).permute(0, 2, 3, 1).to(self.token_dtype) for p in phases]
                grids[layer][""] = torch.cat([grids[layer][""], *(t.to(device) for t in others)])
        return grids


def check_depth_phases(depth_phases: int, q: dict[str, int], q_fine: dict[str, int] | None, axes: Sequence[str]) -> int:
    """``depth_phases`` as an int: >= 1, at most the smallest used ``q``, and 1 with fine tokens (``ValueError``)."""
    if isinstance(depth_phases, bool) or int(depth_phases) != depth_phases or depth_phases < 1:
        raise ValueError(f"depth_phases must be an int >= 1, got {depth_phases!r}")
    depth_phases = int(depth_phases)
    smallest = min(q[a] for a in axes)
    if depth_phases > smallest:
        raise ValueError(f"depth_phases={depth_phases} exceeds the depth pooling q={smallest}: one phase per slice")
    if depth_phases > 1 and q_fine is not None:
        raise ValueError(
            f"depth_phases={depth_phases} is implemented for variant C only (F and MS need the paper's coarse "
            "grid): add --depth_phases 1, or use the configs/multiscale.json overlay"
        )
    return depth_phases


def phase_shifts(q: int, depth_phases: int) -> list[int]:
    """Slice offsets of the pooling phases of ``q``-slice tokens: ``floor(j q / n)`` for ``j < n``."""
    return [j * q // depth_phases for j in range(depth_phases)]


class ShiftedPool:
    """Depth pooling of a slice stack rolled by ``-shift``, fed slab by slab (of at least ``shift`` slices); the
    last token wraps round to slices ``0 .. shift - 1``."""

    def __init__(self, pool: DepthPool, shift: int) -> None:
        self.pool, self.shift = pool, int(shift)
        self.head: torch.Tensor | None = None
        self.pending: torch.Tensor | None = None
        self.pooled: list[torch.Tensor] = []

    @property
    def channels(self) -> int:
        return int(self.pending.shape[1])  # type: ignore[union-attr]

    def feed(self, features: torch.Tensor) -> None:
        """Raw features ``[n, C, P, P]`` of the next slab."""
        if self.head is None:
            self.head, features = features[: self.shift], features[self.shift :]
        pending = features if self.pending is None else torch.cat([self.pending, features])
        whole = pending.shape[0] // self.pool.q * self.pool.q
        if whole:
            self.pooled.append(self.pool(pending[:whole]))
        self.pending = pending[whole:]

    def finish(self) -> torch.Tensor:
        """All pooled tokens ``[M, C, P, P]``, the wrapping one last."""
        self.pooled.append(self.pool(torch.cat([self.pending, self.head])))  # type: ignore[list-item]
        return torch.cat(self.pooled)


def canonical_axes(axes: Sequence[str | int]) -> list[str]:
    """Canonical axis names of ``axes`` (a non-empty subset of :data:`AXES` without repeats)."""
    names = [AXES[axis_index(a)] for a in axes]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"axes must be a non-empty subset of {AXES} without repeats, got {list(axes)}")
    return names
