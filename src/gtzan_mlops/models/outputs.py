"""What a trained model leaves behind, once its best trial is refit: the reports (optimisation
history, the test confusion matrix and per-class table), the parent MLflow run (the model with
its signature and input example, its metrics with their intervals, the selection score, the
reports), and for DVC the record evaluate and promote read and the stage's metrics file."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from gtzan_mlops.evaluation.scoring import FamilyEvaluation, per_class_table
from gtzan_mlops.features import feature_sets
from gtzan_mlops.models import zoo
from gtzan_mlops.models.refit import Refit
from gtzan_mlops.models.selection_score import selection_metrics
from gtzan_mlops.models.study import StudySettings
from gtzan_mlops.models.training_data import TrainingData
from gtzan_mlops.models.trials import VALID_METRICS_ATTR, stored_attr
from gtzan_mlops.settings.loading import resolve_path
from gtzan_mlops.settings.schema import Paths

EXAMPLE_ROWS = 5  # feature rows of the logged model's input example


@dataclass(frozen=True)
class OutputPaths:
    """Where the stage of one model writes (all declared in dvc.yaml)."""

    record: Path  # <paths.train_records>/<model>.json: what evaluate and promote read
    reports: Path  # <paths.train_reports>/<model>/: DVC plots, also logged to the parent run

    @property
    def metrics(self) -> Path:
        """Validation and test metrics, named after the split. A plain output, not a DVC metrics
        file: `dvc metrics show` and `dvc exp show` stay readable with the compact
        metrics/evaluate.json, which holds every family's test score."""
        return self.reports / "metrics.json"

    @classmethod
    def of(cls, paths: Paths, root: Path, model: str) -> OutputPaths:
        """Paths of `model` (`<family>-<feature set>`)."""
        return cls(
            record=resolve_path(paths.train_records, root) / f"{model}.json",
            reports=resolve_path(paths.train_reports, root) / model,
        )


def with_bounds(metrics: dict[str, Any], intervals: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """`metrics` with <name>_low and <name>_high after each metric that has an interval."""
    flat: dict[str, Any] = {}
    for name, value in metrics.items():
        flat[name] = value
        if name in intervals:
            flat[f"{name}_low"] = float(intervals[name]["low"])
            flat[f"{name}_high"] = float(intervals[name]["high"])
    return flat


def write_reports(
    folder: Path,
    test: FamilyEvaluation,
    history: pd.DataFrame,
    settings: StudySettings,
    data: TrainingData,
) -> None:
    """The optimisation history (CSV for `dvc plots`, PNG), the per-class test table and the
    test confusion matrix (per song) of one model."""
    from gtzan_mlops.reports import plots

    folder.mkdir(parents=True, exist_ok=True)
    history.to_csv(folder / "history.csv", index=False)
    plots.history_png(
        history,
        folder / "optuna_history.png",
        f"Optuna: {settings.family} [{data.feature_set} features, {data.label} split]",
        settings.objective_key,
    )
    per_class_table(test.song_actual, test.song_predicted, data.classes).to_csv(
        folder / "per_class_test.csv", index=False
    )
    plots.confusion_png(
        test.song_actual,
        test.song_predicted,
        data.classes,
        folder / "confusion_test.png",
        f"{settings.family} on {data.feature_set}: test songs, {data.label} split",
    )


def log_parent_run(
    parent_run_id: str,
    settings: StudySettings,
    data: TrainingData,
    refit: Refit,
    selection: dict[str, Any],
    history: pd.DataFrame,
    reports: Path,
) -> tuple[str, str]:
    """Log the model, its metrics (with intervals), the selection score and the reports to the
    parent run; returns the model's URI and the experiment id."""
    import mlflow

    with mlflow.start_run(run_id=parent_run_id) as run:
        # Params are fixed for a run's life; the parent is reused when more trials are added,
        # so what more trials (or the selection settings) can change goes into tags.
        mlflow.log_params(
            {
                "family": settings.family,
                "feature_set": data.feature_set,
                "level": data.level,
                "split": data.label,
                "objective": settings.objective_key,
                "refit_on": settings.train.refit_on,
                "seed": settings.train.seed,
            }
        )
        mlflow.set_tags(
            {
                **{f"best.{name}": str(value) for name, value in refit.hyperparameters.items()},
                "best_trial": str(refit.trial.number),
                "budget": str(refit.budget),
                "n_trials": str(settings.tuning.n_trials),
                "selection.source": selection["source"],
                "selection.metric": selection["metric"],
            }
        )
        mlflow.log_metrics(
            {
                f"best_{settings.objective_key}": float(refit.trial.value),
                **with_bounds(refit.test.metrics, refit.test_intervals),
                **selection_metrics(selection),
                "trials_pruned": float((history["state"] == "PRUNED").sum()),
            }
        )
        flavor = zoo.flavor_of(settings.family)
        example = data.xy("train")[0].head(EXAMPLE_ROWS)
        info = zoo.log_classifier(refit.result.model, flavor, example)
        mlflow.log_artifacts(str(reports))
    return info.model_uri, run.info.experiment_id


def training_record(
    study: Any,
    settings: StudySettings,
    data: TrainingData,
    refit: Refit,
    selection: dict[str, Any],
    n_trials: int,
    run_ids: tuple[str, str, str],
) -> dict[str, Any]:
    """The record evaluate and promote read; `run_ids` are the parent run, model URI and
    experiment id."""
    parent_run_id, model_uri, experiment_id = run_ids
    best = refit.trial
    return {
        "model": feature_sets.model_key(settings.family, data.feature_set),
        "family": settings.family,
        "feature_set": data.feature_set,
        "flavor": zoo.flavor_of(settings.family),
        "run_id": parent_run_id,
        "model_uri": model_uri,
        "experiment_id": experiment_id,
        "level": data.level,
        "split": {
            "strategy": data.summary.get("strategy"),
            "label": data.label,
            "leaky": data.leaky,
        },
        "features_sha256": data.features_sha256,
        "split_sha256": data.split_sha256,
        "feature_settings": data.feature_settings,
        "classes": data.classes,
        "study": study.study_name,
        "best_trial": best.number,
        "best_params": best.params,
        "budget": refit.budget,
        "n_trials": n_trials,
        "val_metrics": dict(stored_attr(best, VALID_METRICS_ATTR, settings.family)),
        "selection": selection,
        "test_metrics": refit.test.metrics,
        "test_intervals": refit.test_intervals,
    }


def write_outputs(record: dict[str, Any], paths: OutputPaths) -> None:
    """The record evaluate reads and the stage's metrics file (split label first: every number
    names its split; each test metric followed by its interval's _low and _high)."""
    for path in (paths.record, paths.metrics):
        path.parent.mkdir(parents=True, exist_ok=True)
    paths.record.write_text(json.dumps(record, indent=2) + "\n")
    metrics = {
        "model": record["model"],
        "feature_set": record["feature_set"],
        "split": record["split"]["label"],
        "leaky": record["split"]["leaky"],
        "level": record["level"],
        "trials": record["n_trials"],
        **record["val_metrics"],
        "selection_source": record["selection"]["source"],
        **selection_metrics(record["selection"]),
        **with_bounds(record["test_metrics"], record["test_intervals"]),
    }
    paths.metrics.write_text(json.dumps(metrics, indent=2) + "\n")
