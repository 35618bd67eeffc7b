"""Reduced-precision distance blocks with a rigorous error bound, for exact-where-it-matters scoring.

The exact scorer (:mod:`scripts.scoring`) needs, per query token, only the *choice* of its ``K``
nearest volumes and of the nearest token in each; the chosen distances are computed in fp32. This
module supplies a cheaper first pass for those choices: distance blocks with bf16 operands (CPUs with
``avx512_bf16``/AMX, GPU tensor cores) or TF32 (GPU tensor cores), with a bound on their error, so that
the scorer keeps every candidate whose low-precision value is within the bound of the best and decides
among the candidates in fp32.

What a block holds. Every value is a *half* squared distance ``h = |q - r|^2 / 2`` of a (query,
reference) pair, clamped at 0 when read (the exact ``h`` is never negative, so clamping never moves a
value away from it):

* ``bf16``: one GEMM of augmented bf16 rows ``[q~, 1, 1, n'_hi, n'_lo] . [-r~, m'_hi, m'_lo, 1, 1]``,
  accumulated in fp32 and rounded once to bf16. ``t~`` is token ``t`` rounded to bf16 and
  ``e_t = t~ - t`` its (exactly known) rounding error; ``n' = |q|^2/2 + e_q.q~`` and
  ``m' = |r|^2/2 + r.e_r`` are computed in fp32 and each split into two bf16 numbers (so they enter
  with ~2^-16 relative error instead of bf16's 2^-8). With these first-order corrections the value in
  exact arithmetic is ``h - e_q.(r~ - q~) - (q - r).e_r``: its error is proportional to the distance,
  so near neighbours - the ones whose order matters - are resolved far better than bf16's resolution
  of ``|r|^2 - 2 q.r``. Minima are taken on the int16 view of the bf16 bits (for values >= 0 the int16
  order is the float order, and a negative value reads below every positive one, hence as 0 after
  clamping): the integer reduction is several times faster than the bf16 one on the CPU.
* ``tf32``: ``(|q|^2/2 + |r|^2/2) - q.r`` with the fp32 tokens and the GEMM on TF32 tensor cores
  (CUDA only), fp32 output. The hardware rounds the operands, so ``|e_t| <= u_in |t|`` is all that is
  known and no correction applies.

The bound. For a token ``t`` let ``E`` be the largest ``|e_r|`` of the bank. Then for every pair

``|o - h| <= a_t sqrt(2 h) + b_t + w |o|``,

with, for bf16, ``a_t = |e_t| + E`` and ``b_t = E (|e_t| + E)`` plus the fp32 terms below (either token
of the pair may be the row: ``|e_q.(r~ - q~)| + |(q - r).e_r| <= (|e_q| + |e_r|) |q - r| + |e_q|
(|e_q| + |e_r|)``); for TF32, ``a_t = 0`` and ``b_t = |e_t| R + |t| E + |e_t| E`` (``R`` the largest
norm; ``|q~.r~ - q.r| <= |e_q| |r| + |q| |e_r| + |e_q| |e_r|``). The fp32 terms: the accumulation of
the ``d + 4`` exact products adds at most ``gamma * sum|terms|`` with ``gamma = 2 (d + 4) 2^-24``
(twice the textbook constant: fused pairs of products may round twice), the fp32 norms and their
split ``(2 (d + 2) 2^-24 + 2^-16) (|n'| + max|m'|)``; products flushed to zero below fp32's normal
range add 1e-30; every term is then inflated by 0.1 %. ``w = u_out / (1 - u_out)`` covers the output
rounding (bf16 rounds to nearest: ``u_out = 2^-8``).

Consequence (:meth:`LowPrecisionBlocks.radius`): if ``o*`` is the smallest low-precision value of a row
(a token against one volume, or the ``K``-th smallest over the volumes), every pair whose exact value
can be the smallest (or among the ``K`` smallest) has a low-precision value at most

``radius(o*) = (o* (1 + w) + 2 a sqrt(2 H) + 2 b) / (1 - w)``, ``H = o* (1 + w) + b + a sqrt(2 H)``,

where ``H`` bounds the exact value of the low-precision minimum. The assumptions are those of the
hardware: operands rounded to nearest (bf16, by torch here) or truncated at worst (TF32), products
exact, fp32 accumulation, one final rounding (on CUDA, bf16 GEMMs run without reduced-precision
split-K reductions). ``tests/unit/test_mixed_precision.py`` checks the bound against float64 on
adversarial tokens on the machine it runs on.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "PRECISIONS",
    "LOW_PRECISIONS",
    "check_precision",
    "LowPrecisionBlocks",
    "Spec",
    "cpu_has_native_bf16",
    "resolve_precision",
    "spec_of",
]

#: values of the ``score_precision`` key
PRECISIONS = ("auto", "fp32", "bf16", "tf32")
#: the reduced-precision passes
LOW_PRECISIONS = ("bf16", "tf32")
FP32_EPS = 2.0**-24  # unit roundoff of fp32


@dataclass(frozen=True)
class Spec:
    """A reduced-precision pass: its operand dtype and the units of its roundings.

    Attributes:
        name: ``"bf16"`` or ``"tf32"``.
        dtype: dtype of the GEMM operands and of the block.
        u_in: relative rounding of an operand element done by the hardware (TF32), or ``None`` when
            the operands are rounded here and their error is measured per token (bf16).
        u_out: relative rounding of the block's output.
    """

    name: str
    dtype: torch.dtype
    u_in: float | None
    u_out: float


_SPECS = {
    # bf16: 8 significant bits, round to nearest: u = 2^-8; operands rounded by torch (measured).
    "bf16": Spec("bf16", torch.bfloat16, None, 2.0**-8),
    # TF32: 11 significant bits; 2^-10 also covers hardware that truncates instead of rounding.
    "tf32": Spec("tf32", torch.float32, 2.0**-10, FP32_EPS),
}


def spec_of(name: str) -> Spec:
    """The :class:`Spec` of ``"bf16"`` or ``"tf32"``."""
    if name not in _SPECS:
        raise ValueError(f"reduced precision must be one of {LOW_PRECISIONS}, got {name!r}")
    return _SPECS[name]


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (``avx512_bf16`` or ``amx_bf16`` in /proc/cpuinfo).

    Without it oneDNN emulates bf16 GEMMs, which are then no faster than fp32 ones.
    """
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def check_precision(precision: str) -> str:
    """``precision`` normalised (one of :data:`PRECISIONS`), or ``ValueError``."""
    name = str(precision).strip().lower()
    if name not in PRECISIONS:
        raise ValueError(f"score_precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return name


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """The distance pass that ``precision`` means on ``device``: ``"fp32"``, ``"bf16"`` or ``"tf32"``.

    ``"auto"`` turns a reduced-precision pass on only where it was measured faster than the exact
    fp32 scorer with scores equal to it within 1e-5 on the demo's real tokens (docs/performance.md):
    bf16 on CPUs with native bf16. On CUDA it stays ``"fp32"`` until a GPU run has measured it
    (``python -m scripts.benchmarks gpu`` prints the comparison). ``"tf32"`` needs CUDA; ``"bf16"``
    runs anywhere (emulated, slowly, on CPUs without native bf16).

    Raises:
        ValueError: an unknown precision, or ``"tf32"`` off CUDA.
    """
    name = check_precision(precision)
    device = torch.device(device)
    if name == "auto":
        return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"
    if name == "tf32" and device.type != "cuda":
        raise ValueError("score_precision tf32 needs a CUDA device (TF32 tensor cores); use bf16 or fp32")
    return name


@contextlib.contextmanager
def _matmul_flags(spec: Spec, device: torch.device) -> Iterator[None]:
    """TF32 on for the tf32 pass; on CUDA, bf16 GEMMs without reduced-precision (bf16) split-K
    reductions, which the bound does not cover. Restored afterwards."""
    if device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    before = (matmul.allow_tf32, matmul.allow_bf16_reduced_precision_reduction)
    matmul.allow_tf32 = spec.name == "tf32"
    matmul.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        matmul.allow_tf32, matmul.allow_bf16_reduced_precision_reduction = before


def _split(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``values`` as ``hi + lo`` in bf16 (``|values - hi - lo| <= 2^-16 |values|``); inf -> (inf, 0)."""
    hi = values.to(torch.bfloat16)
    lo = torch.where(torch.isfinite(values), values - hi.float(), 0.0).to(torch.bfloat16)
    return hi, lo


class LowPrecisionBlocks:
    """Reduced-precision half-squared-distance blocks of packed volumes, with per-token error bounds.

    Args:
        spec: the pass (:func:`spec_of`).
        refs: ``refs(b)`` -> ``[M, d]`` fp32 packed tokens of volume ``b`` (valid first).
        gather: ``gather(b, positions)`` -> fp32 packed tokens of volume ``b`` at ``positions`` (any
            shape), without materialising the whole volume.
        half_norms: ``[B, M]`` fp32 ``|t|^2 / 2`` of the packed tokens, ``+inf`` where invalid.

    Attributes:
        slope, offset: ``[B, M]`` ``a_t`` and ``b_t`` of token ``t``'s bound
            ``|o - h| <= a_t sqrt(2 h) + b_t + w |o|`` against any other token (module docstring).
    """

    def __init__(
        self,
        spec: Spec,
        refs: Callable[[int], torch.Tensor],
        gather: Callable[[int, torch.Tensor], torch.Tensor],
        half_norms: torch.Tensor,
    ) -> None:
        self.spec, self.refs, self.gather, self.half = spec, refs, gather, half_norms
        b, m = half_norms.shape
        self.device = half_norms.device
        d = refs(0).shape[1]
        norms = torch.zeros(b, m, dtype=torch.float32, device=self.device)
        errors = torch.zeros(b, m, dtype=torch.float32, device=self.device)
        self.right: torch.Tensor | None = None
        self.left_half = self.right_half = half_norms
        if spec.name == "bf16":
            # [B, M, W] right operands [-r~, m'_hi, m'_lo, 1, 1] (W = d + 4, padded to an even width for
            # the pairwise bf16 dot instructions) and the left rows' n' (see left()).
            self.right = torch.zeros(b, m, -(-(d + 4) // 2) * 2, dtype=torch.bfloat16, device=self.device)
            self.left_half, self.right_half = torch.empty_like(half_norms), torch.empty_like(half_norms)
        for v in range(b):
            t = refs(v)
            norms[v] = torch.linalg.vector_norm(t, dim=1)
            if self.right is None:
                errors[v] = spec.u_in * norms[v]
                continue
            rounded = t.to(torch.bfloat16)
            error = rounded.float() - t  # exact in fp32
            errors[v] = torch.linalg.vector_norm(error, dim=1)
            # First-order corrections of the operand rounding (module docstring): the computed value
            # is then h - e_q.(r~ - q~) - (q - r).e_r, an error proportional to the distance.
            self.left_half[v] = half_norms[v] + torch.einsum("md,md->m", error, rounded.float())
            self.right_half[v] = half_norms[v] + torch.einsum("md,md->m", t, error)
            self.right[v, :, :d] = -rounded
            self.right[v, :, d], self.right[v, :, d + 1] = _split(self.right_half[v])
            self.right[v, :, d + 2 : d + 4] = 1.0
        self.slope, self.offset = self._bounds(norms, errors, d)

    def _bounds(self, norms: torch.Tensor, errors: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, M]`` ``(a_t, b_t)`` of every token (0 for padding tokens, which are never used)."""
        valid = torch.isfinite(self.half)
        big_norm = float(norms[valid].max())
        big_error = float(errors[valid].max())
        gamma = 2.0 * (d + 4) * FP32_EPS  # fp32 accumulation of the GEMM's d + 4 exact products
        # the fp32 norms (and corrections), then for bf16 their split into two bf16 numbers
        split = 2.0 * (d + 2) * FP32_EPS + (2.0**-16 if self.right is not None else FP32_EPS)
        n = torch.where(valid, torch.maximum(self.left_half.abs(), self.right_half.abs()), 0.0)
        big_half = float(n.max())
        # |hi| + |lo| of a split number is at most 1.01 times the number
        offset = split * (n + big_half) + gamma * ((norms + errors) * (big_norm + big_error) + 1.01 * (n + big_half))
        if self.right is None:  # hardware rounding (TF32): |q~.r~ - q.r| <= e_q |r| + |q| e_r + e_q e_r
            slope = torch.zeros_like(norms)
            offset += errors * big_norm + norms * big_error + errors * big_error
        else:  # corrected operands: (e_q + e_r) |q - r| + e_q (e_q + e_r), with either token the row
            slope = errors + big_error
            offset += big_error * (errors + big_error)
        # 1e-30: products flushed to zero below fp32's normal range (bf16 dot instructions do).
        slope = torch.where(valid, slope * (1.0 + 1e-3), 0.0)
        return slope, torch.where(valid, offset * (1.0 + 1e-3) + 1e-30, 0.0)

    def radius(self, values: torch.Tensor, slope: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """Every low-precision value that can hide the exact minimum of a row whose low-precision
        minimum is ``values`` (``o >= 0``, ``+inf`` allowed), for query tokens of bound ``(slope,
        offset)``: ``(o (1 + w) + 2 a sqrt(2 H) + 2 b) / (1 - w)``, rounded up, where ``H`` bounds the
        exact ``h`` of the minimum (``H = o (1 + w) + b + a sqrt(2 H)``)."""
        w = self.spec.u_out / (1.0 - self.spec.u_out)
        top = values * (1.0 + w) + offset
        root = (slope * math.sqrt(2.0) + torch.sqrt(2.0 * slope * slope + 4.0 * top)) / 2.0  # sqrt(H)
        out = (top + offset + 2.0 * slope * math.sqrt(2.0) * root) / (1.0 - w) * (1.0 + 2.0**-20)
        return torch.where(torch.isfinite(values), out, math.inf)

    def left(self, a: int, p: torch.Tensor) -> torch.Tensor:
        """Left operand of volume ``a``'s packed fp32 tokens ``p``: ``[q~, 1, 1, n'_hi, n'_lo]`` rows for
        bf16, the fp32 tokens for TF32."""
        if self.right is None:
            return p
        d = p.shape[1]
        out = torch.zeros(p.shape[0], self.right.shape[2], dtype=torch.bfloat16, device=p.device)
        out[:, :d] = -self.right[a, : p.shape[0], :d]  # q~ (negation is exact)
        out[:, d : d + 2] = 1.0
        out[:, d + 2], out[:, d + 3] = _split(self.left_half[a, : p.shape[0]])
        return out

    def limits(self, a: int, rows: torch.Tensor | slice, values: torch.Tensor) -> torch.Tensor:
        """:meth:`radius` of the minima ``values`` of volume ``a``'s packed tokens ``rows``."""
        return self.radius(values, self.slope[a, rows], self.offset[a, rows])

    def block(
        self, left: torch.Tensor, a: int, rows: slice, c: int, refs_c: torch.Tensor | None, out: torch.Tensor
    ) -> torch.Tensor:
        """``[R, M]`` low-precision ``h`` of volume ``a``'s packed tokens from ``rows.start`` to volume
        ``c``'s packed tokens, in its *raw* form (:meth:`raw`), written into ``out`` (flat workspace of
        the block's dtype); ``refs_c``: ``c``'s fp32 packed tokens (TF32 only).

        ``R`` is the number of ``rows`` rounded up to a multiple of :data:`ROW_BUCKET` (at most to the
        last packed token): oneDNN builds a GEMM primitive for every new shape, which costs more than a
        small GEMM, and row counts that vary from volume to volume would rebuild one every call. The
        rows beyond ``rows`` are other tokens of ``a`` (padding tokens are ``+inf``): harmless to column
        minima, and row minima are taken over the first ``len(rows)`` rows.
        """
        stop = min(self.half.shape[1], rows.start + _bucket(rows.stop - rows.start))
        q = left[rows.start : stop]
        m = self.half.shape[1]
        block = out[: q.shape[0] * m].view(q.shape[0], m)
        self._fill(block, q, self.half[a, rows.start : stop], c, refs_c)
        return self.raw(block)

    def _fill(
        self, block: torch.Tensor, left: torch.Tensor, half: torch.Tensor, c: int, refs_c: torch.Tensor | None
    ) -> None:
        """``block [R, M]`` = low-precision ``h`` of the rows ``left`` (half norms ``half``, TF32) to
        volume ``c``."""
        with _matmul_flags(self.spec, self.device):
            if self.right is not None:
                torch.mm(left, self.right[c].t(), out=block)
            else:
                torch.add(half.unsqueeze(1), self.half[c].unsqueeze(0), out=block)
                block.addmm_(left, refs_c.t(), alpha=-1.0)

    def raw(self, block: torch.Tensor) -> torch.Tensor:
        """The block in the form its minima are taken in: the int16 view of bf16 (for values >= 0 the
        int16 order is the float order, and every negative value reads below every positive one, so
        the minimum clamped at 0 is exact), fp32 as is. :meth:`values` turns raw minima into fp32."""
        return block.view(torch.int16) if block.dtype == torch.bfloat16 else block

    def raw_full(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Raw minima initialised to ``+inf`` (bf16 ``+inf`` is int16 32640, above every finite value)."""
        if self.right is not None:
            return torch.full(shape, 0x7F80, dtype=torch.int16, device=self.device)
        return torch.full(shape, math.inf, dtype=torch.float32, device=self.device)

    def values(self, raw: torch.Tensor) -> torch.Tensor:
        """fp32 values of raw minima, clamped at 0 (a new tensor)."""
        if raw.dtype == torch.int16:
            return raw.clamp_min(0).view(torch.bfloat16).float()
        return raw.clamp_min(0.0)

    def workspace(self, elements: int) -> torch.Tensor:
        return torch.empty(elements, dtype=self.spec.dtype, device=self.device)

    def nearest(
        self,
        a: int,
        entries: tuple[torch.Tensor, torch.Tensor],
        left_a: torch.Tensor,
        p_a: torch.Tensor,
        workspace: torch.Tensor,
    ) -> torch.Tensor:
        """Exact fp32 distance of each of volume ``a``'s packed tokens ``rows`` to its nearest token of
        volume ``vols`` (``entries = (rows, vols)``, ``[P]`` each, sorted by volume).

        The low-precision rows of consecutive entries are stacked into one block (one GEMM per volume,
        into its rows; ``left_a``: :meth:`left` of ``a``; ``p_a``: its fp32 packed tokens), reduced over
        :data:`GROUPS`-token strided groups of reference tokens; the groups whose minimum is within
        :meth:`radius` of their row's minimum hold every token that can be the nearest, and of those the
        tokens within the radius themselves. Their distances are computed directly in fp32 (``|q - r|``,
        as the reference scorer recomputes its chosen distances) and the smallest per entry is returned.
        As many entries at a time as ``workspace`` holds.
        """
        rows, vols = entries
        m = self.half.shape[1]
        step = max(ROW_BUCKET, workspace.numel() // m)
        out = torch.empty(rows.numel(), dtype=torch.float32, device=p_a.device)
        e0 = 0
        for e1, segments in _chunks(vols, step):
            at_row, start = [], 0
            for vol, n in segments:  # one GEMM per volume, its rows padded to a bucket (see block())
                seg = rows[e0 : e0 + n]
                padded = torch.cat([seg, seg[:1].expand(_bucket(n) - n)])
                refs = self.refs(vol) if self.right is None else None
                target = workspace[start * m : (start + padded.numel()) * m].view(padded.numel(), m)
                self._fill(target, left_a[padded], self.half[a, padded], vol, refs)
                at_row.append(torch.arange(start, start + n, device=rows.device))
                start += padded.numel()
                e0 += n
            raw = self.raw(workspace[: start * m].view(start, m))
            real = torch.cat(at_row)
            out[e1 - real.numel() : e1] = self._candidates_nearest(
                a, rows[e1 - real.numel() : e1], vols[e1 - real.numel() : e1], raw, real, p_a
            )
        return out

    def _candidates_nearest(
        self, a: int, rows: torch.Tensor, vols: torch.Tensor, raw: torch.Tensor, real: torch.Tensor, p_a: torch.Tensor
    ) -> torch.Tensor:
        """The exact nearest distance of each entry ``(rows, vols)``, whose low-precision values are
        the rows ``real`` of the stacked raw block (see :meth:`nearest`)."""
        minima, columns = _group_minima(self, raw)
        minima = minima[real]
        limit = self.radius(minima.amin(dim=1), self.slope[a, rows], self.offset[a, rows])
        at, group = torch.nonzero(minima <= limit.unsqueeze(1), as_tuple=True)
        where = columns[group]  # [P, GROUPS] packed positions of each candidate group's tokens
        # The candidate tokens themselves (padding tokens are +inf, never candidates) ...
        values = self.values(raw[real[at].unsqueeze(1), where])
        pick, slot = torch.nonzero(values <= limit[at].unsqueeze(1), as_tuple=True)
        at, where = at[pick], where[pick, slot]
        # ... and their exact distances.
        dist = torch.linalg.vector_norm(p_a[rows[at]] - self.gather(vols[at], where), dim=1)
        best = torch.full((rows.numel(),), math.inf, dtype=torch.float32, device=p_a.device)
        return best.scatter_reduce_(0, at, dist, "amin")


#: reference tokens per candidate group of :meth:`LowPrecisionBlocks.nearest`
GROUPS = 16
#: GEMM row counts are rounded up to a multiple of this (see :meth:`LowPrecisionBlocks.block`)
ROW_BUCKET = 32


def _bucket(n: int) -> int:
    return -(-n // ROW_BUCKET) * ROW_BUCKET


def _chunks(vols: torch.Tensor, rows: int) -> Iterator[tuple[int, list[tuple[int, int]]]]:
    """Consecutive runs of equal volumes in ``vols`` (sorted), grouped so that each group's rows,
    padded to buckets, fit in ``rows``: ``(end index of the group, [(volume, count), ...])``. A run
    longer than ``rows`` is split."""
    volumes, counts = (x.tolist() for x in torch.unique_consecutive(vols, return_counts=True))
    group, used, end = [], 0, 0
    limit = max(ROW_BUCKET, rows // ROW_BUCKET * ROW_BUCKET)
    for vol, n in zip(volumes, counts, strict=True):
        while n:
            take = min(n, limit)
            if group and used + _bucket(take) > rows:
                yield end, group
                group, used = [], 0
            group.append((vol, take))
            used += _bucket(take)
            end += take
            n -= take
    if group:
        yield end, group


def _group_minima(low: LowPrecisionBlocks, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 minima of a raw block ``[R, M]`` over strided groups of columns, and the columns of each.

    The first ``S * GROUPS`` columns (``S = M // GROUPS``) form ``S`` groups ``{g, g + S, ...}``, reduced
    over the middle dim of a ``[R, GROUPS, S]`` view (vectorised along the contiguous ``S``); each
    remaining column is a group of its own. Returns ``([R, S + rest] minima, [S + rest, GROUPS] int64
    columns)`` (a group of one repeats its column).
    """
    r, m = raw.shape
    s = m // GROUPS
    device = raw.device
    parts, columns = [], []
    if s:
        parts.append(raw[:, : s * GROUPS].unflatten(1, (GROUPS, s)).amin(dim=1))
        columns.append(torch.arange(s, device=device).unsqueeze(1) + s * torch.arange(GROUPS, device=device))
    if m > s * GROUPS:
        parts.append(raw[:, s * GROUPS :])
        columns.append(torch.arange(s * GROUPS, m, device=device).unsqueeze(1).expand(-1, GROUPS))
    return low.values(torch.cat(parts, dim=1)), torch.cat(columns)


def kth_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """``[R]`` the ``k``-th smallest of each row of ``values`` (``+inf`` when a row has fewer)."""
    if values.shape[1] < k:
        return torch.full(values.shape[:1], math.inf, dtype=values.dtype, device=values.device)
    return values.topk(k, dim=1, largest=False).values[:, -1]
