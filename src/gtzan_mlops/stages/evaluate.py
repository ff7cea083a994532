"""The `evaluate` stage: every trained model on the same held-out test set, and the winner, chosen
without it.

A model is a family trained on a feature set (`<family>-<feature set>`, e.g. `xgboost-both`).
The winner among the candidates (`evaluate.candidates` on each candidate feature set) is the one
with the best **selection score** its training stage recorded (params `selection`: the best
trial's validation score, or a cross-validation over train+valid that keeps the split's units
together). The test set chooses nothing: each model's best version (from
`data/train/<model>.json`) is loaded from MLflow and scored on it once, at its own level (a
segment-level model on the test segments, a clip-level one on the test clips) and per song
(segment probabilities averaged per track, as the served model votes), for the report and the
promotion gate. Every test score comes with its 95 % interval, a bootstrap over the split's
units (uncertainty.py).

Writes `reports/evaluate/evaluation.json` (every model's selection and test scores, what promote
reads), `models.csv` and `models.md` (one row per model: which number chose, which reports), for
the winner `confusion.csv` (actual, predicted: one row per test song) and `per_class_f1.csv`
(genre, f1) as DVC plots with the same two as PNG, and the key numbers as the DVC metrics file
`metrics/evaluate.json`. Only the candidates can win (the classic models are scored for
comparison).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from gtzan_mlops.cli import stage_main
from gtzan_mlops.data.splits import TEST_SUBSET
from gtzan_mlops.evaluation.model_evaluation import (
    ModelEvaluation,
    evaluate_models,
    evaluation_metrics,
    key_metrics,
)
from gtzan_mlops.evaluation.models_table import MODELS_FILE, MODELS_REPORT, models_markdown
from gtzan_mlops.evaluation.records import EVALUATION_FILE, load_family_record
from gtzan_mlops.evaluation.scoring import EvaluationError, FamilyEvaluation
from gtzan_mlops.evaluation.selection import trained_models
from gtzan_mlops.evaluation.test_data import TestData, load_test_data
from gtzan_mlops.settings.loading import resolve_path
from gtzan_mlops.settings.schema import Selection, Settings, Uncertainty


def write_plots(
    evaluation: FamilyEvaluation, output_dir: Path, classes: list[str], split: str
) -> None:
    """The winner's DVC plots data, one (actual, predicted) row per test song and the F1 per
    genre, and the same two as PNG images (logged to MLflow)."""
    from gtzan_mlops.reports import plots

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


def write_evaluation(evaluated: ModelEvaluation, classes: list[str], output_dir: Path) -> None:
    """The stage's reports: the winner's plots, the models table (CSV and Markdown) and the
    summary, evaluation.json (what promote reads)."""
    summary = evaluated.summary
    write_plots(evaluated.winner, output_dir, classes, summary["split"])
    evaluated.table.to_csv(output_dir / MODELS_FILE, index=False)
    markdown = models_markdown(evaluated.table, summary)
    (output_dir / MODELS_REPORT).write_text(markdown, encoding="utf-8")
    (output_dir / EVALUATION_FILE).write_text(json.dumps(summary, indent=2) + "\n")


def evaluate_records(
    records: dict[str, dict[str, Any] | None],
    data: TestData,
    candidates: list[str],
    selection: Selection,
    uncertainty: Uncertainty,
    classes: list[str],
    output_dir: Path,
) -> dict[str, Any]:
    """Score each model's record on the test set, choose the winner by its selection score
    (model_evaluation.evaluate_models), write the tables and plots; returns the summary."""
    from gtzan_mlops.models.zoo import load_classifier

    evaluated = evaluate_models(records, data, candidates, selection, uncertainty, load_classifier)
    write_evaluation(evaluated, classes, output_dir)
    return evaluated.summary


def run(settings: Settings, root: Path) -> dict[str, Any]:
    """Evaluate every trained model on the test set, pick the winner, write the metrics."""
    from gtzan_mlops import tracking

    paths = settings.paths
    models, candidates = trained_models(settings.evaluate, settings.train)
    records_dir = resolve_path(paths.train_records, root)
    records = {
        model: load_family_record(records_dir / f"{model}.json")
        if (records_dir / f"{model}.json").is_file()
        else None
        for model in models
    }
    tracking.use_store(root)
    output_dir = resolve_path(paths.evaluate_reports, root)
    output_dir.mkdir(parents=True, exist_ok=True)
    summary = evaluate_records(
        records,
        load_test_data(paths, root),
        candidates,
        settings.selection,
        settings.uncertainty,
        list(settings.genres),
        output_dir,
    )
    metrics_path = resolve_path(paths.metrics, root) / "evaluate.json"
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    metrics_path.write_text(json.dumps(key_metrics(summary), indent=2) + "\n")
    log_evaluation(summary, output_dir, settings.mlflow.experiment_name, root)
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
        params={"selection": summary["selection"], "subset": TEST_SUBSET},
        metrics=evaluation_metrics(summary),
        artifacts=[
            output_dir / name
            for name in (
                EVALUATION_FILE,
                MODELS_FILE,
                MODELS_REPORT,
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
    chosen, song = summary["winner_selection"], summary["winner_test"]["test_song_accuracy"]
    return (
        f"winner on the {summary['split']} split: {summary['winner']}, chosen by "
        f"{summary['selection']} {chosen['value']:.3f} [{chosen['low']:.3f}, "
        f"{chosen['high']:.3f}]; test song accuracy {song['value']:.3f} "
        f"[{song['low']:.3f}, {song['high']:.3f}]"
    )


def main(argv: list[str] | None = None) -> int:
    return stage_main("evaluate", __doc__, run, argv, errors=(EvaluationError,), describe=describe)
