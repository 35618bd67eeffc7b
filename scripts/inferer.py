"""``CS3FInferer``: volumes -> volumetric tokens -> cross-subject scores -> voxel anomaly maps.

The inferer wires the pieces and owns no maths of its own: slicing, pooling, projection and token
validity are :mod:`scripts.transforms`, the scorer is :mod:`scripts.scoring`, the encoder is any
:class:`scripts.encoders.SliceEncoder`-like module (``[N, 3, R, R]`` in, list of ``[N, C, P, P]``
out, with ``input_size``, ``mean`` and ``std`` attributes).

It is usable in three steps, so that a cohort can be streamed (what the bundle workflow does)::

    bank = [inferer.tokenize(volume, encoder, mask) for volume, mask in loader]   # one at a time
    token_scores = inferer.score(bank)                                           # batch step
    for i in range(len(bank)):
        amap = inferer.voxel_map(token_scores[i], bank[i].spatial_shape, mask_i) # one at a time

or in one call on an in-memory batch: ``maps, scores = inferer(batch, encoder, masks)``.

Variants (paper Sec. 4): ``"C"`` (CS3F-C, coarse tokens of pooling ``q`` only, the default), ``"F"``
(CS3F-F, the fine map of pooling ``q_fine`` scored by coarse-to-fine routing, Sec. 3.5) and ``"MS"``
(CS3F-MS, the mean of the coarse and fine maps, Eq. 7). For F/MS, :meth:`CS3FInferer.tokenize` pools
the same slab of encoder features twice (``q`` and ``q_fine``, with ``q = h * q_fine`` per axis) and
adds ``"{axis}/{layer}/fine"`` grids ``[M * h, P, P, d]``; :meth:`CS3FInferer.score` returns the
matching ``"{axis}/{layer}/fine"`` score grids next to the coarse ones (which come from the same
coarse distance pass), and :meth:`CS3FInferer.voxel_map` fuses them per the variant.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from monai.inferers import Inferer
from monai.utils import convert_to_tensor

from scripts.scoring import (
    DEFAULT_BLOCK_ELEMENTS,
    DEFAULT_QUERY_TILE,
    DEFAULT_ROUTES,
    c2f_scores,
    mutual_similarity_scores,
    reference_scores,
    subset_scores,
)
from scripts.transforms.tokenization import (
    AXES,
    DepthPool,
    MultiAxisSlice,
    RandomProjection,
    TokenValidity,
    axis_index,
    check_divisible,
    restore_axis,
)

__all__ = ["BatchBuffer", "TokenGrid", "VolumeTokens", "CS3FInferer", "VARIANTS", "FINE_SUFFIX"]

VARIANTS = ("C", "F", "MS")
FINE_SUFFIX = "/fine"


@dataclass
class TokenGrid:
    """Tokens of one volume for one (axis, layer).

    Attributes:
        tokens: ``[M, P, P, d]`` projected tokens (storage dtype of the inferer).
        valid: ``[M, P, P]`` bool token validity (Remark 1).
    """

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


def _per_axis(value: int | Sequence[int], name: str) -> list[int]:
    values = [int(value)] * 3 if isinstance(value, int) else [int(v) for v in value]
    if len(values) != 3 or min(values) < 1:
        raise ValueError(
            f"{name} must be one positive int or one per axis (sagittal, coronal, axial), got {value}"
        )
    return values


def _children_last(grid: torch.Tensor, h: int) -> torch.Tensor:
    """Fine grid ``[M * h, P, P, ...]`` -> ``[M * P * P, h, ...]``: the ``h`` depth children of each
    coarse token (row-major over ``(m, u, v)``, the coarse token order), in depth order."""
    m = grid.shape[0] // h
    rest = grid.shape[3:]
    grid = grid.reshape(m, h, *grid.shape[1:3], *rest).movedim(1, 3)  # [M, P, P, h, ...]
    return grid.reshape(-1, h, *rest)


def _as_volume(volume: torch.Tensor) -> torch.Tensor:
    volume = convert_to_tensor(volume, track_meta=False)
    if volume.ndim == 3:
        volume = volume.unsqueeze(0)
    if volume.ndim != 4 or volume.shape[0] != 1:
        raise ValueError(f"expected a single-channel volume [1, H, W, D], got shape {tuple(volume.shape)}")
    return volume


def _batching_options(chunk_size: int | None, n_references: int | None) -> tuple[int | None, int | None]:
    from scripts.errors import CS3FInputError

    for name, value, low in (("chunk_size", chunk_size, 2), ("n_references", n_references, 1)):
        if value is not None and (isinstance(value, bool) or int(value) != value or value < low):
            raise CS3FInputError(f"{name} must be null or an int >= {low}, got {value!r}")
    if chunk_size is not None and n_references is not None:
        raise CS3FInputError(
            "chunk_size and n_references are alternatives (independent chunks vs a random reference "
            "subset per volume): set one of them"
        )
    return (
        None if chunk_size is None else int(chunk_size),
        None if n_references is None else int(n_references),
    )


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


class BatchBuffer:
    """Token grids of a batch of volumes held as rows of one ``[capacity, ...]`` tensor per key.

    :meth:`add` copies a volume's grids into the next free row and re-points the volume's
    :class:`TokenGrid` s at that row, so the per-volume tensors die as soon as they are made: a
    workflow that adds every volume as it is tokenized (or loaded from a cache) holds the batch once,
    in the layout :meth:`CS3FInferer.score` reads in place (no stacked copy, no freed per-volume
    blocks left resident next to the batch). Rows never touched are never paged in.

    A volume whose grids do not match the first one's (keys, shapes, dtypes) is returned unchanged,
    so scoring still reports the mismatch; so is any volume beyond ``capacity``.
    """

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
                    torch.empty((self.capacity, *t.shape), dtype=t.dtype, device=t.device)
                    for t in (g.tokens, g.valid)
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


def _batch_of(bank: Sequence[VolumeTokens], key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens [B, N, d], valid [B, N])`` of one (axis, layer) of the batch.

    A view when the grids are rows of one tensor (a :class:`BatchBuffer`, as the workflow keeps
    them); otherwise a stacked copy, freed after that (axis, layer) is scored. (Re-pointing the
    volumes' grids at the stack instead was measured worse for such banks: the freed per-volume
    tensors stay resident in the heap beside the stacks: 187 vs 63 MB of peak growth at B = 64, 64^3.)
    """
    grids = [vt.grids[key] for vt in bank]
    out = []
    for attr in ("tokens", "valid"):
        parts = [getattr(g, attr) for g in grids]
        base = _rows_of(parts)
        out.append(torch.stack(parts) if base is None else base)
    tokens, valid = out
    return tokens.reshape(len(bank), -1, tokens.shape[-1]), valid.reshape(len(bank), -1)


