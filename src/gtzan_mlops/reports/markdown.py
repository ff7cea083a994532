"""Markdown tables for the reports (reproduction, feature sets, duplicates).

Cells are not padded to their column's width, as tabulate's `pipe` format does: the reports are
committed DVC outputs, and an unpadded table changes only the lines whose values changed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def table(header: Sequence[str], rows: Iterable[Sequence[object]], align: str = "") -> list[str]:
    """The lines of a GitHub-flavoured Markdown table; `align` has one letter per column, `l` or
    `r` (numbers), left for columns it does not cover."""
    marks = [
        ":" if index < len(align) and align[index] == "r" else "" for index in range(len(header))
    ]
    lines = [_row(header), "|" + "".join(f"---{mark}|" for mark in marks)]
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"a row of {len(row)} cells in a table of {len(header)} columns")
        lines.append(_row(row))
    return lines


def _row(cells: Sequence[object]) -> str:
    return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"
