"""Every trained model scored once on the same held-out test set, and the winner chosen without
it: what the evaluate stage writes (evaluation.json, its DVC metrics and its MLflow metrics).

A model is a family trained on a feature set (`<family>-<feature set>`). Its best version (from
its training record) is scored at its own level (a segment-level model on the test segments, a
clip-level one on the test clips) and per song (segment probabilities averaged per track, as
the served model votes), each score with its interval over the split's units. The winner among
the candidates is the one with the best selection score its training stage recorded
(selection.py); the test scores only report.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pandas as pd

from gtzan_mlops.data.splits import TEST_SUBSET, split_label
from gtzan_mlops.evaluation.models_table import REPORTED, models_table
from gtzan_mlops.evaluation.records import record_feature_set, record_model, stale_reason
from gtzan_mlops.evaluation.scoring import FamilyEvaluation, score_classifier, score_intervals
from gtzan_mlops.evaluation.selection import choose_winner, selection_of, selection_rule
from gtzan_mlops.evaluation.test_data import TestData
from gtzan_mlops.features import feature_sets
from gtzan_mlops.settings.schema import Selection, Uncertainty

log = logging.getLogger(__name__)

# Loads a logged classifier from its model URI and flavor (models.zoo.load_classifier).
ClassifierLoader = Callable[[str, str], Any]


@dataclass
class ModelEvaluation:
    """The evaluate stage's summary (evaluation.json), its models table, and the winner's
    outcomes on the test songs (for its plots)."""

    summary: dict[str, Any]
    table: pd.DataFrame
    winner: FamilyEvaluation


def evaluate_family(
    record: dict[str, Any], data: TestData, load_classifier: ClassifierLoader
) -> FamilyEvaluation:
    """Load a family's logged best model and score it on the test rows of its level."""
    classifier = load_classifier(record["model_uri"], record["flavor"])
    feature_set = record_feature_set(record)
    return score_classifier(
        classifier,
        record["level"],
        list(record["classes"]),
        feature_sets.columns(feature_set, int(record["feature_settings"]["n_mfcc"])),
        data.rows(record["level"], feature_set),
        family=record_model(record),
    )


def evaluate_models(
    records: dict[str, dict[str, Any] | None],
    data: TestData,
    candidates: list[str],
    selection: Selection,
    uncertainty: Uncertainty,
    load_classifier: ClassifierLoader,
) -> ModelEvaluation:
    """Score each model's record on the test set and choose the winner by its selection score.

    `records` maps model (`<family>-<feature set>`; the summary's "families" are these) ->
    training record (None: the model has no record). A record that belongs to other features
    or another split is skipped with its reason, not scored.
    """
    label = split_label(data.summary)
    results: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    details: dict[str, FamilyEvaluation] = {}
    for name, record in records.items():
        reason = "no training record" if record is None else stale_reason(record, data)
        if reason or record is None:
            skipped[name] = reason or "no training record"
            log.warning("skipping %s: %s", name, skipped[name])
            continue
        chosen_by = selection_of(record, selection)
        evaluation = evaluate_family(record, data, load_classifier)
        details[name] = evaluation
        results[name] = {
            "family": record["family"],
            "feature_set": record_feature_set(record),
            "split": label,
            "level": record["level"],
            "candidate": name in candidates,
            "run_id": record.get("run_id"),
            "selection": chosen_by,
            **evaluation.metrics,
            "test_intervals": score_intervals(evaluation, data.units, uncertainty),
        }
        log.info("%s (%s split): %s", name, label, evaluation.metrics)

    winner = choose_winner(results, candidates)
    summary = {
        "split": label,
        "split_strategy": data.summary.get("strategy"),
        "leaky": bool(data.summary.get("leaky", False)),
        "subset": TEST_SUBSET,
        "selection": selection_rule(selection),
        "selection_source": selection.source,
        "selection_metric": selection.metric,
        "uncertainty_level": uncertainty.level,
        "winner": winner,
        "winner_selection": results[winner]["selection"],
        "winner_test": {metric: results[winner]["test_intervals"][metric] for metric in REPORTED},
        "families": results,
        "skipped": skipped,
    }
    return ModelEvaluation(summary, models_table(results, winner), details[winner])


def _bounds(interval: dict[str, Any]) -> dict[str, float]:
    return {key: interval[key] for key in ("value", "low", "high")}


def key_metrics(summary: dict[str, Any]) -> dict[str, Any]:
    """The DVC metrics of the stage, few enough for `dvc exp show` to stay readable: split, how
    the winner was chosen, its selection score and its test song macro F1 with their intervals,
    and each model's selection and test song macro F1 (the rest is in evaluation.json)."""
    return {
        "split": summary["split"],
        "leaky": summary["leaky"],
        "selection": summary["selection"],
        "winner": summary["winner"],
        "winner_selection": _bounds(summary["winner_selection"]),
        "winner_test_song_macro_f1": _bounds(summary["winner_test"]["test_song_macro_f1"]),
        "models": {
            name: {
                "selection": scores["selection"]["value"],
                "test_song_macro_f1": scores["test_song_macro_f1"],
            }
            for name, scores in summary["families"].items()
        },
    }


def evaluation_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The MLflow metrics of the evaluate run: `<model>.selection_<metric>` and every
    `<model>.test_<metric>`, the reported ones with `_low` and `_high` beside them."""
    metrics: dict[str, float] = {}
    for name, scores in summary["families"].items():
        chosen_by = scores["selection"]
        metrics[f"{name}.selection_{chosen_by['metric']}"] = float(chosen_by["value"])
        for metric, value in scores.items():
            if metric.startswith(f"{TEST_SUBSET}_") and isinstance(value, int | float):
                metrics[f"{name}.{metric}"] = float(value)
        for metric, interval in scores["test_intervals"].items():
            metrics[f"{name}.{metric}_low"] = float(interval["low"])
            metrics[f"{name}.{metric}_high"] = float(interval["high"])
    return metrics