class CS3FInferer(Inferer):
    """Batch mutual-similarity anomaly scoring of 3D volumes with a frozen 2D encoder.

    Args:
        axes: axes to slice along, any subset of ``("sagittal", "coronal", "axial")`` (or S, C, A).
        q: (coarse) depth-pooling size per axis, ``(q_sagittal, q_coronal, q_axial)``, or one int.
        rho: neighbour ratio of Eq. 2, ``K = max(1, floor(rho * (B - 1)))``.
        d: random-projection dimension.
        delta: token validity threshold on the foreground fraction (used when masks are given).
        seed: seed of the projection matrices (one per axis x layer, shared by all volumes).
        slab_size: slices per encoder forward; rounded to a multiple of ``q`` so that every slab pools
            into whole tokens and its raw features can be dropped at once.
        token_dtype: storage dtype of tokens (``torch.float16`` halves the bank; scoring accumulates
            in fp32).
        score_device: device of the scoring step (default: where the tokens are).
        query_tile: scorer query tile (see :func:`scripts.scoring.mutual_similarity_scores`).
        block_elements: scorer block budget.
        progress: show tqdm progress bars.
        variant: ``"C"`` coarse map only (CS3F-C), ``"F"`` fine C2F map only (CS3F-F), ``"MS"`` mean of
            both (CS3F-MS, Eq. 7).
        q_fine: fine depth-pooling size per axis (or one int) for F/MS; must divide ``q`` on every
            used axis (``q = h * q_fine``). Required for F/MS, unused (and recorded as ``None``) for C.
        L: coarse routes per (query coarse token, reference volume) of the C2F search (Eq. 6).
        chunk_size: batch chunking (paper Sec. 5.1, Table 8): the cohort, in the order given, is cut
            into ``max(1, B // chunk_size)`` consecutive chunks of ``chunk_size`` to ``2 * chunk_size - 1``
            volumes (:func:`scripts.references.chunk_ranges`), each scored independently with the exact
            scorer. ``None``: one batch.
        n_references: score each volume against ``n_references`` references drawn from the other
            volumes by a seeded hash of names (:func:`scripts.references.reference_subsets`, order
            independent; ``K = max(1, floor(rho * n_references))``); cost linear in ``B``. With
            ``n_references >= B - 1`` this is the exact scorer. ``None``: all others. Exclusive with
            ``chunk_size``.
    """

    def __init__(
        self,
        axes: Sequence[str | int] = AXES,
        q: int | Sequence[int] = (14, 14, 14),
        rho: float = 0.1,
        d: int = 128,
        delta: float = 0.0,
        seed: int = 0,
        slab_size: int = 32,
        token_dtype: torch.dtype | str = torch.float32,
        score_device: str | torch.device | None = None,
        query_tile: int = DEFAULT_QUERY_TILE,
        block_elements: int = DEFAULT_BLOCK_ELEMENTS,
        progress: bool = False,
        variant: str = "C",
        q_fine: int | Sequence[int] | None = None,
        L: int = DEFAULT_ROUTES,
        chunk_size: int | None = None,
        n_references: int | None = None,
    ) -> None:
        super().__init__()
        self.axes = [AXES[axis_index(a)] for a in axes]
        if not self.axes or len(set(self.axes)) != len(self.axes):
            raise ValueError(f"axes must be a non-empty subset of {AXES} without repeats, got {list(axes)}")
        self.q = dict(zip(AXES, _per_axis(q, "q"), strict=True))
        self.variant = str(variant).upper()
        if self.variant not in VARIANTS:
            raise ValueError(
                f"variant must be one of {VARIANTS} (coarse, fine C2F, multi-scale), got {variant!r}"
            )
        self.q_fine: dict[str, int] | None = None
        if self.variant != "C":
            if q_fine is None:
                raise ValueError(f"variant {self.variant!r} needs q_fine (e.g. [2, 2, 2]), got None")
            self.q_fine = dict(zip(AXES, _per_axis(q_fine, "q_fine"), strict=True))
            for axis in self.axes:
                qc, qf = self.q[axis], self.q_fine[axis]
                if qc % qf:
                    raise ValueError(
                        f"coarse-to-fine needs q = h * q_fine on every axis: on the {axis} axis q_c={qc} "
                        f"is not a multiple of q_f={qf}"
                    )
        if isinstance(L, bool) or int(L) != L or L < 1:
            raise ValueError(f"L (coarse routes per reference volume) must be an int >= 1, got {L}")
        self.L = int(L)
        self.chunk_size, self.n_references = _batching_options(chunk_size, n_references)
        self.rho = float(rho)
        self.d = int(d)
        self.delta = float(delta)
        self.seed = int(seed)
        self.slab_size = int(slab_size)
        self.token_dtype = getattr(torch, token_dtype) if isinstance(token_dtype, str) else token_dtype
        self.score_device = torch.device(score_device) if score_device is not None else None
        self.query_tile = int(query_tile)
        self.block_elements = int(block_elements)
        self.progress = progress
        self._projections: dict[tuple[str, int, int], RandomProjection] = {}

    # ------------------------------------------------------------------ tokenization
    def _projection(self, axis: str, layer: int, channels: int) -> RandomProjection:
        key = (axis, layer, channels)
        if key not in self._projections:
            self._projections[key] = RandomProjection(channels, self.d, self.seed, f"{axis}/{layer}")
        return self._projections[key]

    @torch.inference_mode()
    def tokenize(
        self, volume: torch.Tensor, encoder: Callable, mask: torch.Tensor | None = None
    ) -> VolumeTokens:
        """Tokens of one volume, streamed slab by slab (raw slice features never outlive a slab).

        Args:
            volume: ``[1, H, W, D]`` (or ``[H, W, D]``) intensities in ``[0, 1]``.
            encoder: frozen 2D encoder, ``[N, 3, R, R]`` -> list of ``[N, C_l, P_l, P_l]``.
            mask: optional foreground ``[1, H, W, D]``; tokens with foreground fraction ``<= delta``
                are invalid.

        Returns:
            :class:`VolumeTokens` with one :class:`TokenGrid` per axis x encoder layer, and for F/MS one
            more per axis x layer, ``"{axis}/{layer}/fine"``, pooled with ``q_fine`` from the same slabs.
        """
        volume = _as_volume(volume)
        params = list(encoder.parameters()) if isinstance(encoder, torch.nn.Module) else []
        device = params[0].device if params else volume.device
        slicer = MultiAxisSlice(
            self.axes,
            size=encoder.input_size,
            mean=getattr(encoder, "mean", MultiAxisSlice().mean.flatten().tolist()),
            std=getattr(encoder, "std", MultiAxisSlice().std.flatten().tolist()),
        )
        volume_dev = volume.to(device)
        out = VolumeTokens(spatial_shape=tuple(volume.shape[1:]))
        for axis in self.axes:
            q = self.q[axis]
            count = volume.shape[1 + axis_index(axis)]
            check_divisible(count, q, axis)
            # Coarse pooling, then (F/MS) fine pooling of the same slab: q = h * q_fine divides the slab.
            scales = [("", q)] + ([(FINE_SUFFIX, self.q_fine[axis])] if self.q_fine is not None else [])
            pools = [DepthPool(qs, axis=axis) for _, qs in scales]
            step = q * max(1, self.slab_size // q)
            grids: list[dict[str, torch.Tensor]] = []  # per layer: {suffix: grid}
            for start in range(0, count, step):
                features = encoder(slicer.slab(volume_dev, axis, start, min(start + step, count)))
                for layer, feat in enumerate(features):
                    projection = self._projection(axis, layer, feat.shape[1])
                    if start == 0:
                        grids.append({})
                    for (suffix, qs), pool in zip(scales, pools, strict=True):
                        tokens = projection(pool(feat)).permute(0, 2, 3, 1).to(self.token_dtype)  # [m,P,P,d]
                        if start == 0:
                            grids[layer][suffix] = torch.empty(
                                (count // qs, *tokens.shape[1:]), dtype=self.token_dtype, device=device
                            )
                        grids[layer][suffix][start // qs : start // qs + tokens.shape[0]] = tokens
                del features  # the raw features of this slab are gone before the next forward
            for suffix, qs in scales:
                for layer, by_scale in enumerate(grids):
                    grid = by_scale[suffix]
                    if mask is not None:
                        valid = TokenValidity(axis, qs, tuple(grid.shape[1:3]), self.delta)(_as_volume(mask))
                    else:
                        valid = torch.ones(grid.shape[:3], dtype=torch.bool)
                    out.grids[f"{axis}/{layer}{suffix}"] = TokenGrid(grid, valid.to(device))
        return out

    # ------------------------------------------------------------------ scoring
    def _key_batches(
        self, bank: Sequence[VolumeTokens], keys: Sequence[str], desc: str
    ) -> Iterator[tuple[str, tuple[int, int, int], torch.Tensor, torch.Tensor]]:
        """``(key, grid shape, tokens [B, N, d], valid [B, N])`` per (axis, layer), on the scoring
        device, with a progress bar over the keys when enabled."""
        iterator: Iterable[str] = keys
        if self.progress:
            from tqdm.auto import tqdm

            iterator = tqdm(keys, desc=desc, unit="grid")
        for key in iterator:
            device = self.score_device or bank[0].grids[key].tokens.device
            tokens, valid = (t.to(device) for t in _batch_of(bank, key))
            yield key, bank[0].grids[key].shape, tokens, valid
            del tokens, valid  # a stacked copy goes before the next key's is made

    def score(
        self,
        bank: Sequence[VolumeTokens],
        queries: Sequence[int] | None = None,
        names: Sequence[str] | None = None,
    ) -> list[dict[str, torch.Tensor]]:
        """Cross-subject token scores for every volume, per axis x layer (Eq. 1-2; Eq. 6 for F/MS).

        Args:
            bank: tokens of the ``B >= 2`` volumes of the batch.
            queries: score only these volumes (indices into ``bank``), against all of them as
                references (or their chunk / their reference subset), e.g. one rank's share; ``None``:
                all.
            names: volume names, used by ``n_references`` to draw each volume's references (so that
                the draw does not depend on the order of ``bank``); ``None``: the positions.

        Returns:
            per volume, ``{key: [M, P, P]}`` fp32 token scores (0 for invalid tokens); for F/MS also
            ``{key + "/fine": [M * h, P, P]}`` C2F fine scores, the coarse ones then coming from the
            same coarse distance pass. Volumes not in ``queries`` get ``{}``.

        With ``chunk_size`` each chunk is scored on its own; with ``n_references`` each volume is
        scored against the batch made of itself and its references (both with the exact scorer).

        Without either, a bank held in a :class:`BatchBuffer` (the workflow's) is scored in place;
        other banks are stacked one (axis, layer) at a time.
        """
        if self.chunk_size is None and self.n_references is None:
            return self._score_exact(bank, queries)
        from scripts.references import chunk_ranges, reference_subsets

        b = len(bank)
        if b < 2:
            raise ValueError(f"CS3F scores volumes against each other: need at least 2 volumes, got {b}")
        wanted = list(range(b)) if queries is None else sorted({int(i) for i in queries})
        if self.n_references is not None and self.n_references >= b - 1:
            return self._score_exact(bank, queries)  # every other volume is a reference: exact
        results: list[dict[str, torch.Tensor]] = [{} for _ in bank]
        if self.chunk_size is not None:
            jobs = []
            for lo, hi in chunk_ranges(b, self.chunk_size):
                mine = [i - lo for i in wanted if lo <= i < hi]
                if mine:
                    jobs.append((list(range(lo, hi)), mine))
        else:
            labels = [str(i) for i in range(b)] if names is None else list(names)
            if len(labels) != b:
                raise ValueError(f"got {len(labels)} names for {b} volumes")
            subsets = reference_subsets(labels, self.n_references, self.seed, wanted)
            if self.variant == "C":
                return self._score_subsets(bank, subsets)
            jobs = [([i, *subsets[i]], [0]) for i in wanted]
        progress, self.progress = self.progress, False  # one bar over the jobs, not one per job
        try:
            iterator = jobs
            if progress:
                from tqdm.auto import tqdm

                what = "chunk" if self.chunk_size is not None else "volume"
                iterator = tqdm(jobs, desc=f"scoring ({what}s)", unit=what)
            for members, local in iterator:
                scored = self._score_exact([bank[j] for j in members], local)
                for j in local:  # a copy: a view would keep the job's whole score grid alive
                    results[members[j]] = {k: v.clone() for k, v in scored[j].items()}
        finally:
            self.progress = progress
        return results

    def _score_subsets(
        self, bank: Sequence[VolumeTokens], subsets: Mapping[int, Sequence[int]]
    ) -> list[dict[str, torch.Tensor]]:
        """``n_references`` for CS3F-C: per axis x layer, each query volume against its reference
        subset (:func:`scripts.scoring.subset_scores`: one gather per query, no per-query batch)."""
        keys = list(bank[0].grids)
        for i, vt in enumerate(bank):
            if list(vt.grids) != keys or any(vt.grids[k].shape != bank[0].grids[k].shape for k in keys):
                mine, first = ({k: g.shape for k, g in v.grids.items()} for v in (vt, bank[0]))
                raise ValueError(
                    f"token grids do not agree: volume {i} has {mine}, volume 0 has {first}; volumes must "
                    f"share the grid along each slicing axis"
                )
        results: list[dict[str, torch.Tensor]] = [{} for _ in bank]
        batches = self._key_batches(bank, keys, "scoring vs reference subsets (axis/layer)")
        for key, shape, tokens, valid in batches:
            try:
                scores = subset_scores(tokens, valid, subsets, self.rho, self.query_tile, self.block_elements)
            except ValueError as err:
                raise ValueError(f"{key}: {err}") from None
            for i in subsets:
                results[i][key] = scores[i].cpu().reshape(shape)
            del tokens, valid
        return results

    def score_references(
        self,
        references: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
        bank: Sequence[VolumeTokens],
        queries: Sequence[int] | None = None,
        exclude: Sequence[int | None] | None = None,
    ) -> list[dict[str, torch.Tensor]]:
        """Token scores of new volumes against a reference bank (reference-bank mode).

        Each volume of ``bank`` is matched against the bank's volumes only: new volumes are not
        references for each other (a daily batch may be one scan, and its scores must not depend on
        what else arrived that day), and ``K = max(1, floor(rho * B_ref))``.

        Args:
            references: ``{key: (tokens [B_ref, N, d], valid [B_ref, N])}`` for every grid key the
                volumes have (e.g. :meth:`scripts.storage.bank.TokenBank.references`: fp16, memory-mapped).
            bank: tokens of the ``>= 1`` new volumes.
            queries: score only these (indices into ``bank``); ``None``: all.
            exclude: per volume of ``bank``, the index of the reference that is that same scan (a
                volume is never its own reference), or ``None``.

        Returns:
            as :meth:`score`. CS3F-C streams the references block by block
            (:func:`scripts.scoring.reference_scores`); F/MS score each volume by
            :func:`scripts.scoring.c2f_scores` on the batch of itself and the references, which holds
            one copy of the bank's tokens (storage dtype) in memory at a time.
        """
        if not bank:
            raise ValueError("no volumes to score against the reference bank")
        b = len(bank)
        wanted = list(range(b)) if queries is None else sorted({int(i) for i in queries})
        skips = [None] * b if exclude is None else list(exclude)
        if len(skips) != b:
            raise ValueError(f"exclude has {len(skips)} entries for {b} volumes")
        keys = list(bank[0].grids)
        for key in keys:
            if key not in references:
                fine = (
                    " (fine tokens: build the bank with variant F or MS)" if key.endswith(FINE_SUFFIX) else ""
                )
                raise ValueError(
                    f"the reference bank has no {key!r} tokens{fine}; it has {sorted(references)}"
                )
            for i, vt in enumerate(bank):
                grid = vt.grids.get(key)
                n_ref = references[key][0].shape[1]
                if grid is None or grid.valid.numel() != n_ref or grid.tokens.shape[-1] != self.d:
                    got = "missing" if grid is None else f"{tuple(grid.shape)} x d={grid.tokens.shape[-1]}"
                    raise ValueError(
                        f"volume {i}: {key} token grid {got} does not match the reference bank's "
                        f"{n_ref} tokens x d={references[key][0].shape[-1]}: volumes must be on its grid"
                    )
        results: list[dict[str, torch.Tensor]] = [{} for _ in bank]
        if self.variant != "C":
            b_ref = next(iter(references.values()))[0].shape[0]

            def reference_volume(j: int, like: VolumeTokens) -> VolumeTokens:
                grids = {
                    k: TokenGrid(
                        references[k][0][j].view(*like.grids[k].shape, self.d),
                        references[k][1][j].view(like.grids[k].shape),
                    )
                    for k in keys
                }
                return VolumeTokens(spatial_shape=like.spatial_shape, grids=grids)

            for i in wanted:
                refs = [reference_volume(j, bank[i]) for j in range(b_ref) if j != skips[i]]
                results[i] = self._score_exact([bank[i], *refs], [0])[0]
            return results
        batches = self._key_batches([bank[i] for i in wanted], keys, "scoring vs bank (axis/layer)")
        for key, shape, tokens, valid in batches:
            ref_tokens, ref_valid = references[key]
            try:
                scores = reference_scores(
                    tokens,
                    valid,
                    ref_tokens,
                    ref_valid,
                    self.rho,
                    [skips[i] for i in wanted],
                    self.query_tile,
                    self.block_elements,
                )
            except ValueError as err:
                raise ValueError(f"{key}: {err}") from None
            for row, i in enumerate(wanted):
                results[i][key] = scores[row].cpu().reshape(shape)
        return results

    def _score_exact(
        self, bank: Sequence[VolumeTokens], queries: Sequence[int] | None = None
    ) -> list[dict[str, torch.Tensor]]:
        """:meth:`score` of one batch with the exact scorer (no chunks, every other volume a reference)."""
        if len(bank) < 2:
            raise ValueError(
                f"CS3F scores volumes against each other: need at least 2 volumes, got {len(bank)}"
            )
        keys = list(bank[0].grids)
        for i, vt in enumerate(bank):
            if list(vt.grids) != keys:
                raise ValueError(f"volume {i} has token grids {list(vt.grids)}, volume 0 has {keys}")
            for key in keys:
                if vt.grids[key].shape != bank[0].grids[key].shape:
                    raise ValueError(
                        f"token grids do not agree for {key}: volume {i} has {vt.grids[key].shape}, "
                        f"volume 0 has {bank[0].grids[key].shape}; volumes must share the grid along each "
                        f"slicing axis (resample or pad them to one shape, e.g. MONAI ResizeWithPadOrCropd)"
                    )
        coarse_keys = [k for k in keys if not k.endswith(FINE_SUFFIX)]
        if self.variant != "C":
            missing = [k for k in coarse_keys if k + FINE_SUFFIX not in keys]
            if missing:
                raise ValueError(
                    f"variant {self.variant!r} needs fine token grids, missing {missing[0] + FINE_SUFFIX!r}: "
                    f"tokenize with this inferer (q_fine set)"
                )
        results: list[dict[str, torch.Tensor]] = [{} for _ in bank]
        wanted = range(len(bank)) if queries is None else sorted({int(i) for i in queries})
        for key, shape, tokens, valid in self._key_batches(bank, coarse_keys, "scoring (axis/layer)"):
            device = tokens.device
            try:
                if self.variant == "C":
                    scores = mutual_similarity_scores(
                        tokens, valid, self.rho, self.query_tile, self.block_elements, volumes=queries
                    )
                else:
                    fine_shape = bank[0].grids[key + FINE_SUFFIX].shape
                    h = fine_shape[0] // shape[0]
                    fine = torch.stack(
                        [_children_last(vt.grids[key + FINE_SUFFIX].tokens, h) for vt in bank]
                    ).to(device)
                    fine_valid = torch.stack(
                        [_children_last(vt.grids[key + FINE_SUFFIX].valid, h) for vt in bank]
                    ).to(device)
                    scores, fine_scores = c2f_scores(
                        tokens,
                        fine,
                        valid,
                        fine_valid,
                        self.rho,
                        self.L,
                        self.query_tile,
                        self.block_elements,
                        volumes=queries,
                    )
                    for i in wanted:  # [N_c, h] -> [M * h, P, P]
                        grid = fine_scores[i].cpu().reshape(*shape, h).permute(0, 3, 1, 2)
                        results[i][key + FINE_SUFFIX] = grid.reshape(fine_shape)
                    del fine, fine_valid
            except ValueError as err:
                raise ValueError(f"{key}: {err}") from None
            for i in wanted:
                results[i][key] = scores[i].cpu().reshape(shape)
            del tokens, valid
        return results

    # ------------------------------------------------------------------ voxel maps
    def voxel_map(
        self,
        token_scores: dict[str, torch.Tensor],
        spatial_shape: Sequence[int],
        mask: torch.Tensor | None = None,
        axis_max: dict[str, float] | None = None,
        variant: str | None = None,
    ) -> torch.Tensor:
        """Fuse token scores into a voxel anomaly map ``[1, H, W, D]`` (Sec. 3.3.4, Eq. 5 and 7).

        Each axis x layer grid is interpolated trilinearly to the volume grid; per scale (coarse,
        fine), layers are averaged per axis and axes are averaged; C takes the coarse map, F the fine
        one and MS their mean (Eq. 7); voxels outside ``mask`` are set to 0. (Fusion is linear, so it
        is done per axis: the axis map of MS is the mean of its coarse and fine axis maps.)

        Args:
            token_scores: ``{"{axis}/{layer}": [M, P, P]}`` (and ``"{axis}/{layer}/fine"`` grids for
                F/MS) of one volume.
            spatial_shape: ``(H, W, D)`` of the volume.
            mask: optional foreground ``[1, H, W, D]``.
            axis_max: if given, filled with the (masked) maximum of each axis map (a cheap breakdown
                of the subject score).
            variant: fuse as this variant instead of the inferer's (e.g. the C, F and MS maps from one
                F/MS scoring pass).
        """
        variant = self.variant if variant is None else str(variant).upper()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        scales = {"C": ("coarse",), "F": ("fine",), "MS": ("coarse", "fine")}[variant]
        shape = tuple(int(s) for s in spatial_shape)
        per_axis: dict[str, dict[str, list[torch.Tensor]]] = {}
        for key, grid in token_scores.items():
            scale = "fine" if key.endswith(FINE_SUFFIX) else "coarse"
            if scale not in scales:
                continue
            axis = key.split("/")[0]
            dim = axis_index(axis)
            target = (shape[dim], *[shape[k] for k in range(3) if k != dim])
            up = F.interpolate(grid[None, None].float(), size=target, mode="trilinear", align_corners=False)
            per_axis.setdefault(axis, {}).setdefault(scale, []).append(restore_axis(up[0, 0], axis))
        if not per_axis:
            raise ValueError(
                f"no token scores to fuse for variant {variant!r}"
                + (
                    " (it needs '{axis}/{layer}/fine' scores: score with q_fine set)"
                    if variant != "C"
                    else ""
                )
            )
        for axis, by_scale in per_axis.items():
            if len(by_scale) != len(scales):
                raise ValueError(
                    f"variant {variant!r} fuses {scales} scores but the {axis} axis has only {list(by_scale)}"
                )
        inside = (_as_volume(mask)[0] > 0) if mask is not None else None
        fused = torch.zeros(shape)
        for axis, by_scale in per_axis.items():
            axis_map = torch.stack([torch.stack(maps).mean(dim=0) for maps in by_scale.values()]).mean(dim=0)
            if axis_max is not None:
                axis_max[axis] = float(
                    (axis_map * inside.to(axis_map.device) if inside is not None else axis_map).max()
                )
            fused += axis_map.cpu() / len(per_axis)
        if inside is not None:
            fused = fused * inside.cpu()
        return fused.unsqueeze(0)

    @staticmethod
    def subject_score(anomaly_map: torch.Tensor) -> float:
        """Subject-level anomaly score: the maximum voxel score (Sec. 3.3.4)."""
        return float(anomaly_map.max())

    # ------------------------------------------------------------------ one call
    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor | Sequence[torch.Tensor],
        network: Callable,
        masks: torch.Tensor | Sequence[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor | list[torch.Tensor], torch.Tensor]:
        """Score a batch in memory.

        Args:
            inputs: ``[B, 1, H, W, D]``, or a list of ``[1, H, W, D]`` volumes whose token grids agree.
            network: the frozen 2D slice encoder.
            masks: optional foreground masks, same layout as ``inputs``.

        Returns:
            ``(maps, scores)``: voxel maps ``[B, 1, H, W, D]`` (a list when the inputs were a list of
            different shapes) and subject scores ``[B]``.
        """
        volumes = list(inputs)
        mask_list = list(masks) if masks is not None else [None] * len(volumes)
        if len(mask_list) != len(volumes):
            raise ValueError(f"got {len(volumes)} volumes but {len(mask_list)} masks")
        iterator = zip(volumes, mask_list, strict=True)
        if self.progress:
            from tqdm.auto import tqdm

            iterator = tqdm(iterator, total=len(volumes), desc="tokenizing", unit="vol")
        bank = [self.tokenize(v, network, m) for v, m in iterator]
        token_scores = self.score(bank)
        maps = [
            self.voxel_map(ts, vt.spatial_shape, m)
            for ts, vt, m in zip(token_scores, bank, mask_list, strict=True)
        ]
        scores = torch.tensor([self.subject_score(m) for m in maps])
        if isinstance(inputs, torch.Tensor) or len({tuple(m.shape) for m in maps}) == 1:
            return torch.stack(maps), scores
        return maps, scores

    def describe(self) -> dict:
        """Parameters of this inferer (for run summaries and cache keys)."""
        return {
            "axes": self.axes,
            "q": [self.q[a] for a in AXES],
            "rho": self.rho,
            "d": self.d,
            "delta": self.delta,
            "seed": self.seed,
            "token_dtype": str(self.token_dtype).replace("torch.", ""),
            "k_rule": "max(1, floor(rho * (B - 1)))",
            "variant": self.variant,
            "q_fine": [self.q_fine[a] for a in AXES] if self.q_fine is not None else None,
            "L": self.L,
            # batching options only when set (they shape scores, not tokens)
            **{k: v for k, v in (("chunk_size", self.chunk_size), ("n_references", self.n_references)) if v},
        }
