"""The README's composition example runs as written, and its commands match CI."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT

README = (ROOT / "README.md").read_text()


def test_readme_composition_example_runs_from_outside_the_bundle(tmp_path: Path) -> None:
    """The example as a script in another folder, with the bundle folder where it says "/path/to/cs3f"."""
    block = README.split("<!-- readme-example: start -->")[1].split("<!-- readme-example: end -->")[0]
    code = re.search(r"```python\n(.*?)```", block, re.S).group(1)
    assert '"/path/to/cs3f"' in code
    script = tmp_path / "example.py"
    checks = """
assert tokens.shape[:2] == (4, 128)
assert maps.shape == (4, 1, 32, 32, 32)
assert scores.shape == (4,) and torch.isfinite(scores).all()
print("ok")
"""
    script.write_text(code.replace('"/path/to/cs3f"', repr(str(ROOT))) + checks)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing but the example finds scripts
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def _commands(script: str) -> list[list[str]]:
    """The commands of a shell script (comments dropped, ``&&`` chains split), as argument lists."""
    commands = []
    for line in script.replace("\\\n", " ").splitlines():
        line = line.split(" #")[0].strip()
        if line and not line.startswith("#"):
            commands += [shlex.split(part) for part in line.split("&&")]
    return commands


def _normalised(command: list[str]) -> list[str]:
    """``python3``/``python`` and ``pip``/``python -m pip`` alike, pip's quiet flag dropped."""
    command = ["python" if c in ("python", "python3") else c for c in command]
    if command[:3] == ["python", "-m", "pip"]:
        command = ["pip", *command[3:]]
    if command[:1] == ["pip"]:
        command = [c for c in command if c != "-q"]
    return command


def _installs(commands: list[list[str]]) -> set[str]:
    """What the ``pip install`` commands install: requirement specs, with ``-r`` files expanded."""
    specs: set[str] = set()

    def add_file(name: str) -> None:
        for line in _commands((ROOT / name).read_text()):
            if line[0] == "-r":
                add_file(line[1])
            else:
                specs.add(" ".join(line))

    for command in commands:
        if command[:2] != ["pip", "install"]:
            continue
        args = iter(command[2:])
        for arg in args:
            if arg == "-r":
                add_file(next(args))
            else:
                specs.add(arg)
    return specs


def test_ci_runs_the_readme_commands() -> None:
    """.ci/run installs what the README's quick start installs and ends with its test command."""
    quick_start = README.split("## Quick start")[1].split("```bash")[1].split("```")[0]
    readme = [_normalised(c) for c in _commands(quick_start)]
    ci_script = (ROOT / ".ci" / "run").read_text()
    ci = [_normalised(c) for c in _commands(ci_script)]
    readme_tests = [c for c in readme if "pytest" in c]
    assert readme_tests == [["python", "-m", "pytest", "-q", "tests"]], readme_tests
    assert ci[-1] == readme_tests[0]  # the last command: its exit status is the script's
    assert any(c[0] == "set" and c[1].startswith("-") and "e" in c[1] for c in ci)  # stops on a failure
    assert _installs(readme) == _installs(ci) and "torch==2.13.0" in _installs(ci)
