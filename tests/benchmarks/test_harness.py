"""The harness in quick mode, run as users run it (``python -m scripts.benchmarks run --quick``): every
section measured without error, every table rendered, and the tracked docs/performance.md untouched.
No speed is asserted."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from scripts.benchmarks.harness import run_bench
from scripts.benchmarks.markdown import table
from scripts.benchmarks.report import BEGIN, END, check_doc, write_markdown
from scripts.benchmarks.settings import SECTIONS

ROOT = Path(__file__).resolve().parents[2]
TRACKED = ROOT / "docs" / "performance.md"

HEADINGS = (
    "## Machine",
    "## 1. GEMM roofline",
    "## 2-3. Exact scoring",
    "## 2b. Mixed-precision scoring",
    "## 4. C2F",
    "## 5. Tokenization",
    "## 6. Peak memory",
    "## 7. End to end",
    "## 8. Profiles",
    "## Targets",
)


def _fingerprint(path: Path) -> tuple[str, int]:
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[dict, Path, tuple[str, int]]:
    out = tmp_path_factory.mktemp("bench")
    before = _fingerprint(TRACKED)
    proc = subprocess.run(
        [sys.executable, "-m", "scripts.benchmarks", "run", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "bench.json").read_text()), out, before


@pytest.mark.slow
def test_quick_run_reports_no_error_and_leaves_the_tracked_doc_alone(quick) -> None:
    res, out, before = quick
    assert _fingerprint(TRACKED) == before
    assert (out / "performance.md").is_file()
    assert res["meta"]["sections"] == list(SECTIONS)
    assert "errors" not in res["meta"], res["meta"].get("errors")
    for name in SECTIONS:
        assert isinstance(res[name], dict) and res[name], name
        assert not {"error", "not_run"} & set(res[name]), (name, res[name])
    assert res["meta"]["command"] == "python -m scripts.benchmarks run --quick"  # --out is not recorded


@pytest.mark.slow
def test_quick_run_produces_every_figure(quick) -> None:
    res = quick[0]
    for key in ("cpu_model", "logical_cpus", "torch_threads", "blas", "build", "torch"):
        assert res["machine"][key] not in (None, ""), key
    assert {r["dtype"] for r in res["gemm"]["rows"]} >= {"float32", "bfloat16"}
    assert all(r["gflops"] > 0 for r in res["gemm"]["rows"])

    rows = res["scoring"]["rows"]
    assert {r["invalid"] for r in rows} == {0.0, 0.3}
    for r in rows:
        for key in ("gflops", "frac_roofline", "scorer_s", "baseline_s", "speedup_vs_baseline"):
            assert r[key] is not None and r[key] > 0, (key, r)
        assert r["max_abs_diff"] < 1e-4  # correctness, not speed
        assert r["mixed_s"] > 0 and r["max_abs_diff_mixed"] <= 1e-5
    assert res["baseline"]["max_abs_diff"] < 1e-4

    mixed = res["mixed"]["rows"]
    assert mixed[0]["case"] == "random unit tokens" and any(r["case"].startswith("real") for r in mixed)
    assert all(r["max_abs_diff_mixed_fp32"] <= 1e-5 and r["baseline_over_mixed"] > 0 for r in mixed)

    for key, kind in (("result", "random"), ("result_structured", "structured")):
        c2f = res["c2f"][key]
        assert c2f["params"]["tokens"] == kind and [r["L"] for r in c2f["runs"]] == [2, 8]

    tok = res["tokenize"]
    assert tok["rows"] and all(r["overhead"] is not None for r in tok["rows"])
    assert tok["breakdown"][0]["parts"] and tok["encoder_whatif"]
    assert all(w["max_rel_diff"] < 1e-3 for w in tok["encoder_whatif"])  # both forms compute the same

    mem = res["memory"]
    assert len(mem["runs"]) == 2 and all(r["peak_rss_mb"] > 0 and r["bank_mb"] > 0 for r in mem["runs"])
    assert mem["bank_growth_mb"] > 0 and mem["runs"][1]["encoded_volumes"] == mem["runs"][1]["n_volumes"]
    assert [r["encoded_volumes"] for r in mem["runs_cached"]] == [0, 0]  # the re-runs read the caches
    assert all(set(r) >= {"load", "tokenize", "score", "write", "total"} for r in res["e2e"]["rows"])

    prof = res["profile"]
    assert prof["scoring_ops"] and all(prof["scoring_ops"].values()) and prof["encoder_ops"]
    assert len(prof["variants"]) >= 5
    if torch.get_num_threads() > 1:
        assert prof["threads"] and prof["threads"][0]["speedup_1thread"] > 0
    assert prof["real_tokens_check"]["max_abs_diff_baseline"] < 1e-4
    for v in prof["variants"]:
        if "bf16" not in v["variant"] and "fp16" not in v["variant"]:  # exact variants stay exact
            assert v["max_abs_diff_random"] < 1e-4 and v["max_abs_diff_real"] < 1e-4

    assert len(res["targets"]) == 6 and all(isinstance(t["met"], bool) for t in res["targets"])


@pytest.mark.slow
def test_quick_run_renders_every_table(quick) -> None:
    res, out, _ = quick
    doc = out / "performance.md"
    text = doc.read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    for heading in HEADINGS:
        assert heading in text, heading
    assert "not run" not in text and "failed:" not in text
    assert text.count("|---|") >= 14  # one markdown table per figure
    # Re-rendering keeps hand-written text outside the generated block.
    doc.write_text(text + "\n## Analysis\nkept\n")
    write_markdown(res, doc)
    again = doc.read_text()
    assert again.count("## Analysis\nkept") == 1 and again.count("## Machine") == 1


def test_default_run_writes_its_report_under_out_not_into_docs(tmp_path: Path) -> None:
    before = _fingerprint(TRACKED)
    tiny = {"gemm_n": [64], "tile": 32, "repeats": 1, "min_time": 0.0}
    res = run_bench(quick=True, sections="gemm", out=tmp_path, overrides=tiny, verbose=False)
    assert _fingerprint(TRACKED) == before
    text = (tmp_path / "performance.md").read_text()
    assert "## 1. GEMM roofline" in text and "| mm [tile,d]x[d,N] | 64 |" in text
    assert json.loads((tmp_path / "bench.json").read_text()) == res
    # Sections not selected are rendered as such, and evaluate no target.
    assert res["scoring"] == {"not_run": "not selected"} and res["targets"] == []
    assert "## 5. Tokenization: bare encoder vs the full tokenize path\n\nnot run" in text


def test_a_doc_without_markers_is_never_overwritten(tmp_path: Path) -> None:
    doc = tmp_path / "notes.md"
    doc.write_text("# Notes\n")
    with pytest.raises(ValueError, match="markers"):
        run_bench(quick=True, sections="gemm", out=tmp_path / "out", doc=doc, verbose=False)
    assert doc.read_text() == "# Notes\n" and not (tmp_path / "out").exists()
    check_doc(tmp_path / "absent.md")  # a new file is fine


def test_table_formats_every_cell() -> None:
    got = table(["a", "b", "c"], [[1, 0.123456, None], [True, 2e-5, "x"], [False, 123456.0, 0.0]])
    assert got.splitlines() == [
        "| a | b | c |",
        "|---|---|---|",
        "| 1 | 0.1235 | - |",
        "| yes | 2.00e-05 | x |",
        "| no | 1.23e+05 | 0 |",
    ]


def test_write_block_keeps_the_text_and_the_other_blocks(tmp_path: Path) -> None:
    from scripts.benchmarks.markdown import splice_block, write_block

    doc = tmp_path / "quality.md"
    doc.write_text("# Quality\n\nanalysis\n")
    write_block(doc, "<!-- A -->", "<!-- /A -->", "a1")
    write_block(doc, "<!-- B -->", "<!-- /B -->", "b1")
    write_block(doc, "<!-- A -->", "<!-- /A -->", "a2")
    text = doc.read_text()
    assert text == "# Quality\n\nanalysis\n\n<!-- A -->\na2\n<!-- /A -->\n\n<!-- B -->\nb1\n<!-- /B -->\n"
    new = tmp_path / "sub" / "new.md"
    write_block(new, "<!-- A -->", "<!-- /A -->", "a", head="# New\n")
    assert new.read_text() == "# New\n\n<!-- A -->\na\n<!-- /A -->\n"  # folder and head made once
    assert splice_block("no markers", "<!-- A -->", "<!-- /A -->", "x") is None
    assert splice_block("<!-- /A --> then <!-- A -->", "<!-- A -->", "<!-- /A -->", "x") is None  # end before begin
