"""The command line ``python -m scripts.benchmarks``: help of every command, and what each passes on."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest
from scripts.benchmarks import __main__ as cli
from scripts.benchmarks import performance, quality, registration_accuracy, scaling

ROOT = Path(__file__).resolve().parents[2]

HELP = {
    (): ["{quality,performance,scaling,gpu,registration}", "quality", "performance", "scaling", "gpu"],
    ("quality",): ["--out", "--cohorts", "--variants", "--quick", "--doc"],
    ("performance",): ["--quick", "--device", "--out", "--sections", "--threads", "--cache", "--memory_b", "--doc"],
    ("gpu",): ["--B", "--size", "--variants", "--tiny", "--workers", "--score_precision", "--doc", "--render"],
    ("scaling",): ["metrics", "costs", "threads"],
    ("scaling", "metrics"): ["--cohort", "--out", "--cache", "--settings", "--threads"],
    ("scaling", "costs"): ["--bank", "--sizes", "--settings", "--threads"],
    ("scaling", "threads"): ["--out", "--volumes", "--size", "--image_size", "--settings", "--rounds", "--busy"],
    ("registration",): ["--out", "--threads", "--limit", "--bundle", "--sections", "--libraries"],
}


def _module(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "scripts.benchmarks", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("command", list(HELP))
def test_help_prints_usage_and_exits_0(command: tuple[str, ...]) -> None:
    proc = _module(*command, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python -m scripts.benchmarks" + "".join(f" {c}" for c in command))
    for option in HELP[command]:
        assert option in proc.stdout, option


def test_no_command_is_an_error() -> None:
    proc = _module()
    assert proc.returncode == 2 and "required" in proc.stderr


def test_the_parser_lists_the_performance_sections() -> None:
    assert cli.PERFORMANCE_SECTIONS == performance.SECTIONS


def test_performance_passes_the_options(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    defaults = {k: p.default for k, p in inspect.signature(performance.run_performance).parameters.items()}
    monkeypatch.setattr(performance, "run_performance", lambda **kw: calls.append(kw))
    assert cli.main(["performance", "--quick"]) == 0
    assert calls[-1] == {k: v for k, v in {**defaults, "quick": True}.items() if k != "verbose"}
    cli.main(["performance", "--sections", "scoring, c2f", "--memory_b", "3", "--doc", "docs/performance.md"])
    assert calls[-1]["sections"] == ["scoring", "c2f"] and calls[-1]["memory_b"] == 3
    assert calls[-1]["doc"] == "docs/performance.md"


def test_quality_passes_the_options(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(quality, "run_quality", lambda **kw: calls.append(kw))
    cli.main(["quality", "--quick", "--variants", "default,paper", "--cohorts", "t1-tiny"])
    assert calls[-1] == {
        "out": "bench_out/quality",
        "cohorts": ["t1-tiny"],
        "variants": ["default", "paper"],
        "quick": True,
        "doc": None,
        "cohort_set": "study",
    }
    cli.main(["quality", "--set", "sealed", "--out", "bench_out/sealed"])
    assert calls[-1]["cohort_set"] == "sealed" and calls[-1]["out"] == "bench_out/sealed"


def test_scaling_passes_the_options(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    defaults = {k: p.default for k, p in inspect.signature(scaling.costs).parameters.items() if k != "bank"}
    monkeypatch.setattr(scaling, "costs", lambda **kw: calls.append(("costs", kw)))
    monkeypatch.setattr(scaling, "metrics", lambda **kw: calls.append(("metrics", kw)))
    cli.main(["scaling", "costs", "--bank", "B"])
    assert calls[-1] == ("costs", {"bank": "B", **defaults})
    cli.main(["scaling", "metrics", "--cohort", "C", "--out", "O", "--settings", "full,chunks:8"])
    assert calls[-1] == (
        "metrics",
        {"cohort": "C", "out": "O", "cache": None, "settings": "full,chunks:8", "threads": 1},
    )


def test_registration_passes_libraries_and_a_missing_library_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls = []
    monkeypatch.setattr(registration_accuracy, "main", lambda **kw: calls.append(kw))
    cli.main(["registration", "--libraries", "2", "--sections", "none"])
    assert calls[-1]["libraries"] == 2 and calls[-1]["sections"] == "none"
    for module in ("itk", "ants"):  # not installed here; made unimportable where they are
        monkeypatch.setitem(sys.modules, module, None)
    # skipped before any volume is read: the cohort folder need not exist
    out = registration_accuracy.libraries_section(tmp_path / "none", 2, 1, names=("itk-elastix", "antspyx"))
    assert list(out) == ["itk-elastix", "antspyx"] and all(list(v) == ["skipped"] for v in out.values())
    assert out["itk-elastix"]["skipped"].startswith("itk-elastix is not installed (")
    assert out["antspyx"]["skipped"].endswith("pip install antspyx==0.6.3 to compare it")
    assert "| library itk-elastix |" in registration_accuracy.markdown({"libraries": out})
