"""Scoring a classifier on the rows of a subset: the metrics every stage reports.

Train (validation and test), evaluate (test), promote (the champion scored again) and the
reproduction report score through `score_classifier`, so a number means the same wherever it
appears: accuracy and macro F1 at the model's own level, and per song (segment probabilities
averaged per track, as the served model votes). `score_intervals` gives each of them its
bootstrap interval over the split's units (uncertainty.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

from gtzan_mlops.data.splits import TEST_SUBSET

if TYPE_CHECKING:
    from gtzan_mlops.evaluation.uncertainty import Interval
    from gtzan_mlops.settings.schema import Uncertainty

LEVELS = ("clip", "segment")
METRICS = ("accuracy", "macro_f1", "song_accuracy", "song_macro_f1")


SELECTION_SOURCES = ("validation", "cross_validation")  # params selection.source


class EvaluationError(ValueError):
    """Evaluation cannot proceed; the message says which input is wrong and why."""


@dataclass
class FamilyEvaluation:
    """Scores of one family on one subset, and the per-row and per-song outcomes behind them
    (with the track of each, for the intervals)."""

    family: str
    level: str
    metrics: dict[str, float]
    subset: str = TEST_SUBSET
    actual: list[str] = field(default_factory=list)  # per row (clip or segment)
    predicted: list[str] = field(default_factory=list)
    row_tracks: list[str] = field(default_factory=list)  # the track of each row
    song_tracks: list[str] = field(default_factory=list)  # the track of each song, sorted
    song_actual: list[str] = field(default_factory=list)
    song_predicted: list[str] = field(default_factory=list)
    per_class_f1: dict[str, float] = field(default_factory=dict)


def song_probabilities(
    track_ids: pd.Series | np.ndarray, probabilities: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per track (sorted): the mean of its rows' probabilities, as the served model votes."""
    frame = pd.DataFrame(np.asarray(probabilities, dtype=np.float64))
    frame["track_id"] = np.asarray(track_ids)
    means = frame.groupby("track_id", sort=True).mean()
    return means.index.to_numpy(), means.to_numpy()


def classification_metrics(actual: list[str], predicted: list[str]) -> dict[str, float]:
    """Accuracy and macro F1 (over the genres present in `actual` or `predicted`)."""
    return {
        "accuracy": float(accuracy_score(actual, predicted)),
        "macro_f1": float(f1_score(actual, predicted, average="macro", zero_division=0)),
    }


def per_class_table(actual: list[str], predicted: list[str], classes: list[str]) -> pd.DataFrame:
    """Precision, recall, F1 and support per genre: one row per genre, in `classes` order."""
    precision, recall, f1, support = precision_recall_fscore_support(
        actual, predicted, labels=classes, zero_division=0
    )
    return pd.DataFrame(
        {"genre": classes, "precision": precision, "recall": recall, "f1": f1, "support": support}
    )


def per_class_f1(actual: list[str], predicted: list[str], classes: list[str]) -> dict[str, float]:
    table = per_class_table(actual, predicted, classes)
    return {str(genre): float(f1) for genre, f1 in zip(table["genre"], table["f1"], strict=True)}


def score_classifier(
    classifier: Any,
    level: str,
    classes: list[str] | tuple[str, ...],
    columns: list[str],
    rows: pd.DataFrame,
    family: str = "",
    subset: str = TEST_SUBSET,
) -> FamilyEvaluation:
    """Metrics of a classifier on the rows of one subset at its level (`track_id`, `genre`, the
    feature `columns`), named `<subset>_<metric>`.

    `classes` is the order of the classifier's probability columns; labels are compared by
    name, so a model with another class order is scored correctly.
    """
    if rows.empty:
        raise EvaluationError(f"{family or 'model'}: the {subset} set holds no {level} rows")
    absent = [name for name in columns if name not in rows.columns]
    if absent:
        raise EvaluationError(f"{family}: {subset} features lack columns {absent[:3]}...")
    probabilities = np.asarray(classifier.predict_proba(rows[columns]), dtype=np.float64)
    return score_probabilities(probabilities, level, classes, rows, family, subset)


