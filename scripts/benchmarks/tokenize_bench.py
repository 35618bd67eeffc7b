"""Section 5, tokenization: the bare encoder against :meth:`scripts.inferer.CS3FInferer.tokenize`.

``bare`` runs the encoder over exactly the slabs ``tokenize`` feeds it, prepared beforehand, so that
``tokenize / bare - 1`` is the cost of everything around the encoder (slicing, depth pooling,
projection, layout, validity). Each of those steps is also timed alone, and the shipped encoder is
timed against the package's unfused forward (:mod:`scripts.benchmarks.unfused`).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from scripts.benchmarks.markdown import joined, missing, table
from scripts.benchmarks.settings import demo_config
from scripts.benchmarks.timing import median_time, paired, ratio
from scripts.benchmarks.unfused import unfused_encoder
from scripts.benchmarks.values import rounded, significant


def phantom(shape: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A brain-like phantom: smooth texture inside an ellipsoid, 0 outside.

    Tokenization cost does not depend on the anatomy, so a phantom stands in for a real volume.

    Returns:
        ``(image [1, S, S, S] in [0, 1], ellipsoid mask [1, S, S, S])``, both float32.
    """
    gen = torch.Generator().manual_seed(seed)
    axis = (torch.arange(shape, dtype=torch.float32) + 0.5) / shape - 0.5
    x, y, z = torch.meshgrid(axis, axis, axis, indexing="ij")
    mask = (x / 0.40) ** 2 + (y / 0.46) ** 2 + (z / 0.38) ** 2 <= 1.0
    noise = torch.rand(1, 1, shape, shape, shape, generator=gen)
    texture = F.avg_pool3d(noise, 5, stride=1, padding=2)[0]
    texture = (texture - texture.min()) / (texture.max() - texture.min())
    image = torch.where(mask, 0.3 + 0.7 * texture, torch.zeros(()))
    return image.float(), mask[None].float()


def build_encoder(name: str, size: int, device: torch.device) -> torch.nn.Module:
    """The bundle's slice encoder ``name`` at input size ``size`` on ``device``."""
    from scripts.encoders import build_encoder as build

    return build(name, input_size=size).to(device)


@dataclass
class _Case:
    """One (volume size, R) case: the inputs of ``tokenize`` and the slabs it feeds the encoder."""

    encoder: torch.nn.Module
    inferer: object
    slicer: object
    volume: torch.Tensor
    mask: torch.Tensor
    spans: list[tuple[str, int, int]]  # (axis, first slice, stop) in tokenize's order
    slabs: list[torch.Tensor]

    def bare(self) -> list[list[torch.Tensor]]:
        with torch.inference_mode():
            return [self.encoder(x) for x in self.slabs]

    def full(self) -> object:
        return self.inferer.tokenize(self.volume, self.encoder, self.mask)


