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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, f1_score

from gtzan_mlops import feature_sets
from gtzan_mlops.cli import stage_main
from gtzan_mlops.config import ConfigError, resolve_path

log = logging.getLogger(__name__)

LEVELS = ("clip", "segment")
METRICS = ("accuracy", "macro_f1", "song_accuracy", "song_macro_f1")
TEST_SUBSET = "test"
EVALUATION_FILE = "evaluation.json"  # in evaluate.reports_dir: every family's test metrics
MODELS_FILE = "models.csv"  # beside it: one row per model, family x feature set
RECORD_KEYS = ("family", "flavor", "model_uri", "level", "classes", "feature_settings")


class EvaluationError(ValueError):
    """Evaluation cannot proceed; the message says which input is wrong and why."""


@dataclass
class FamilyEvaluation:
    """Test scores of one family, and the per-song outcomes behind them."""

    family: str
    level: str
    metrics: dict[str, float]
    actual: list[str] = field(default_factory=list)  # per row (clip or segment)
    predicted: list[str] = field(default_factory=list)
    song_actual: list[str] = field(default_factory=list)
    song_predicted: list[str] = field(default_factory=list)
    per_class_f1: dict[str, float] = field(default_factory=dict)


def split_label(summary: dict[str, Any]) -> str:
    """The split's label as reported next to every number; a leaky split always says so."""
    label = str(summary.get("label") or summary.get("strategy") or "unnamed-split")
    if summary.get("leaky") and "leaky" not in label.lower():
        label = f"{label}-leaky"
    return label


def load_family_record(path: Path) -> dict[str, Any]:
    """A training stage's `data/train/<family>.json`, checked for what evaluation needs."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise EvaluationError(f"{path}: no such file (was the family trained?)") from error
    except json.JSONDecodeError as error:
        raise EvaluationError(f"{path}: not valid JSON ({error})") from error
    missing = [key for key in RECORD_KEYS if key not in record]
    if missing:
        raise EvaluationError(f"{path}: missing {', '.join(missing)}")
    if record["level"] not in LEVELS:
        raise EvaluationError(f"{path}: level must be one of {LEVELS}, got {record['level']!r}")
    return record


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


def per_class_f1(actual: list[str], predicted: list[str], classes: list[str]) -> dict[str, float]:
    scores = f1_score(actual, predicted, labels=classes, average=None, zero_division=0)
    return {genre: float(score) for genre, score in zip(classes, scores, strict=True)}


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
        actual=actual,
        predicted=predicted,
        song_actual=song_actual,
        song_predicted=song_predicted,
        per_class_f1=per_class_f1(song_actual, song_predicted, list(classes)),
    )


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


@dataclass
class TestData:
    """The test rows of the active split per (feature set, level), and the sha256 of the tables
    they come from. Read from `features_dir` when first asked for, unless given in `tables` and
    `digests` (in memory)."""

    summary: dict[str, Any]
    split_sha256: str
    tables: dict[tuple[str, str], pd.DataFrame] = field(default_factory=dict)
    digests: dict[tuple[str, str], str] = field(default_factory=dict)
    features_dir: Path | None = None
    assignments: pd.DataFrame | None = None

    def rows(self, level: str, feature_set: str = feature_sets.HANDCRAFTED) -> pd.DataFrame:
        from gtzan_mlops import split

        key = (feature_set, level)
        if key not in self.tables:
            if self.features_dir is None or self.assignments is None:
                raise EvaluationError(f"no {feature_set} test rows at the {level} level")
            try:
                table = feature_sets.read_table(self.features_dir, feature_set, level)
            except FileNotFoundError as error:
                raise EvaluationError(str(error)) from error
            table = split.attach_subsets(table, self.assignments)
            self.tables[key] = table[table["subset"] == TEST_SUBSET].reset_index(drop=True)
        return self.tables[key]

    def features_sha256(self, level: str, feature_set: str = feature_sets.HANDCRAFTED) -> str:
        """sha256 of the table(s) a model of this feature set and level reads ("" if absent)."""
        key = (feature_set, level)
        if key not in self.digests:
            folder = self.features_dir
            paths = feature_sets.table_paths(folder, feature_set, level) if folder else []
            present = bool(paths) and all(path.is_file() for path in paths)
            digest = feature_sets.tables_digest(folder, feature_set, level) if present else ""
            self.digests[key] = digest
        return self.digests[key]


def feature_dir(params: dict[str, Any], root: Path) -> Path:
    """The folder of the features stage's tables."""
    return resolve_path(params.get("features", {}).get("output_dir", "data/features"), root)


