"""The models table of the evaluate stage: one row per model, the selection score that chose
(with its interval) beside the test scores that only report (with theirs), as CSV and Markdown."""

from __future__ import annotations

from typing import Any

import pandas as pd

from gtzan_mlops.reports import markdown

MODELS_FILE = "models.csv"  # beside evaluation.json: one row per model, family x feature set
MODELS_REPORT = "models.md"  # the same as a readable table
REPORTED = ("test_song_accuracy", "test_song_macro_f1", "test_accuracy")  # with intervals


def models_table(results: dict[str, dict[str, Any]], winner: str) -> pd.DataFrame:
    """One row per evaluated model: what it is, the selection score that chose (with its
    interval) and the test scores that report (with theirs), the per-song ones first."""
    rows = []
    for name, entry in results.items():
        selection = entry["selection"]
        row: dict[str, Any] = {
            "model": name,
            **{key: entry[key] for key in ("family", "feature_set", "split", "level")},
            "candidate": entry["candidate"],
            "winner": name == winner,
            "selection": f"{selection['source']} {selection['metric']}",
            "selection_value": selection["value"],
            "selection_low": selection["low"],
            "selection_high": selection["high"],
        }
        for metric in REPORTED:
            interval = entry["test_intervals"][metric]
            row.update({metric: entry[metric], f"{metric}_low": interval["low"]})
            row[f"{metric}_high"] = interval["high"]
        row["test_songs"] = entry["test_songs"]
        rows.append(row)
    return pd.DataFrame(rows)


def models_markdown(table: pd.DataFrame, summary: dict[str, Any]) -> str:
    """The models table for people: the number that chose beside the numbers that report."""
    level = f"{summary['uncertainty_level']:.0%}"
    lines = [
        f"# Models on the {summary['split']} split",
        "",
        f"The winner among the candidates is chosen by **{summary['selection']}** (never a test "
        "score); the test scores only report. Brackets: "
        f"{level} intervals, a bootstrap over the split's units (songs, duplicate groups, "
        "artists).",
        "",
    ]

    def interval(value: float, low: float, high: float) -> str:
        return f"{value:.3f} [{low:.3f}, {high:.3f}]"

    header = ["model", "candidate", f"selection: {summary['selection']}"]
    header += [f"{name} ({level})" for name in REPORTED] + ["test songs"]
    rows = [
        [
            f"**{row['model']}** (winner)" if row["winner"] else row["model"],
            "yes" if row["candidate"] else "no",
            interval(row["selection_value"], row["selection_low"], row["selection_high"]),
            *(interval(row[n], row[f"{n}_low"], row[f"{n}_high"]) for n in REPORTED),
            row["test_songs"],
        ]
        for row in table.to_dict("records")
    ]
    return "\n".join(lines + markdown.table(header, rows, "llrrrrr")) + "\n"
