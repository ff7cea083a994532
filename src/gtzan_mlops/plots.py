"""PNG figures logged to MLflow beside the DVC plot data: confusion matrices and Optuna histories.

Bare matplotlib Figures: no pyplot global state and no display backend, safe in worker
processes and servers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.metrics import confusion_matrix


def confusion_png(
    actual: list[str], predicted: list[str], classes: list[str], path: Path, title: str
) -> Path:
    """A confusion matrix (rows: actual genre, columns: predicted), counts in the cells."""
    counts = confusion_matrix(actual, predicted, labels=classes)
    figure = Figure(figsize=(7.5, 6.5), dpi=100)
    axes = figure.subplots()
    image = axes.imshow(counts, cmap="Blues")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    axes.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    axes.set_yticks(range(len(classes)), classes)
    axes.set_xlabel("predicted")
    axes.set_ylabel("actual")
    axes.set_title(title, fontsize="medium")
    threshold = counts.max() / 2 if counts.size else 0
    for (row, column), count in np.ndenumerate(counts):
        if count:
            colour = "white" if count > threshold else "black"
            axes.text(column, row, str(count), ha="center", va="center", color=colour)
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
