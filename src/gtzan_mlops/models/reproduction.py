"""The reproduction report's models: the source study's families at its published settings
(`train.<family>.defaults` completed by the fixed values of `train.<family>.space`, no tuning),
trained on each fold of each protocol (evaluation/protocols.py) and scored on its test rows, in
one tidy table beside the published accuracies (reports/reproduction.py renders it).

Models train on everything that is not test: nothing is tuned, Keras networks train exactly
`epochs` epochs and XGBoost exactly `n_estimators` rounds.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from gtzan_mlops.data import split_strategies
from gtzan_mlops.evaluation.protocols import Fold, ProtocolData, ProtocolInputs
from gtzan_mlops.evaluation.scoring import score_classifier
from gtzan_mlops.features.handcrafted import feature_names
from gtzan_mlops.models import zoo
from gtzan_mlops.reports.reproduction import COLUMNS, PUBLISHED, PUBLISHED_SPLIT
from gtzan_mlops.settings.schema import Report, Train

log = logging.getLogger(__name__)

DECIMALS = 6  # of mean and std in the CSV
VERSIONED = ("scikit-learn", ("xgboost-cpu", "xgboost"), ("tensorflow-cpu", "tensorflow"), "keras")

# Metrics recorded per protocol (names of evaluate's metrics without the `test_` prefix). For a
# clip model a song is a clip, and a random segment split has every song on both sides, so song
# metrics are only recorded where they say something: song-grouped segments.
PROTOCOL_METRICS = {
    "clip_stratified": ("accuracy", "macro_f1"),
    "artist_filtered": ("accuracy", "macro_f1"),
    "random_segments": ("accuracy", "macro_f1"),
    "song_grouped": ("accuracy", "macro_f1", "song_accuracy", "song_macro_f1"),
}


@dataclass(frozen=True)
class StudyModels:
    """The families the report runs (`report.families`, null: `train.families`, each once) and
    each one's settings as passed to the model: the fixed values of its space and its
    defaults."""

    families: tuple[str, ...]
    hyperparameters: dict[str, dict[str, Any]]

    @classmethod
    def of(cls, report: Report, train: Train) -> StudyModels:
        families = tuple(dict.fromkeys(report.families or train.families))
        hyperparameters = {}
        for family in families:
            tuning = getattr(train, family)
            hyperparameters[family] = {**zoo.fixed(tuning.space), **tuning.defaults}
        return cls(families, hyperparameters)


def versions() -> list[str]:
    """`name==version` of the libraries the models train with."""
    return zoo.installed_requirements(VERSIONED)


def score_fold(
    family: str,
    fold: Fold,
    protocol: ProtocolData,
    models: StudyModels,
    inputs: ProtocolInputs,
) -> dict[str, float]:
    """Train `family` at the source study's settings on the fold's train rows; its test metrics
    (evaluate's metrics without the `test_` prefix)."""
    columns = list(feature_names(inputs.n_mfcc))
    classes = list(inputs.classes)
    index = {genre: number for number, genre in enumerate(classes)}
    train = (fold.train[columns], fold.train["genre"].map(index).to_numpy())
    result = zoo.fit_family(family, models.hyperparameters[family], train, len(classes), fold.seed)
    evaluation = score_classifier(result.model, protocol.level, classes, columns, fold.test, family)
    if zoo.flavor_of(family) == "keras":
        import keras

        keras.backend.clear_session()  # free the network's graph state before the next one
    return {
        metric: float(evaluation.metrics[f"test_{metric}"])
        for metric in PROTOCOL_METRICS[protocol.protocol]
    }


def _count(values: list[int]) -> int:
    return int(values[0]) if len(set(values)) == 1 else round(float(np.mean(values)))


def _published_row(family: str, accuracy: float) -> dict[str, Any]:
    return {
        "family": family,
        "protocol": PUBLISHED,
        "split": PUBLISHED_SPLIT,
        "leaky": False,
        "data": "30 s clips (source study)",
        "n_train": None,
        "n_test": None,
        "metric": "accuracy",
        "mean": accuracy,
        "std": None,
        "n_seeds": None,
    }


def run_protocols(
    protocols: list[ProtocolData],
    models: StudyModels,
    published: dict[str, float],
    inputs: ProtocolInputs,
) -> pd.DataFrame:
    """The tidy table (reports.reproduction.COLUMNS): per family, its `published` accuracy
    (report.published), then every protocol's metrics, mean and std over the folds' seeds."""
    rows = []
    for family in models.families:
        if family in published:
            rows.append(_published_row(family, published[family]))
        for protocol in protocols:
            strategy = split_strategies.STRATEGIES[protocol.protocol]
            values: dict[str, list[float]] = {}
            for fold in protocol.folds:
                started = time.perf_counter()
                scores = score_fold(family, fold, protocol, models, inputs)
                log.info(
                    "%s, %s, seed %d: accuracy %.4f (%.1f s)",
                    family,
                    strategy.label,
                    fold.seed,
                    scores["accuracy"],
                    time.perf_counter() - started,
                )
                for metric, value in scores.items():
                    values.setdefault(metric, []).append(value)
            for metric, scores in values.items():
                rows.append(
                    {
                        "family": family,
                        "protocol": protocol.protocol,
                        "split": strategy.label,
                        "leaky": strategy.leaky,
                        "data": protocol.data,
                        "n_train": _count([len(fold.train) for fold in protocol.folds]),
                        "n_test": _count([len(fold.test) for fold in protocol.folds]),
                        "metric": metric,
                        "mean": round(float(np.mean(scores)), DECIMALS),
                        "std": round(float(np.std(scores, ddof=1)), DECIMALS)
                        if len(scores) > 1
                        else None,
                        "n_seeds": len(scores),
                    }
                )
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    for column in ("n_train", "n_test", "n_seeds"):
        table[column] = table[column].astype("Int64")
    table["std"] = table["std"].astype(float)
    return table
