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
import logging
from pathlib import Path
from typing import Any

import pandas as pd

from gtzan_mlops.cli import stage_main
from gtzan_mlops.data.splits import TEST_SUBSET, split_label
from gtzan_mlops.evaluation.records import (
    EVALUATION_FILE,
    load_family_record,
    record_feature_set,
    record_model,
    stale_reason,
)
from gtzan_mlops.evaluation.scoring import (
    EvaluationError,
    FamilyEvaluation,
    SelectionSettings,
    score_classifier,
    score_intervals,
)
from gtzan_mlops.evaluation.test_data import TestData, load_test_data
from gtzan_mlops.evaluation.uncertainty import BootstrapSettings
from gtzan_mlops.features import feature_sets
from gtzan_mlops.reports import markdown
from gtzan_mlops.settings.loading import resolve_path

log = logging.getLogger(__name__)

MODELS_FILE = "models.csv"  # beside it: one row per model, family x feature set
MODELS_REPORT = "models.md"  # the same as a readable table
REPORTED = ("test_song_accuracy", "test_song_macro_f1", "test_accuracy")  # with intervals
SCORE_DIGITS = 9  # selection scores equal to this many decimals are a tie


def selection_of(record: dict[str, Any], rule: SelectionSettings) -> dict[str, Any]:
    """A training record's selection score, if it was computed by `rule`."""
    selection = record.get("selection")
    if not selection:
        raise EvaluationError(
            f"{record_model(record)}: its training record has no selection score (trained by "
            "an older version of the train stage); rerun train"
        )
    if not rule.same_rule(str(selection["source"]), str(selection["metric"])):
        raise EvaluationError(
            f"{record_model(record)}: its selection score is {selection['source']} "
            f"{selection['metric']}, params ask for {rule.describe()}; rerun train (dvc repro "
            "does)"
        )
    return selection


def choose_winner(evaluations: dict[str, dict[str, Any]], candidates: list[str]) -> str:
    """The candidate with the highest selection score (never a test score); ties go to the
    earlier candidate in the list."""
    scored = [name for name in candidates if name in evaluations]
    if not scored:
        raise EvaluationError(
            f"none of the candidate models {candidates} was evaluated "
            f"(evaluated: {sorted(evaluations)})"
        )
    for name in scored:
        if "value" not in evaluations[name].get("selection", {}):
            raise EvaluationError(f"{name}: no selection score")
    # Equal scores computed in another order can differ in their last bits: rounded, they tie
    # (on 10 validation songs, ties are common), and the earlier candidate wins.
    return max(
        scored,
        key=lambda name: (
            round(float(evaluations[name]["selection"]["value"]), SCORE_DIGITS),
            -scored.index(name),
        ),
    )


def evaluate_family(record: dict[str, Any], data: TestData) -> FamilyEvaluation:
    """Load a family's logged best model and score it on the test rows of its level."""
    from gtzan_mlops.models.zoo import load_classifier

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


def evaluate_records(
    records: dict[str, dict[str, Any] | None],
    data: TestData,
    candidates: list[str],
    rule: SelectionSettings,
    bootstrap: BootstrapSettings,
    classes: list[str],
    output_dir: Path,
) -> dict[str, Any]:
    """Score each model's record on the test set, choose the winner by its selection score,
    write the tables and plots.

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
        selection = selection_of(record, rule)
        evaluation = evaluate_family(record, data)
        details[name] = evaluation
        results[name] = {
            "family": record["family"],
            "feature_set": record_feature_set(record),
            "split": label,
            "level": record["level"],
            "candidate": name in candidates,
            "run_id": record.get("run_id"),
            "selection": selection,
            **evaluation.metrics,
            "test_intervals": score_intervals(evaluation, data.units, bootstrap),
        }
        log.info("%s (%s split): %s", name, label, evaluation.metrics)

    winner = choose_winner(results, candidates)
    write_plots(details[winner], output_dir, classes, label)
    table = models_table(results, winner)
    table.to_csv(output_dir / MODELS_FILE, index=False)
    summary = {
        "split": label,
        "split_strategy": data.summary.get("strategy"),
        "leaky": bool(data.summary.get("leaky", False)),
        "subset": TEST_SUBSET,
        "selection": rule.describe(),
        "selection_source": rule.source,
        "selection_metric": rule.metric,
        "uncertainty_level": bootstrap.level,
        "winner": winner,
        "winner_selection": results[winner]["selection"],
        "winner_test": {metric: results[winner]["test_intervals"][metric] for metric in REPORTED},
        "families": results,
        "skipped": skipped,
    }
    (output_dir / MODELS_REPORT).write_text(models_markdown(table, summary), encoding="utf-8")
    (output_dir / EVALUATION_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


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
    """Evaluate every trained model on the test set, pick the winner, write the metrics."""
    from gtzan_mlops import tracking

    paths = params["paths"]
    models, candidates = trained_models(params)
    records_dir = resolve_path(paths["train_records"], root)
    records = {
        model: load_family_record(records_dir / f"{model}.json")
        if (records_dir / f"{model}.json").is_file()
        else None
        for model in models
    }
    tracking.use_store(root)
    output_dir = resolve_path(paths["evaluate_reports"], root)
    output_dir.mkdir(parents=True, exist_ok=True)
    summary = evaluate_records(
        records,
        load_test_data(params, root),
        candidates,
        SelectionSettings.from_params(params),
        BootstrapSettings.from_params(params),
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


def evaluation_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """`<model>.selection_<metric>` and every `<model>.test_<metric>`, the reported ones with
    `_low` and `_high` beside them."""
    metrics: dict[str, float] = {}
    for name, scores in summary["families"].items():
        selection = scores["selection"]
        metrics[f"{name}.selection_{selection['metric']}"] = float(selection["value"])
        for metric, value in scores.items():
            if metric.startswith(f"{TEST_SUBSET}_") and isinstance(value, int | float):
                metrics[f"{name}.{metric}"] = float(value)
        for metric, interval in scores["test_intervals"].items():
            metrics[f"{name}.{metric}_low"] = float(interval["low"])
            metrics[f"{name}.{metric}_high"] = float(interval["high"])
    return metrics


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
