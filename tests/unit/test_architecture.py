"""The layering of ``scripts/``: imports flow one way, no cycles, tools stay outside the runtime."""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"

# Rank of each module prefix: a module may import modules of its own rank or lower only.
LAYERS = {
    "scripts.errors": 0,
    "scripts.digest": 0,
    "scripts.threads": 0,
    "scripts.progress": 0,
    "scripts.transforms": 1,
    "scripts.encoders": 1,
    "scripts.scoring": 1,
    "scripts.tokens": 2,
    "scripts.scoring.scorer": 2,  # reads scripts.tokens' containers; the rest of the package is pure tensor code
    "scripts.anomaly_map": 2,
    "scripts.inferer": 3,
    "scripts.storage": 4,
    "scripts.evaluation": 4,
    "scripts.engine": 5,
    "scripts.synthetic": 6,
    "scripts.benchmarks": 6,
    "scripts.__main__": 7,
    "scripts": 7,  # the package itself
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


@functools.cache
def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in SCRIPTS.rglob("*.py")}


@functools.cache
def _tree(path: Path) -> ast.Module:
    """The syntax tree of ``path``, parsed once for all the checks."""
    return ast.parse(path.read_text())


def _imports(path: Path, name: str) -> set[str]:
    """Every ``scripts``/``tests`` module that ``path`` imports, at any depth of the file: function-level
    imports and those for type checkers only (``if TYPE_CHECKING:``) count too, since they tie the
    modules together just the same."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {m for m in found if m.split(".")[0] in ("scripts", "tests")}


def _rank(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


@functools.cache
def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {m for m in _imports(path, name) if m in modules and m != name} for name, path in modules.items()}


def _same_file_names(paths: list[Path]) -> dict[str, list[str]]:
    """File names that more than one of ``paths`` carries (``__init__.py`` and ``__main__.py`` aside)."""
    by_name: dict[str, list[str]] = {}
    for path in paths:
        if path.name not in ("__init__.py", "__main__.py"):
            by_name.setdefault(path.name, []).append(path.as_posix())
    return {name: sorted(where) for name, where in by_name.items() if len(where) > 1}


def test_module_file_names_are_unique() -> None:
    """No two modules of ``scripts/`` share a file name: ``lung.py`` alone must say which one it is."""
    clashes = _same_file_names([p.relative_to(ROOT) for p in SCRIPTS.rglob("*.py")])
    assert not clashes, f"modules sharing a file name: {clashes}"


def test_the_file_name_check_sees_a_clash() -> None:
    paths = [Path("scripts/tokens.py"), Path("scripts/engine/tokens.py"), Path("scripts/engine/__init__.py")]
    paths += [Path("scripts/__init__.py"), Path("scripts/__main__.py"), Path("scripts/benchmarks/__main__.py")]
    assert _same_file_names(paths) == {"tokens.py": ["scripts/engine/tokens.py", "scripts/tokens.py"]}


def test_every_module_has_a_layer() -> None:
    unplaced = [m for m in _modules() if not any(m == p or m.startswith(p + ".") for p in LAYERS)]
    assert not unplaced


@pytest.mark.parametrize("name", sorted(_modules()))
def test_imports_flow_downward(name: str) -> None:
    upward = [m for m in _graph()[name] if _rank(m) > _rank(name)]
    assert not upward, f"{name} (layer {_rank(name)}) imports higher layers: {upward}"


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (``[a, b, ..., a]``), or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise _Found([*path[path.index(nxt) :], nxt])
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    try:
        for node in sorted(graph):
            if node not in state:
                visit(node, [node])
    except _Found as found:
        return found.path
    return None


class _Found(Exception):  # noqa: N818 - a search result, not an error
    def __init__(self, path: list[str]) -> None:
        super().__init__(" -> ".join(path))
        self.path = path


def test_no_import_cycles() -> None:
    """No cycle anywhere, among the packages or among the modules of one package (e.g. inside engine/)."""
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_sees_a_cycle_inside_a_package() -> None:
    graph = {"scripts.engine.a": {"scripts.engine.b"}, "scripts.engine.b": {"scripts.engine.a"}, "scripts.x": set()}
    assert _cycle(graph) == ["scripts.engine.a", "scripts.engine.b", "scripts.engine.a"]
    assert _cycle({"scripts.engine.a": {"scripts.engine.b"}, "scripts.engine.b": set()}) is None


def test_tools_stay_outside_the_runtime() -> None:
    for name, path in _modules().items():
        imported = _imports(path, name)
        assert not any(m.split(".")[0] == "tests" for m in imported), f"{name} imports tests"
        if not name.startswith("scripts.benchmarks"):
            assert not any(m.startswith("scripts.benchmarks") for m in imported), f"{name} imports benchmarks"


def test_the_checks_see_a_violation(tmp_path: Path) -> None:
    """The import scanner finds function-level and relative imports (what an upward import hides in)."""
    source = tmp_path / "probe.py"
    source.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from scripts.inferer import CS3FInferer\n"
        "def f():\n    from scripts.engine import evaluator\n    from . import tokens\n"
    )
    found = _imports(source, "scripts.probe")
    assert {"scripts.engine", "scripts.engine.evaluator", "scripts.tokens", "scripts.inferer"} <= found
    assert _rank("scripts.engine.evaluator") > _rank("scripts.inferer")


def _definitions() -> list[tuple[str, ast.AST]]:
    found = []
    for name, path in _modules().items():
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                found.append((f"{name}.{node.name}", node))
    return found


def test_functions_fit_in_a_readers_head() -> None:
    """No function of ``scripts/`` is longer than 100 lines (docstring included)."""
    long = {
        name: node.end_lineno - node.lineno + 1
        for name, node in _definitions()
        if not isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 100
    }
    assert not long


@pytest.mark.parametrize("cls", ["scripts.inferer.CS3FInferer", "scripts.engine.evaluator.CS3FEvaluator"])
def test_the_wiring_classes_stay_thin(cls: str) -> None:
    lengths = {name: node.end_lineno - node.lineno + 1 for name, node in _definitions()}
    assert lengths[cls] <= 250


# ----------------------------------------------------------------------------------- test tiers
UNIT = ROOT / "tests" / "unit"
#: what only tests/bundle may use: the bundle run in a subprocess or in-process (tests/helpers.py),
#: MONAI's bundle runner, and processes of any kind
BUNDLE_ONLY = {"run_bundle", "start_bundle", "bundle_command", "run_workflow", "ConfigWorkflow", "Popen"}
PROCESS_MODULES = {"subprocess", "multiprocessing", "concurrent.futures"}
BUNDLE_COMMAND = re.compile(r"-m\s+monai\.bundle\s+run")


def _tier_violations(path: Path) -> list[str]:
    """Where a test module leaves the unit tier: a process module imported, a bundle helper named, or
    ``monai.bundle run`` spelled out (``monai.bundle.ConfigParser`` reads configs and stays allowed)."""
    found = []
    for node in ast.walk(_tree(path)):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Import):
            found += [f"{line}: import {a.name}" for a in node.names if a.name.split(".")[0] in PROCESS_MODULES]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if module in PROCESS_MODULES or module.split(".")[0] == "subprocess":
                found.append(f"{line}: from {module} import ...")
            found += [f"{line}: imports {a.name}" for a in node.names if a.name in BUNDLE_ONLY]
            if module == "monai.bundle" and any(a.name == "run" for a in node.names):
                found.append(f"{line}: imports monai.bundle.run")
        elif isinstance(node, ast.Name) and node.id in BUNDLE_ONLY:
            found.append(f"{line}: uses {node.id}")
        elif isinstance(node, ast.Attribute) and (
            node.attr in BUNDLE_ONLY or (node.attr == "run" and ast.unparse(node.value).endswith("bundle"))
        ):
            found.append(f"{line}: uses {ast.unparse(node)}")
        elif isinstance(node, ast.List | ast.Tuple) and any(
            isinstance(e, ast.Constant) and e.value == "monai.bundle" for e in node.elts
        ):
            found.append(f"{line}: runs python -m monai.bundle")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and BUNDLE_COMMAND.search(node.value):
            found.append(f"{line}: runs python -m monai.bundle")
    return sorted(set(found), key=lambda s: int(s.split(":")[0]))


def test_unit_tests_run_in_process_without_the_bundle() -> None:
    """tests/unit is the quick tier: no subprocess, no bundle run (those tests live in tests/bundle)."""
    offenders = {
        str(path.relative_to(ROOT)): found for path in sorted(UNIT.rglob("*.py")) if (found := _tier_violations(path))
    }
    assert not offenders, f"move these tests to tests/bundle: {offenders}"


def test_the_tier_check_sees_a_violation(tmp_path: Path) -> None:
    probe = tmp_path / "test_probe.py"
    probe.write_text(
        "import subprocess as sp\nfrom tests.helpers import run_workflow\nfrom tests import helpers\n"
        "from monai.bundle import ConfigParser, ConfigWorkflow\n\n"
        "def test_x():\n    helpers.run_bundle('--q', '8')\n"
        "    sp.run(['python', '-m', 'monai.bundle', 'run'])\n    ConfigParser()\n"
        # (split in two here, so that this file does not spell out the command it looks for)
        "    os.system('python -m monai" + ".bundle run --config_file c.json')\n"
    )
    found = " | ".join(_tier_violations(probe))
    for expected in (
        "1: import subprocess",
        "2: imports run_workflow",
        "4: imports ConfigWorkflow",
        "7: uses helpers.run_bundle",
        "8: runs python -m monai.bundle",
        "10: runs python -m monai.bundle",
    ):
        assert expected in found, found
    assert "ConfigParser" not in found
