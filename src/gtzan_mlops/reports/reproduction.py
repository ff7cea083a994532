"""The reproduction report's Markdown (`gtzan-mlops report`), from plain data: the tidy table of
test accuracies per family and protocol (models/reproduction.py computes it), what was run, the
gaps between the protocols computed from the table, the notes and the models' settings.

The table's vocabulary lives here, where it is read: its columns, the `published` pseudo
protocol of the source study's own numbers, and the families' names for people.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gtzan_mlops.reports import markdown

COLUMNS = (
    "family",
    "protocol",
    "split",
    "leaky",
    "data",
    "n_train",
    "n_test",
    "metric",
    "mean",
    "std",
    "n_seeds",
)
PUBLISHED = "published"
PUBLISHED_SPLIT = "source study's 70/30 clip split, as published"

FAMILY_NAMES = {
    "naive_bayes": "Naive Bayes",
    "sgd": "SGD",
    "knn": "KNN",
    "decision_tree": "Decision tree",
    "random_forest": "Random forest",
    "svm": "SVM",
    "logistic_regression": "Logistic regression",
    "mlp": "Neural net (sklearn MLP)",
    "fnn": "FNN",
    "fnn_simple": "FNN simple",
    "xgboost": "XGBoost",
}

# Early-stopping settings of Keras and XGBoost: inert here (no validation rows).
UNUSED_WITHOUT_VALIDATION = ("patience", "early_stopping_rounds")


@dataclass(frozen=True)
class ReproductionPage:
    """What the report says, as plain data; paths as shown (display_path)."""

    table: pd.DataFrame  # COLUMNS, one row per family, protocol and metric
    protocols: list[tuple[str, str]]  # (protocol, its column header), in the table's order
    notes: list[str]  # the protocols' notes
    skipped: dict[str, str]  # protocol -> why it did not run
    sizes: dict[str, Any]  # clips, segment_clips, segments of the tables (when found)
    families: list[str]
    hyperparameters: dict[str, dict[str, Any]]  # per family, as passed to the model
    published: bool  # whether the source study's numbers are a column
    seeds: list[int]
    versions: list[str]  # `name==version` of the libraries that trained
    reference_table: str
    segments_table: str
    lists_source: str | None  # the artist-filtered lists read, if any
    output_dir: str


def display_path(path: Path, root: Path) -> str:
    """A path relative to the repository root, `../shared/...` for the folder beside it, so the
    report reads the same on every machine (the command ran from the root)."""
    return os.path.relpath(path.resolve(), root.resolve())


def cell(table: pd.DataFrame, family: str, protocol: str, metric: str = "accuracy") -> str:
    chosen = table[
        (table["family"] == family) & (table["protocol"] == protocol) & (table["metric"] == metric)
    ]
    if chosen.empty:
        return "—"
    mean, std = float(chosen["mean"].iloc[0]), chosen["std"].iloc[0]
    return f"{mean:.3f}" if pd.isna(std) else f"{mean:.3f} ± {float(std):.3f}"


def markdown_table(page: ReproductionPage) -> list[str]:
    """Rows: families; columns: the published numbers, then each protocol (song-grouped twice:
    segment accuracy and song-vote accuracy); cells: mean ± std over the seeds."""
    columns: list[tuple[str, str, str]] = []  # (header, protocol, metric)
    if page.published:
        columns.append(("published (source study, 30 s, 70/30)", PUBLISHED, "accuracy"))
    for protocol, header in page.protocols:
        if protocol == "song_grouped":
            columns.append((f"{header}: segments", protocol, "accuracy"))
            columns.append((f"{header}: song vote", protocol, "song_accuracy"))
        else:
            columns.append((header, protocol, "accuracy"))
    rows = [
        [FAMILY_NAMES.get(family, family)]
        + [cell(page.table, family, protocol, metric) for _, protocol, metric in columns]
        for family in page.families
    ]
    header = ["Model", *(name for name, _, _ in columns)]
    return markdown.table(header, rows, align="l" + "r" * len(columns))


def paired_gaps(
    table: pd.DataFrame, high: tuple[str, str], low: tuple[str, str]
) -> dict[str, float]:
    """Per family: mean of `high` (protocol, metric) minus mean of `low`, where both exist."""
    values = table.set_index(["protocol", "metric", "family"])["mean"]
    gaps = {}
    for family in table["family"].unique():
        try:
            gaps[str(family)] = float(values.loc[(*high, family)] - values.loc[(*low, family)])
        except KeyError:
            continue
    return gaps


def describe_gap(gaps: dict[str, float], what: str) -> str:
    """`what` (a clause naming the two sides) with the average, smallest and largest gap."""
    mean = float(np.mean(list(gaps.values())))
    least = min(gaps, key=lambda family: (gaps[family], family))
    most = max(gaps, key=lambda family: (gaps[family], family))
    name = FAMILY_NAMES.get
    return (
        f"{what}: {mean:+.3f} accuracy on average over {len(gaps)} models "
        f"(from {gaps[least]:+.3f}, {name(least, least)}, to {gaps[most]:+.3f}, "
        f"{name(most, most)})."
    )


def gap_paragraph(table: pd.DataFrame) -> list[str]:
    """The gaps between protocols, computed from the table (positive: the first is higher)."""
    sentences = []
    leak = paired_gaps(table, ("random_segments", "accuracy"), ("song_grouped", "accuracy"))
    if leak:
        sentences.append(
            describe_gap(
                leak,
                "Random segments (LEAKY) minus song-grouped, segment accuracy on the same 3 s "
                "table",
            )
        )
    vote = paired_gaps(table, ("random_segments", "accuracy"), ("song_grouped", "song_accuracy"))
    if vote:
        sentences.append(
            describe_gap(vote, "Random segments (LEAKY) minus song-grouped song-vote accuracy")
        )
    artist = paired_gaps(table, ("clip_stratified", "accuracy"), ("artist_filtered", "accuracy"))
    if artist:
        sentences.append(
            describe_gap(artist, "Clip-stratified minus artist-filtered, 30 s reference table")
        )
    reproduced = paired_gaps(table, ("clip_stratified", "accuracy"), (PUBLISHED, "accuracy"))
    if reproduced:
        sentences.append(
            describe_gap(reproduced, "Clip-stratified (this reproduction) minus published")
            + f" Mean absolute difference: {np.mean(np.abs(list(reproduced.values()))):.3f}."
        )
    if not sentences:
        return []
    return [
        "## Gaps between protocols",
        "",
        " ".join(sentences)
        + " A positive gap is what the first split gains over the second; between a leaky and "
        "an honest split, it is accuracy that comes from recognising songs (or artists) seen in "
        "training, not genres.",
    ]


def command_line(page: ReproductionPage) -> str:
    """The command that writes this report again: its `report` settings as --set options."""
    chosen = {"reference_table": page.reference_table, "segments_table": page.segments_table}
    if page.lists_source:
        chosen["lists_dir"] = page.lists_source
    chosen["families"] = f"[{', '.join(page.families)}]"
    chosen["seeds"] = f"[{', '.join(map(str, page.seeds))}]"
    chosen["output_dir"] = page.output_dir
    options = [f"--set {shlex.quote(f'report.{key}={value}')}" for key, value in chosen.items()]
    return " ".join(["gtzan-mlops report", *options])


def render_markdown(page: ReproductionPage) -> str:
    """reproduction.md, up to the feature-set comparison."""
    sizes = page.sizes
    lines = [
        "# Reproduction of the source study's accuracies, under honest splits",
        "",
        f"Written by `{command_line(page)}`.",
        "",
        "- Models: each family at the source study's settings (`train.<family>.defaults` with the "
        "fixed values of `train.<family>.space`, no tuning), trained on everything that is not "
        "test: Keras networks for exactly `epochs` epochs, XGBoost for exactly `n_estimators` "
        "rounds (no early stopping).",
        f"- Reference table (30 s columns): `{page.reference_table}`, "
        + (f"{sizes['clips']} clips." if "clips" in sizes else "not found."),
        f"- Segment table (3 s columns): `{page.segments_table}`, "
        + (
            f"{sizes['segment_clips']} clips ({sizes['segments']} segments). The segment "
            "columns come from this table, not from the reference table: their clip count is "
            "this table's."
            if "segments" in sizes
            else "not found."
        ),
    ]
    if page.lists_source:
        lines.append(f"- Artist-filtered lists: `{page.lists_source}`.")
    lines += [
        f"- Seeds: {', '.join(map(str, page.seeds))}. Each seed draws the split and seeds the "
        "model; the artist-filtered lists are fixed, so there the seeds only seed the model.",
        "- Cells: test accuracy, mean ± sample standard deviation over the seeds (the song-vote "
        "column: segment probabilities averaged per test song). The random-segment split is "
        "LEAKY: segments of one song are in train and test.",
        "- Versions: " + ", ".join(page.versions) + ".",
        "",
        *markdown_table(page),
        "",
    ]
    gaps = gap_paragraph(page.table)
    if gaps:
        lines += [*gaps, ""]
    if page.notes or page.skipped:
        lines += ["## Notes", ""]
        lines += [f"- {note}" for note in page.notes]
        lines += [f"- Skipped `{name}`: {reason}" for name, reason in page.skipped.items()]
        lines.append("")
    lines += [
        "## Model settings",
        "",
        "As passed to the model (`{**fixed values of the space, **defaults}`); "
        + ", ".join(f"`{name}`" for name in UNUSED_WITHOUT_VALIDATION)
        + " are left out: without a validation set they do nothing.",
        "",
    ]
    lines += [
        f"- {FAMILY_NAMES.get(family, family)} (`{family}`): "
        + ", ".join(
            f"{name}={value}"
            for name, value in sorted(values.items())
            if name not in UNUSED_WITHOUT_VALIDATION
        )
        for family, values in page.hyperparameters.items()
    ]
    return "\n".join(lines) + "\n"
