"""The README's composition example runs as written, and its commands match CI."""

from __future__ import annotations

import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_readme_composition_example_runs() -> None:
    block = README.split("<!-- readme-example: start -->")[1].split("<!-- readme-example: end -->")[0]
    code = re.search(r"```python\n(.*?)```", block, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own documentation
    assert namespace["tokens"].shape[:2] == (4, 128)
    assert namespace["maps"].shape == (4, 1, 32, 32, 32)
    assert namespace["scores"].shape == (4,)
    assert torch.isfinite(namespace["scores"]).all()


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    command = re.search(r"python -m pytest -q tests", README)
    assert command is not None
    assert "python3 -m pytest -q tests" in ci and "torch==2.13.0" in ci
