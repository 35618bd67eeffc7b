"""Markdown of the benchmarks: the one table formatter, and generated blocks inside tracked documents."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from scripts.storage.atomic import atomic_write_text


def cell(value: object) -> str:
    """One table cell: ``-`` for ``None``, yes/no for booleans, 4 significant digits for floats."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.2e}" if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5) else f"{value:.4g}"
    return str(value)


def table(headers: Sequence[str], rows: Iterable[Sequence]) -> str:
    """A GitHub-flavoured markdown table; every cell goes through :func:`cell`."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])


def splice_block(text: str, begin: str, end: str, markdown: str) -> str | None:
    """``text`` with its ``begin`` ... ``end`` block replaced by ``markdown`` (``None`` without both, in order)."""
    if begin not in text or end not in text.split(begin, 1)[1]:
        return None
    head, rest = text.split(begin, 1)
    return f"{head}{begin}\n{markdown}\n{end}{rest.split(end, 1)[1]}"


def write_block(doc: Path, begin: str, end: str, markdown: str, head: str = "") -> None:
    """Replace ``doc``'s ``begin`` ... ``end`` block atomically, or append one (a new ``doc`` starts with ``head``)."""
    text = doc.read_text() if doc.is_file() else head
    spliced = splice_block(text, begin, end, markdown)
    if spliced is None:
        spliced = (text.rstrip("\n") + "\n\n" if text else "") + f"{begin}\n{markdown}\n{end}\n"
    atomic_write_text(doc, spliced)
