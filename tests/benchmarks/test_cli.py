"""The command line ``python -m scripts.benchmarks``: help of every command, and what each passes on."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest
from scripts.benchmarks import __main__ as cli
from scripts.benchmarks import harness, scaling
from scripts.benchmarks.c2f import bench_c2f
from scripts.benchmarks.c2f import main as c2f_main

ROOT = Path(__file__).resolve().parents[2]

HELP = {
    (): ["{run,c2f,scaling,quality,mixed,gpu}", "run", "c2f", "scaling", "quality", "mixed", "gpu"],
    ("mixed",): ["--B", "--N", "--cache", "--keys", "--repeats", "--threads", "--precision"],
    ("gpu",): ["--B", "--size", "--variants", "--tiny", "--workers", "--score_precision", "--doc"],
    ("quality",): ["--out", "--cohorts", "--variants", "--quick", "--doc", "--maps", "--smooth"],
    ("run",): ["--quick", "--device", "--out", "--sections", "--threads", "--memory_b", "--doc"],
    ("c2f",): ["--B", "--n_coarse", "--Ls", "--tokens", "--cache", "--key"],
    ("scaling",): ["metrics", "costs"],
    ("scaling", "metrics"): ["--cohort", "--out", "--cache", "--settings", "--threads"],
    ("scaling", "costs"): ["--bank", "--sizes", "--settings", "--threads"],
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


def test_c2f_help_defaults_are_bench_c2fs() -> None:
    params = inspect.signature(bench_c2f).parameters
    for name, value in cli.C2F_DEFAULTS.items():
        default = params[name].default
        assert (tuple(default) if name == "Ls" else default) == value, name
    assert inspect.signature(c2f_main).parameters["key"].default == cli.C2F_KEY


def test_run_passes_the_options_and_writes_no_tracked_doc_by_default(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(harness, "run_bench", lambda **kw: calls.append(kw) or {"targets": []})
    assert cli.main(["run", "--quick"]) == 0
    assert calls[-1] == {
        "quick": True,
        "device": "cpu",
        "out": "bench_out",
        "sections": None,
        "threads": None,
        "memory_b": None,
        "doc": None,
    }
    cli.main(["run", "--sections", "gemm,c2f", "--memory-b", "3", "--doc", "docs/performance.md"])
    assert calls[-1]["sections"] == "gemm,c2f" and calls[-1]["memory_b"] == 3
    assert calls[-1]["doc"] == "docs/performance.md"


def test_scaling_passes_the_options(monkeypatch) -> None:
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


def test_c2f_command_runs_bench_c2f(capsys) -> None:
    # L = N_c routes to every coarse token: the exhaustive search, so every nearest token matches.
    argv = ["c2f", "--B", "3", "--n_coarse", "8", "--h", "2", "--d", "4", "--Ls", "[1,8]", "--query_volumes", "all"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "Eq.9" in out and '"query_volumes_timed": 3' in out
    assert '"nn_match": 1.0' in out


def test_unknown_sections_are_refused() -> None:
    assert harness.parse_sections(" gemm, profile ") == ["gemm", "profile"]
    assert harness.parse_sections(None) == list(harness.SECTIONS)
    with pytest.raises(ValueError, match="unknown sections"):
        harness.parse_sections("gemm,speed")
