"""``python -m scripts.benchmarks performance``: the reference scorers it times against, C2F's agreement
figures, and its fast sections run end to end at toy sizes (no speed is asserted)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from scripts.benchmarks.performance import (
    QUICK,
    bench_memory,
    effective_flops,
    musc_baseline,
    run_performance,
    synthetic_bank,
)
from scripts.benchmarks.performance_c2f import bench_c2f, cache_c2f_bank, theoretical_speedup
from scripts.benchmarks.performance_report import BEGIN, END
from scripts.benchmarks.tables import splice_block, table, write_block
from scripts.scoring import mutual_similarity_scores

ROOT = Path(__file__).resolve().parents[2]
TRACKED = ROOT / "docs" / "performance.md"


def brute_force(tokens: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
    """Eq. 1-2 in float64: per token the nearest valid token of every other volume, mean of the k smallest."""
    b, n, d = tokens.shape
    flat = tokens.reshape(b * n, d).double()
    dist = torch.cdist(flat, flat)
    dist[:, ~valid.reshape(-1)] = math.inf
    per_volume = dist.view(b * n, b, n).min(dim=2).values
    per_volume[torch.arange(b * n), torch.arange(b).repeat_interleave(n)] = math.inf
    scores = per_volume.sort(dim=1).values[:, :k].mean(dim=1)
    scores[~valid.reshape(-1)] = 0.0
    return scores.view(b, n).float()


@pytest.mark.parametrize(("b", "rho", "k"), [(5, 0.5, 2), (6, 0.1, 1), (9, 0.4, 3)])
def test_the_baseline_computes_the_exact_scores(b: int, rho: float, k: int) -> None:
    tokens, valid = synthetic_bank(b, 48, 16, invalid=0.3, seed=3)
    expected = brute_force(tokens, valid, k)
    assert (brute_force(tokens, valid, k + 1) - expected).abs().max() > 1e-3  # the check can fail
    assert (musc_baseline(tokens, valid, rho) - expected).abs().max() < 1e-4
    assert (mutual_similarity_scores(tokens, valid, rho) - expected).abs().max() < 1e-4
    subset = musc_baseline(tokens, valid, rho, volumes=[1, 3])
    assert (subset[[1, 3]] - expected[[1, 3]]).abs().max() < 1e-4 and torch.all(subset[[0, 2]] == 0)


def test_synthetic_bank_and_flop_count() -> None:
    tokens, valid = synthetic_bank(4, 2000, 8, invalid=0.3, seed=1)
    assert torch.allclose(tokens.norm(dim=-1), torch.ones(4, 2000), atol=1e-5)
    assert valid[:, 0].all() and abs(1 - valid.float().mean().item() - 0.3) < 0.02
    assert synthetic_bank(2, 4, 3)[1] is None
    assert effective_flops([2, 3, 1], 4, [0]) == 2 * 2 * (3 + 1) * 4


def test_c2f_routing_to_every_coarse_token_is_the_exhaustive_search() -> None:
    result = bench_c2f(B=4, n_coarse=16, h=2, d=8, Ls=(1, 16), tokens="structured")
    assert result["params"]["query_volumes_timed"] == 2 and result["exhaustive_s"] > 0
    short, full = result["runs"]
    assert short["eq9"] == pytest.approx(theoretical_speedup(2, 1, 16), rel=1e-3) and short["score_excess"] >= -1e-4
    assert full["spearman"] > 0.9999 and abs(full["score_excess"]) < 1e-4


def test_c2f_reads_an_ms_runs_token_cache(tmp_path: Path) -> None:
    from scripts.inferer import CS3FInferer
    from tests.helpers import TinyEncoder

    inferer = CS3FInferer(axes=["axial"], q=4, q_fine=2, variant="MS", d=8)
    for i in range(3):
        tokens = inferer.tokenize(torch.rand(1, 8, 8, 8), TinyEncoder(32))
        torch.save({"grids": {k: (g.tokens, g.valid) for k, g in tokens.grids.items()}}, tmp_path / f"s-{i}.pt")
    coarse, fine, coarse_valid, fine_valid = cache_c2f_bank(tmp_path, "axial/1")
    assert coarse.shape == (3, 2 * 4 * 4, 8) and fine.shape == (3, 32, 2, 8) and fine_valid.all()
    assert torch.equal(coarse[2, 21], tokens.grids["axial/1"].tokens[1, 1, 1])
    assert torch.equal(fine[2, 21, 1], tokens.grids["axial/1/fine"].tokens[3, 1, 1])
    result = bench_c2f(Ls=(32,), bank=(coarse, fine, coarse_valid, fine_valid), query_volumes=None)
    assert result["params"]["tokens"] == "real" and result["runs"][0]["spearman"] > 0.9999


def test_quick_sections_run_and_render_without_touching_the_tracked_doc(tmp_path: Path) -> None:
    before = hashlib.sha256(TRACKED.read_bytes()).hexdigest()
    res = run_performance(quick=True, out=tmp_path, sections=["scoring", "c2f", "tokenize"], verbose=False)
    assert hashlib.sha256(TRACKED.read_bytes()).hexdigest() == before
    assert "errors" not in res["meta"], res["meta"].get("errors")
    assert json.loads((tmp_path / "performance.json").read_text()) == res
    for row in res["scoring"]["rows"]:
        assert row["diff_baseline"] < 1e-4 and row["frac_roofline"] > 0
    assert [r["params"]["tokens"] for r in res["c2f"]] == ["random", "structured"]
    assert res["tokenize"]["rows"][0]["encoder_s"] > 0
    assert len(res["targets"]) == 3 and all(isinstance(t["met"], bool) for t in res["targets"])
    text = (tmp_path / "performance.md").read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1 and "failed:" not in text
    assert "## Peak memory" in text and "not run" in text  # the section not chosen
    (tmp_path / "notes.md").write_text("# Notes\n")
    with pytest.raises(ValueError, match="markers"):
        run_performance(quick=True, out=tmp_path / "x", sections=["c2f"], doc=tmp_path / "notes.md", verbose=False)
    with pytest.raises(ValueError, match="unknown sections"):
        run_performance(sections=["gemm"], out=tmp_path / "x")


@pytest.mark.slow
def test_memory_section_runs_the_bundle_at_b_and_2b(tmp_path: Path) -> None:
    mem = bench_memory(QUICK, torch.device("cpu"), tmp_path)
    encoded = [r for r in mem["runs"] if r["tokens"] == "encoded"]
    cached = [r for r in mem["runs"] if r["tokens"] == "from cache"]
    assert [r["B"] for r in encoded] == [2, 4] and all(r["peak_rss_mb"] > 0 for r in encoded)
    assert [r["encoded_volumes"] for r in cached] == [0, 0]  # the re-runs read the caches
    assert mem["encoded"]["bank_growth_mb"] > 0 and [r["B"] for r in mem["e2e"]] == [2, 4]


def test_tables_and_generated_blocks(tmp_path: Path) -> None:
    got = table(["a", "b", "c"], [[1, 0.123456, None], [True, 2e-5, "x"]])
    assert got.splitlines() == ["| a | b | c |", "|---|---|---|", "| 1 | 0.1235 | - |", "| yes | 2.00e-05 | x |"]
    doc = tmp_path / "quality.md"
    doc.write_text("# Quality\n\nanalysis\n")
    write_block(doc, "<!-- A -->", "<!-- /A -->", "a1")
    write_block(doc, "<!-- B -->", "<!-- /B -->", "b1")
    write_block(doc, "<!-- A -->", "<!-- /A -->", "a2")
    assert doc.read_text() == "# Quality\n\nanalysis\n\n<!-- A -->\na2\n<!-- /A -->\n\n<!-- B -->\nb1\n<!-- /B -->\n"
    assert splice_block("<!-- /A --> then <!-- A -->", "<!-- A -->", "<!-- /A -->", "x") is None