def _case(shape: int, size: int, device: torch.device, demo: dict) -> _Case:
    from scripts.inferer import CS3FInferer
    from scripts.transforms.tokenization import MultiAxisSlice, axis_index

    encoder = build_encoder(demo["encoder_name"], size, device)
    volume, mask = (t.to(device) for t in phantom(shape))
    inferer = CS3FInferer(
        axes=demo["axes"],
        q=demo["q"],
        d=demo["d"],
        delta=demo["delta"],
        slab_size=demo["slab_size"],
        token_dtype=demo["token_dtype"],
    )
    slicer = MultiAxisSlice(inferer.axes, size=encoder.input_size, mean=encoder.mean, std=encoder.std)
    spans = []  # exactly as CS3FInferer.tokenize iterates: whole depth groups of q slices per slab
    for axis in inferer.axes:
        q = inferer.q[axis]
        count = volume.shape[1 + axis_index(axis)]
        step = q * max(1, inferer.tokenizer.slab_size // q)
        spans += [(axis, s, min(s + step, count)) for s in range(0, count, step)]
    with torch.inference_mode():
        slabs = [slicer.slab(volume, a, s, e) for a, s, e in spans]
    return _Case(encoder, inferer, slicer, volume, mask, spans, slabs)


def _steps(case: _Case, feats: list[list[torch.Tensor]]) -> dict:
    """The non-encoder steps of ``tokenize`` as separate calls on the same data (name -> call)."""
    from scripts.transforms.tokenization import DepthPool, RandomProjection, TokenValidity

    inf = case.inferer
    pools = {axis: DepthPool(inf.q[axis], axis=axis) for axis in inf.axes}
    projections = {
        (axis, layer): RandomProjection(f.shape[1], inf.d, inf.seed, f"{axis}/{layer}")
        for (axis, _, _), fs in zip(case.spans, feats, strict=True)
        for layer, f in enumerate(fs)
    }
    grids = [f.shape[-1] for f in feats[0]]

    @torch.inference_mode()
    def slicing():
        return [case.slicer.slab(case.volume, a, s, e) for a, s, e in case.spans]

    @torch.inference_mode()
    def pool_only():
        for (axis, _, _), fs in zip(case.spans, feats, strict=True):
            for f in fs:
                pools[axis](f)

    @torch.inference_mode()
    def pool_project():
        for (axis, _, _), fs in zip(case.spans, feats, strict=True):
            for layer, f in enumerate(fs):
                t = projections[(axis, layer)](pools[axis](f))
                t.permute(0, 2, 3, 1).to(inf.token_dtype).contiguous()

    @torch.inference_mode()
    def validity():
        for axis in inf.axes:
            for g in grids:
                TokenValidity(axis, inf.q[axis], (g, g), inf.delta)(case.mask)

    return {
        "slicing (slab, resize, normalise)": slicing,
        "depth pooling + L2": pool_only,
        "pooling + projection + layout": pool_project,
        "validity (mask pooling)": validity,
    }


def _breakdown(case: _Case, feats: list, enc_s: float, tok_s: float, cfg: dict, device: torch.device) -> dict:
    """Where the overhead goes: each step timed alone, against the bare encoder time."""
    parts = {name: median_time(fn, device, cfg["repeats"], cfg["min_time"]) for name, fn in _steps(case, feats).items()}
    # Pooling alone is a part of "pooling + projection + layout": it is shown, not added.
    measured = sum(v for k, v in parts.items() if k != "depth pooling + L2")
    return {
        "parts": [
            {"step": k, "s": significant(v), "frac_of_encoder": significant(v / enc_s, 3)} for k, v in parts.items()
        ],
        "overhead_s": rounded(tok_s - enc_s, 3),
        "unattributed_s": rounded(tok_s - enc_s - measured, 3),
    }


def _whatif(case: _Case, feats: list, pairs: int, device: torch.device) -> list[dict]:
    """The shipped encoder against the package's unfused forward, same slabs, interleaved."""
    unfused = unfused_encoder(case.encoder)
    if unfused is None:
        return []
    ta, tv, before, _ = paired(lambda: [unfused(x) for x in case.slabs], case.bare, device, pairs, float("inf"))
    diff = max(
        float((a - b).abs().max() / a.abs().max())
        for slab_a, slab_b in zip(before, feats, strict=True)
        for a, b in zip(slab_a, slab_b, strict=True)
    )
    return [
        {
            "variant": "shipped (BN folded, symmetric pads in the conv, channels_last) vs unfused",
            "encoder_s": rounded(statistics.median(ta), 3),
            "variant_s": rounded(statistics.median(tv), 3),
            "speedup": rounded(ratio(ta, tv), 2),
            "max_rel_diff": significant(diff, 2),
        }
    ]


def tokenize_case(
    shape: int, size: int, pairs: int, whatif: bool, cfg: dict, device: torch.device, demo: dict
) -> tuple[dict, dict, list[dict]]:
    """One (volume size, R) case: ``(overhead row, breakdown, encoder what-if rows)``."""
    case = _case(shape, size, device, demo)
    tb, tf, feats, _ = paired(case.bare, case.full, device, pairs, time_budget=float("inf"))
    n_slices = sum(e - s for _, s, e in case.spans)
    enc_s, tok_s = statistics.median(tb), statistics.median(tf)
    where = {"volume": shape, "R": size}
    row = {
        **where,
        "slices": n_slices,
        "slab_size": case.inferer.tokenizer.slab_size,
        "encoder_s": rounded(enc_s, 3),
        "tokenize_s": rounded(tok_s, 3),
        "ms_per_slice_encoder": rounded(1000 * enc_s / n_slices, 2),
        "overhead": rounded(ratio(tf, tb) - 1.0, 3),
        "pairs": len(tb),
    }
    breakdown = {**where, "encoder_s": rounded(enc_s, 3), **_breakdown(case, feats, enc_s, tok_s, cfg, device)}
    variants = _whatif(case, feats, cfg.get("whatif_pairs", pairs), device) if whatif else []
    return row, breakdown, [{**where, **v} for v in variants]


def bench_tokenize(cfg: dict, device: torch.device) -> dict:
    """Bare encoder over exactly the slabs ``tokenize`` feeds it vs the full ``tokenize``, per case.

    Args:
        cfg: the mode's configuration: ``tokenize`` lists ``[volume size, R, interleaved pairs]``;
            the first ``whatif_cases`` cases also time the unfused encoder (``whatif_pairs`` pairs).
        device: where to encode.

    Returns:
        ``rows``, ``breakdown`` (one per case), ``encoder_whatif`` and the demo ``settings`` used.
    """
    demo = demo_config()
    rows, breakdowns, whatif = [], [], []
    for index, (shape, size, pairs) in enumerate(cfg["tokenize"]):
        row, breakdown, variants = tokenize_case(
            shape, size, pairs, index < cfg.get("whatif_cases", 1), cfg, device, demo
        )
        rows.append(row)
        breakdowns.append(breakdown)
        whatif += variants
    return {
        "rows": rows,
        "breakdown": breakdowns,
        "encoder_whatif": whatif,
        "settings": {k: demo[k] for k in ("q", "d", "slab_size", "token_dtype", "encoder_name")},
    }


def render(tok: dict | None) -> list[str]:
    """Markdown of section 5: overhead, its breakdown, and the encoder what-if."""
    md = ["## 5. Tokenization: bare encoder vs the full tokenize path", ""]
    if not tok or "rows" not in tok:
        return md + missing(tok)
    overhead = [
        [f"{r['volume']}^3", r["R"], r["slices"], r["encoder_s"], r["tokenize_s"], r["ms_per_slice_encoder"]]
        + [f"{r['overhead']:+.1%}", r["pairs"]]
        for r in tok["rows"]
    ]
    steps = [
        [f"{b['volume']}^3", b["R"], p["step"], p["s"], f"{p['frac_of_encoder']:.1%}"]
        for b in tok["breakdown"]
        for p in b["parts"]
    ]
    steps += [
        [f"{b['volume']}^3", b["R"], "total overhead (tokenize - bare)", b["overhead_s"], "-"] for b in tok["breakdown"]
    ]
    whatif = [
        [f"{w['volume']}^3", w["R"], w["variant"], w["encoder_s"], w["variant_s"], w["speedup"], w["max_rel_diff"]]
        for w in tok["encoder_whatif"]
    ]
    return md + [
        f"Settings of configs/inference.json ({joined(tok['settings'])}); bare = the encoder's forward over "
        "exactly the slabs `tokenize` feeds it (slices prepared beforehand); overhead = median of "
        "interleaved (tokenize / bare) - 1.",
        "",
        table(
            ["volume", "R", "slices", "encoder s", "tokenize s", "ms/slice (encoder)", "overhead", "pairs"], overhead
        ),
        "",
        "Where the overhead goes (each step timed alone on the same data, % of the bare encoder time):",
        "",
        table(["volume", "R", "step", "s", "% of encoder"], steps),
        "",
        "The shipped encoder against the package's forward (the package's own unfused modules with the "
        "same weights, NCHW), same slabs, interleaved; speedup = unfused time / shipped time; max rel "
        "diff = largest feature difference / largest feature, over every requested layer:",
        "",
        table(["volume", "R", "variant", "unfused s", "shipped s", "speedup", "max rel diff"], whatif),
        "",
    ]
