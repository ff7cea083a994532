"""The reports' Markdown tables (markdown.py)."""

from __future__ import annotations

import pytest

from gtzan_mlops.reports import markdown


def test_table_lines_alignment_and_escaped_pipes():
    lines = markdown.table(["model", "accuracy"], [["knn", "0.665"], ["a|b", 1]], align="lr")
    assert lines == ["| model | accuracy |", "|---|---:|", "| knn | 0.665 |", "| a\\|b | 1 |"]


def test_a_row_of_another_width_is_refused():
    with pytest.raises(ValueError, match="a row of 1 cells in a table of 2 columns"):
        markdown.table(["a", "b"], [["only one"]])
