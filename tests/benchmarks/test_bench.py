"""Smoke test of the benchmark harness (scripts/benchmarks/bench.py) in quick mode: every section and
figure is produced, and the MuSc-style baseline agrees with the exact scorer. No speed is asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from scripts.benchmarks.bench import SECTIONS, musc_baseline, prototype_scores, run_bench, synthetic_bank
from scripts.scoring import mutual_similarity_scores


def test_baseline_and_prototypes_match_the_exact_scorer() -> None:
    tokens, valid = synthetic_bank(5, 96, 16, invalid=0.3, seed=3)
    exact = mutual_similarity_scores(tokens, valid, rho=0.5)
    assert (musc_baseline(tokens, valid, rho=0.5) - exact).abs().max() < 1e-4
    for form in ("baddbmm", "addmm", "augmented"):
        for pack in (False, True):
            proto = prototype_scores(tokens, valid, 0.5, torch.float32, 32, 1 << 12, None, form, pack)
            assert (proto - exact).abs().max() < 1e-4, (form, pack)
    assert torch.all(exact[~valid] == 0)


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("bench")
    doc = out / "performance.md"
    res = run_bench(quick=True, out=out, doc=doc, verbose=False)
    return res, doc


@pytest.mark.slow
def test_quick_run_produces_every_section(quick) -> None:
    res, doc = quick
    on_disk = json.loads((doc.parent / "bench.json").read_text())
    assert on_disk["meta"]["sections"] == list(SECTIONS)
    for key in ("machine", "targets", *SECTIONS):
        assert key in on_disk, key
    machine = on_disk["machine"]
    for key in ("cpu_model", "logical_cpus", "torch_threads", "blas", "build", "torch"):
        assert machine[key] not in (None, ""), key

    gemm = on_disk["gemm"]
    assert {r["dtype"] for r in gemm["rows"]} >= {"float32", "bfloat16"}
    assert all(r["gflops"] > 0 for r in gemm["rows"])

    rows = on_disk["scoring"]["rows"]
    assert {r["invalid"] for r in rows} == {0.0, 0.3}
    for r in rows:
        for key in ("gflops", "frac_roofline", "scorer_s", "baseline_s", "speedup_vs_baseline"):
            assert r[key] is not None and r[key] > 0, (key, r)
        assert r["max_abs_diff"] < 1e-4  # correctness, not speed
    assert on_disk["baseline"]["max_abs_diff"] < 1e-4

    c2f = on_disk["c2f"]
    assert "available" in c2f and ("result" in c2f or "note" in c2f or "error" in c2f)

    tok = on_disk["tokenize"]
    assert tok["rows"] and all(r["overhead"] is not None for r in tok["rows"])
    assert tok["breakdown"][0]["parts"] and tok["encoder_whatif"]
    assert all(w["max_rel_diff"] < 1e-3 for w in tok["encoder_whatif"])  # variants compute the same

    mem = on_disk["memory"]
    assert len(mem["runs"]) == 2 and all(r["peak_rss_mb"] > 0 and r["bank_mb"] > 0 for r in mem["runs"])
    assert mem["bank_growth_mb"] > 0 and mem["runs"][1]["encoded_volumes"] == mem["runs"][1]["n_volumes"]

    e2e = on_disk["e2e"]["rows"]
    assert all(set(r) >= {"load", "tokenize", "score", "write", "total"} for r in e2e)

    prof = on_disk["profile"]
    assert prof["scoring_ops"] and all(prof["scoring_ops"].values()) and prof["encoder_ops"]
    assert len(prof["variants"]) >= 5
    if torch.get_num_threads() > 1:
        assert prof["threads"] and prof["threads"][0]["speedup_1thread"] > 0
    assert prof["real_tokens_check"]["max_abs_diff_baseline"] < 1e-4
    for v in prof["variants"]:
        if "bf16" not in v["variant"] and "fp16" not in v["variant"]:  # exact variants stay exact
            assert v["max_abs_diff_random"] < 1e-4 and v["max_abs_diff_real"] < 1e-4

    targets = on_disk["targets"]
    assert len(targets) == 4 and all(isinstance(t["met"], bool) for t in targets)


@pytest.mark.slow
def test_quick_run_renders_the_tables(quick) -> None:
    _, doc = quick
    text = doc.read_text()
    for heading in (
        "## Machine",
        "## 1. GEMM roofline",
        "## 2-3. Exact scoring",
        "## 4. C2F",
        "## 5. Tokenization",
        "## 6. Peak memory",
        "## 7. End to end",
        "## 8. Profiles",
        "## Targets",
    ):
        assert heading in text, heading
    assert text.count("|---|") >= 10  # one markdown table per figure
    assert "not run" not in text
    # Re-rendering keeps hand-written text outside the generated block.
    from scripts.benchmarks.bench import write_markdown

    doc.write_text(doc.read_text() + "\n## Analysis\nkept\n")
    write_markdown(json.loads((doc.parent / "bench.json").read_text()), doc)
    assert doc.read_text().count("## Analysis\nkept") == 1 and doc.read_text().count("## Machine") == 1
