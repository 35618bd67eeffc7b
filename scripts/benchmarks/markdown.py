"""Markdown helpers: the one table formatter of the benchmarks, and cell formats."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def cell(value: object) -> str:
    """One table cell: ``-`` for ``None``, yes/no for booleans, 4 significant digits for floats."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.2e}"
        return f"{value:.4g}"
    return str(value)


def table(headers: Sequence[str], rows: Iterable[Sequence]) -> str:
    """A GitHub-flavoured markdown table; every cell goes through :func:`cell`."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def pct(value: float | None) -> str:
    """A fraction as a whole percentage (``0.3`` -> ``30%``); ``-`` for ``None``."""
    return "-" if value is None else f"{value:.0%}"


def missing(section: dict | None) -> list[str]:
    """The lines standing in for a section without results: its error, or that it was not run."""
    if section and "error" in section:
        return [f"failed: `{section['error']}`", ""]
    return ["not run", ""]


def joined(params: dict) -> str:
    """``k=v, k=v`` of a parameter dict, for prose around the tables."""
    return ", ".join(f"{k}={v}" for k, v in params.items())