def score_probabilities(
    probabilities: np.ndarray,
    level: str,
    classes: list[str] | tuple[str, ...],
    rows: pd.DataFrame,
    family: str = "",
    subset: str = TEST_SUBSET,
) -> FamilyEvaluation:
    """What `score_classifier` reports, from probabilities already predicted for `rows` (one
    row each, columns in `classes` order): pooled out-of-fold predictions are scored and voted
    per song exactly as a model's own."""
    if probabilities.shape != (len(rows), len(classes)):
        raise EvaluationError(
            f"{family}: predict_proba returned shape {probabilities.shape}, expected "
            f"({len(rows)}, {len(classes)})"
        )
    names = np.asarray(list(classes))
    actual = rows["genre"].astype(str).tolist()
    predicted = names[probabilities.argmax(axis=1)].tolist()
    metrics = classification_metrics(actual, predicted)

    tracks, song_probs = song_probabilities(rows["track_id"], probabilities)
    genre_of_track = rows.groupby("track_id", sort=True)["genre"].first()
    song_actual = genre_of_track.loc[tracks].astype(str).tolist()
    song_predicted = names[song_probs.argmax(axis=1)].tolist()
    song = classification_metrics(song_actual, song_predicted)
    result = {
        f"{subset}_accuracy": metrics["accuracy"],
        f"{subset}_macro_f1": metrics["macro_f1"],
        f"{subset}_song_accuracy": song["accuracy"],
        f"{subset}_song_macro_f1": song["macro_f1"],
        f"{subset}_items": len(rows),
        f"{subset}_songs": len(tracks),
    }
    return FamilyEvaluation(
        family=family,
        level=level,
        metrics=result,
        subset=subset,
        actual=actual,
        predicted=predicted,
        row_tracks=rows["track_id"].astype(str).tolist(),
        song_tracks=[str(track) for track in tracks],
        song_actual=song_actual,
        song_predicted=song_predicted,
        per_class_f1=per_class_f1(song_actual, song_predicted, list(classes)),
    )


def evaluation_interval(
    evaluation: FamilyEvaluation,
    metric: str,
    unit_of_track: Mapping[str, str],
    settings: Uncertainty,
) -> Interval:
    """One of METRICS with its interval: row metrics resample each row with its track's unit,
    song metrics each song; a track missing from `unit_of_track` is a unit of its own."""
    from gtzan_mlops.evaluation import uncertainty

    if metric not in METRICS:
        raise EvaluationError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
    if metric.startswith("song_"):
        actual, predicted = evaluation.song_actual, evaluation.song_predicted
        tracks = evaluation.song_tracks
    else:
        actual, predicted, tracks = evaluation.actual, evaluation.predicted, evaluation.row_tracks
    if not actual or len(tracks) != len(actual):
        raise EvaluationError(
            f"{evaluation.family}: {evaluation.subset} outcomes of {len(actual)} "
            f"{'songs' if metric.startswith('song_') else 'rows'} with {len(tracks)} tracks: "
            "no interval without the track of each"
        )
    units = [unit_of_track.get(track, track) for track in tracks]
    return uncertainty.metric_interval(
        actual, predicted, units, metric.removeprefix("song_"), settings
    )


def score_intervals(
    evaluation: FamilyEvaluation,
    unit_of_track: Mapping[str, str],
    settings: Uncertainty,
) -> dict[str, dict[str, float | int]]:
    """{f"{subset}_{metric}": Interval.to_dict()} for every one of METRICS: accuracy and
    macro_f1 over the rows (each resampled with its track's unit), song_accuracy and
    song_macro_f1 over the songs (by their unit)."""
    return {
        f"{evaluation.subset}_{metric}": evaluation_interval(
            evaluation, metric, unit_of_track, settings
        ).to_dict()
        for metric in METRICS
    }
