"""PNG figures logged to MLflow beside the DVC plot data: confusion matrices and Optuna histories.

Bare matplotlib Figures, which nothing else holds: safe in worker processes and servers. The
history is drawn here rather than by optuna.visualization.matplotlib (experimental, its own
pyplot figure), so that pruned trials show with their last reported value.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure


def confusion_png(
    actual: list[str], predicted: list[str], classes: list[str], path: Path, title: str
) -> Path:
    """A confusion matrix (rows: actual genre, columns: predicted), counts in the cells:
    scikit-learn's display, drawn on a figure of our own."""
    from sklearn.metrics import ConfusionMatrixDisplay

    figure = Figure(figsize=(7.5, 6.5), dpi=100)
    axes = figure.subplots()
    ConfusionMatrixDisplay.from_predictions(
        actual, predicted, labels=classes, ax=axes, cmap="Blues", xticks_rotation=45
    )
    axes.set_xlabel("predicted")
    axes.set_ylabel("actual")
    axes.set_title(title, fontsize="medium")
    figure.tight_layout()
    figure.savefig(path)
    return path


def history_png(history: pd.DataFrame, path: Path, title: str, metric: str) -> Path:
    """Optuna's optimisation history: each finished trial's value and the best so far."""
    figure = Figure(figsize=(7.5, 4.5), dpi=100)
    axes = figure.subplots()
    complete = history[history["state"] == "COMPLETE"]
    pruned = history[history["state"] == "PRUNED"]
    axes.scatter(complete["trial"], complete["value"], s=20, label="trial")
    if not pruned.empty:
        axes.scatter(
            pruned["trial"], pruned["value"], s=20, marker="x", label="pruned (last value)"
        )
    axes.step(history["trial"], history["best_value"], where="post", color="C3", label="best")
    axes.set_xlabel("trial")
    axes.set_ylabel(metric)
    axes.set_title(title, fontsize="medium")
    axes.legend(loc="lower right", fontsize="small")
    figure.tight_layout()
    figure.savefig(path)
    return path


def per_class_f1_png(scores: dict[str, float], path: Path, title: str) -> Path:
    """Horizontal bars of the F1 of each genre, in the given order from the top."""
    genres = list(scores)
    figure = Figure(figsize=(7.0, 0.35 * len(genres) + 1.5), dpi=100)
    axes = figure.subplots()
    axes.barh(range(len(genres)), [scores[genre] for genre in genres], color="C0")
    axes.set_yticks(range(len(genres)), genres)
    axes.invert_yaxis()
    axes.set_xlim(0, 1)
    axes.set_xlabel("F1")
    axes.set_title(title, fontsize="medium")
    figure.tight_layout()
    figure.savefig(path)
    return path


def pca_scatter_png(
    points: pd.DataFrame, explained: list[float], genres: list[str], path: Path
) -> Path:
    """The clips on their first two principal components (`points`: genre, pc1, pc2), one colour
    per genre in the given order; the axes say how much of the variance each explains."""
    import matplotlib

    figure = Figure(figsize=(8, 6), dpi=100)
    axes = figure.subplots()
    colours = matplotlib.colormaps["tab10"]
    for index, genre in enumerate(genres):
        chosen = points[points["genre"] == genre]
        axes.scatter(chosen["pc1"], chosen["pc2"], s=18, color=colours(index % 10), label=genre)
    axes.set_xlabel(f"PC1 ({explained[0]:.1%} of variance)")
    axes.set_ylabel(f"PC2 ({explained[1]:.1%} of variance)")
    axes.set_title(f"PCA of the 30 s features ({len(points)} clips)")
    axes.legend(loc="best", fontsize="small", ncol=2)
    figure.tight_layout()
    figure.savefig(path)
    return path
