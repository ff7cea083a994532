"""The `evaluate` stage: every trained model on the same held-out test set, and the winner.

A model is a family trained on a feature set (`<family>-<feature set>`, e.g. `xgboost-both`),
so the winner is chosen across families and feature sets on the same test songs. Each model's
best version (from `data/train/<model>.json`) is loaded from MLflow and scored on
the test subset of the active split, at its own level: a segment-level model on the test
segments, a clip-level model on the test clips. Segment-level models are also scored per song
(segment probabilities averaged per track, the way the served model classifies a clip); for a
clip-level model a song is a clip, so its song metrics equal its clip metrics. Song-level
metrics are therefore the ones that compare families of both levels on equal terms, and the
default selection metric (`evaluate.metric: test_song_macro_f1`).

Writes `reports/evaluate/evaluation.json` (every family's test metrics, what promote reads),
for the winner `confusion.csv` (actual, predicted: one row per test song) and `per_class_f1.csv`
(genre, f1) beside it as DVC plots with the same two as PNG, and the key numbers as the DVC
metrics file `metrics/evaluate.json`: the split (and whether it is leaky), the winner, and each
family's selection metric, so `dvc exp show` and `dvc metrics diff` stay readable. Only the
families in `evaluate.candidates` can win (the classic models are scored for comparison).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd

from gtzan_mlops import feature_sets
from gtzan_mlops.cli import stage_main
from gtzan_mlops.config import ConfigError, resolve_path
from gtzan_mlops.records import (
    EVALUATION_FILE,
    load_family_record,
    record_feature_set,
    record_model,
    stale_reason,
)
from gtzan_mlops.scoring import (
    METRICS,
    TEST_SUBSET,
    EvaluationError,
    FamilyEvaluation,
    score_classifier,
)
from gtzan_mlops.split_data import TestData, load_test_data, split_label

log = logging.getLogger(__name__)

MODELS_FILE = "models.csv"  # beside it: one row per model, family x feature set


def choose_winner(
    evaluations: dict[str, dict[str, Any]], candidates: list[str], metric: str
) -> str:
    """The candidate with the highest `metric`; ties go to the earlier candidate in the list."""
    scored = [name for name in candidates if name in evaluations]
    if not scored:
        raise EvaluationError(
            f"none of the candidate families {candidates} was evaluated "
            f"(evaluated: {sorted(evaluations)})"
        )
    for name in scored:
        if metric not in evaluations[name]:
            raise EvaluationError(f"{name}: no value for the selection metric {metric!r}")
    return max(scored, key=lambda name: (evaluations[name][metric], -scored.index(name)))


def evaluate_family(record: dict[str, Any], data: TestData) -> FamilyEvaluation:
    """Load a family's logged best model and score it on the test rows of its level."""
    from gtzan_mlops.models import load_classifier

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


def write_plots(
    evaluation: FamilyEvaluation, output_dir: Path, classes: list[str], split: str
) -> None:
    """The winner's DVC plots data, one (actual, predicted) row per test song and the F1 per
    genre, and the same two as PNG images (logged to MLflow)."""
    from gtzan_mlops import plots

    output_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"actual": evaluation.song_actual, "predicted": evaluation.song_predicted}).to_csv(
        output_dir / "confusion.csv", index=False
    )
    pd.DataFrame(
        {"genre": classes, "f1": [evaluation.per_class_f1[genre] for genre in classes]}
    ).to_csv(output_dir / "per_class_f1.csv", index=False)
    what = f"{evaluation.family}, test songs, {split} split"
    plots.confusion_png(
        evaluation.song_actual,
        evaluation.song_predicted,
        classes,
        output_dir / "confusion.png",
        f"Confusion: {what}",
    )
    plots.per_class_f1_png(
        {genre: evaluation.per_class_f1[genre] for genre in classes},
        output_dir / "per_class_f1.png",
        f"F1 per genre: {what}",
    )