def split_dir(params: dict[str, Any], root: Path) -> Path:
    return resolve_path(params.get("split", {}).get("output_dir", "data/split"), root)


def load_test_data(params: dict[str, Any], root: Path) -> TestData:
    """The test subset of the active split, from the feature tables the models trained on."""
    from gtzan_mlops import split

    folder = split_dir(params, root)
    assignments, summary = split.load_split(folder)
    return TestData(
        summary=summary,
        split_sha256=split_fingerprint(folder),
        features_dir=feature_dir(params, root),
        assignments=assignments,
    )


def split_fingerprint(folder: Path) -> str:
    """sha256 of the split assignment file (the same file the training records hash)."""
    from gtzan_mlops import split, tracking

    return tracking.file_digest(folder / split.SPLIT_FILE)


def stale_reason(record: dict[str, Any], data: TestData) -> str | None:
    """Why a family's record does not belong to the current features and split, if it does not."""
    level, feature_set = record["level"], record_feature_set(record)
    current = data.features_sha256(level, feature_set)
    if record.get("features_sha256") and record["features_sha256"] != current:
        return "trained on another version of the features"
    if record.get("split_sha256") and record["split_sha256"] != data.split_sha256:
        return "trained on another split"
    return None


def evaluate_family(record: dict[str, Any], data: TestData) -> FamilyEvaluation:
    """Load a family's logged best model and score it on the test rows of its level."""
    from gtzan_mlops.models import load_classifier

    classifier = load_classifier(record["model_uri"], record["flavor"])
    feature_set = record_feature_set(record)
    return score_classifier(
        classifier,
        record["level"],
        list(record["classes"]),
        feature_sets.columns(feature_set, int(record["feature_settings"].get("n_mfcc", 20))),
        data.rows(record["level"], feature_set),
        family=record_model(record),
    )


def record_feature_set(record: dict[str, Any]) -> str:
    """A training record's feature set (records written before feature sets: handcrafted)."""
    return str(record.get("feature_set", feature_sets.HANDCRAFTED))


def record_model(record: dict[str, Any]) -> str:
    """A training record's model name, `<family>-<feature set>`."""
    return str(
        record.get("model") or feature_sets.model_key(record["family"], record_feature_set(record))
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
    metric = str(stage.get("metric", "test_song_macro_f1"))
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
    stage, train = params.get("evaluate", {}), params.get("train", {})
    candidates = list(stage.get("candidates", []))
    families = list(stage.get("families") or train.get("families", candidates))
    sets = list(train.get("feature_sets", [feature_sets.HANDCRAFTED]))
    candidate_sets = list(dict.fromkeys([*sets, *train.get("candidate_feature_sets", [])]))
    winners = [feature_sets.model_key(f, s) for f in candidates for s in candidate_sets]
    models = [feature_sets.model_key(f, s) for f in families for s in sets]
    return list(dict.fromkeys([*models, *winners])), winners


def run(params: dict[str, Any], root: Path) -> dict[str, Any]:
    """Evaluate every trained family on the test set, pick the winner, write the metrics."""
    from gtzan_mlops import tracking

    stage = params.get("evaluate", {})
    models, candidates = trained_models(params)
    metric = selection_metric(stage)
    records_dir = resolve_path(stage.get("records_dir", "data/train"), root)
    records = {
        model: load_family_record(records_dir / f"{model}.json")
        if (records_dir / f"{model}.json").is_file()
        else None
        for model in models
    }
    tracking.use_store(root)
    output_dir = resolve_path(stage.get("reports_dir", "reports/evaluate"), root)
    summary = evaluate_records(
        records,
        load_test_data(params, root),
        candidates,
        metric,
        list(params["genres"]),
        output_dir,
    )
    metrics_path = resolve_path(stage.get("metrics", "metrics/evaluate.json"), root)
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