def models_table(results: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """One row per evaluated model: family, feature set, split, level and test scores, the
    per-song ones (segment probabilities averaged per song) first."""
    columns = ["family", "feature_set", "split", "level", "candidate"]
    scores = ["test_song_accuracy", "test_song_macro_f1", "test_accuracy", "test_songs"]
    rows = [
        {"model": name, **{key: entry[key] for key in columns + scores}}
        for name, entry in results.items()
    ]
    return pd.DataFrame(rows, columns=["model", *columns, *scores])


def evaluate_records(
    records: dict[str, dict[str, Any] | None],
    data: TestData,
    candidates: list[str],
    metric: str,
    classes: list[str],
    output_dir: Path,
) -> dict[str, Any]:
    """Score each family's record on `data`, choose the winner, write the metrics and plots.

    `records` maps model (`<family>-<feature set>`; the summary's "families" are these) ->
    training record (None: the model has no record). A record that
    belongs to other features or another split is skipped with its reason, not scored.
    """
    label = split_label(data.summary)
    results: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    details: dict[str, FamilyEvaluation] = {}
    for family, record in records.items():
        reason = "no training record" if record is None else stale_reason(record, data)
        if reason or record is None:
            skipped[family] = reason or "no training record"
            log.warning("skipping %s: %s", family, skipped[family])
            continue
        evaluation = evaluate_family(record, data)
        details[family] = evaluation
        results[family] = {
            "family": record["family"],
            "feature_set": record_feature_set(record),
            "split": label,
            "level": record["level"],
            "candidate": family in candidates,
            "run_id": record.get("run_id"),
            **evaluation.metrics,
        }
        log.info("%s (%s split): %s", family, label, evaluation.metrics)

    winner = choose_winner(results, candidates, metric)
    write_plots(details[winner], output_dir, classes, label)
    models_table(results).to_csv(output_dir / MODELS_FILE, index=False)
    summary = {
        "split": label,
        "split_strategy": data.summary.get("strategy"),
        "leaky": bool(data.summary.get("leaky", False)),
        "subset": TEST_SUBSET,
        "selection_metric": metric,
        "winner": winner,
        f"winner_{metric}": results[winner][metric],
        "families": results,
        "skipped": skipped,
    }
    (output_dir / EVALUATION_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def key_metrics(summary: dict[str, Any]) -> dict[str, Any]:
    """The DVC metrics of the stage: split, winner and each family's selection metric."""
    metric = summary["selection_metric"]
    return {
        "split": summary["split"],
        "leaky": summary["leaky"],
        "winner": summary["winner"],
        f"winner_{metric}": summary[f"winner_{metric}"],
        metric: {family: scores[metric] for family, scores in summary["families"].items()},
    }


def selection_metric(stage: dict[str, Any]) -> str:
    metric = str(stage["metric"])
    if metric.removeprefix(f"{TEST_SUBSET}_") not in METRICS:
        raise ConfigError(
            f"evaluate.metric must be one of {[f'{TEST_SUBSET}_{m}' for m in METRICS]}, "
            f"got {metric!r}"
        )
    return metric


def trained_models(params: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The models (`<family>-<feature set>`) the pipeline trains, and those that can win, in
    order of preference on a tie: every family of `evaluate.families` (default
    `train.families`) on each of `train.feature_sets`, and the `evaluate.candidates` also on
    each of `train.candidate_feature_sets`."""
    stage, train = params["evaluate"], params["train"]
    candidates = list(stage["candidates"])
    families = list(stage["families"] or train["families"])
    sets = list(train["feature_sets"])
    candidate_sets = list(dict.fromkeys([*sets, *train["candidate_feature_sets"]]))
    winners = [feature_sets.model_key(f, s) for f in candidates for s in candidate_sets]
    models = [feature_sets.model_key(f, s) for f in families for s in sets]
    return list(dict.fromkeys([*models, *winners])), winners


def run(params: dict[str, Any], root: Path) -> dict[str, Any]:
    """Evaluate every trained family on the test set, pick the winner, write the metrics."""
    from gtzan_mlops import tracking

    paths = params["paths"]
    models, candidates = trained_models(params)
    metric = selection_metric(params["evaluate"])
    records_dir = resolve_path(paths["train_records"], root)
    records = {
        model: load_family_record(records_dir / f"{model}.json")
        if (records_dir / f"{model}.json").is_file()
        else None
        for model in models
    }
    tracking.use_store(root)
    output_dir = resolve_path(paths["evaluate_reports"], root)
    summary = evaluate_records(
        records,
        load_test_data(params, root),
        candidates,
        metric,
        list(params["genres"]),
        output_dir,
    )
    metrics_path = resolve_path(paths["metrics"], root) / "evaluate.json"
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    metrics_path.write_text(json.dumps(key_metrics(summary), indent=2) + "\n")
    log_evaluation(summary, output_dir, tracking.experiment_name(params), root)
    return summary


def log_evaluation(summary: dict[str, Any], output_dir: Path, experiment: str, root: Path) -> str:
    """One MLflow run `evaluate [<split>]` with every family's test scores (`<family>.<metric>`)
    and the winner's plots, beside the training runs; returns its id."""
    from gtzan_mlops import tracking

    return tracking.log_stage_run(
        root,
        experiment,
        stage="evaluate",
        run_name=f"evaluate [{summary['split']}]",
        params={"selection_metric": summary["selection_metric"], "subset": TEST_SUBSET},
        metrics={
            f"{family}.{name}": float(value)
            for family, scores in summary["families"].items()
            for name, value in scores.items()
            if name.startswith(f"{TEST_SUBSET}_")
        },
        artifacts=[
            output_dir / name
            for name in (
                EVALUATION_FILE,
                MODELS_FILE,
                "confusion.png",
                "per_class_f1.png",
                "confusion.csv",
            )
        ],
        tags={
            "split": summary["split"],
            "leaky": str(summary["leaky"]).lower(),
            "winner": summary["winner"],
        },
    )


def describe(summary: dict[str, Any]) -> str:
    metric = summary["selection_metric"]
    return (
        f"winner on the {summary['split']} split: {summary['winner']} "
        f"({metric} = {summary[f'winner_{metric}']:.4f})"
    )


def main(argv: list[str] | None = None) -> int:
    return stage_main("evaluate", __doc__, run, argv, errors=(EvaluationError,), describe=describe)
