"""The trials of a study: each one a nested MLflow run under the study's parent run, sampling the
search space (`train.<family>.space`), fitting on the train rows with early stopping on the valid
rows, and scored on them; Keras and XGBoost report every epoch (or few boosting rounds) and the
median pruner stops hopeless trials. A complete trial stores in Optuna what the selection score
needs (its validation metrics and outcomes), so no trial is ever refit to score it again."""

from __future__ import annotations

import logging
import time
from typing import Any

from gtzan_mlops.evaluation.scoring import (
    METRICS,
    EvaluationError,
    FamilyEvaluation,
    score_classifier,
)
from gtzan_mlops.models import zoo
from gtzan_mlops.models.study import StudySettings, finished_trials
from gtzan_mlops.models.training_data import TrainingData

log = logging.getLogger(__name__)

BUDGET_ATTR = "budget"  # epochs or boosting rounds the trial's early stopping chose
VALID_METRICS_ATTR = "valid_metrics"  # the four valid_* metrics of a complete trial
VALID_OUTCOMES_ATTR = "valid_outcomes"  # its per-song and per-row outcomes (see `outcomes`)


def evaluate_subset(
    result: zoo.FitResult, data: TrainingData, subset: str, family: str
) -> FamilyEvaluation:
    return score_classifier(
        result.model, data.level, data.classes, data.columns, data.subsets[subset], family, subset
    )


def outcomes(evaluation: FamilyEvaluation) -> dict[str, list]:
    """The per-song and per-row outcomes of a scoring, JSON-able for an Optuna user attribute:
    each row names its song by its position in `song_tracks` (shorter than the track id)."""
    position = {track: number for number, track in enumerate(evaluation.song_tracks)}
    return {
        "song_tracks": list(evaluation.song_tracks),
        "song_actual": list(evaluation.song_actual),
        "song_predicted": list(evaluation.song_predicted),
        "row_song": [position[track] for track in evaluation.row_tracks],
        "row_actual": list(evaluation.actual),
        "row_predicted": list(evaluation.predicted),
    }


def stored_attr(trial: Any, name: str, family: str) -> Any:
    """A user attribute every complete trial of this code stores."""
    if name not in trial.user_attrs:
        raise EvaluationError(
            f"{family}: trial {trial.number} stored no {name} (a study run by older code?): "
            "start a new study"
        )
    return trial.user_attrs[name]


def evaluation_of_trial(trial: Any, family: str, data: TrainingData) -> FamilyEvaluation:
    """The validation scoring a complete trial stored (`outcomes`), rebuilt for its intervals."""
    stored = stored_attr(trial, VALID_OUTCOMES_ATTR, family)
    songs = stored["song_tracks"]
    return FamilyEvaluation(
        family=family,
        level=data.level,
        metrics=dict(stored_attr(trial, VALID_METRICS_ATTR, family)),
        subset="valid",
        actual=list(stored["row_actual"]),
        predicted=list(stored["row_predicted"]),
        row_tracks=[songs[number] for number in stored["row_song"]],
        song_tracks=list(songs),
        song_actual=list(stored["song_actual"]),
        song_predicted=list(stored["song_predicted"]),
    )


def make_objective(settings: StudySettings, data: TrainingData, parent_run_id: str, tags: dict):
    """Optuna's objective: one trial, logged as a nested run of `parent_run_id`."""
    import mlflow
    import optuna

    # Trials go to their parent's experiment, whichever experiment is active in this process.
    experiment_id = mlflow.MlflowClient().get_run(parent_run_id).info.experiment_id

    def objective(trial: optuna.Trial) -> float:
        hyperparameters = zoo.suggest(trial, settings.space)
        curve: list[tuple[int, float]] = []

        def report(step: int, value: float) -> None:
            curve.append((step, value))
            trial.report(value, step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {step} (valid accuracy {value:.4f})")

        run_tags = {
            **tags,
            "optuna.study": trial.study.study_name,
            "optuna.trial": str(trial.number),
        }
        pruned: optuna.TrialPruned | None = None
        with mlflow.start_run(
            run_name=f"{settings.family}-{data.feature_set}-trial-{trial.number:03d}",
            experiment_id=experiment_id,
            parent_run_id=parent_run_id,
            tags=run_tags,
        ) as run:
            trial.set_user_attr("mlflow_run_id", run.info.run_id)
            mlflow.log_params(hyperparameters)
            try:
                result = zoo.fit_family(
                    settings.family,
                    hyperparameters,
                    data.xy("train"),
                    len(data.classes),
                    settings.train.seed,
                    valid=data.xy("valid"),
                    report=report,
                )
            except optuna.TrialPruned as error:
                # Raised after the run closes: a pruned trial is a finished run, not a failed one.
                pruned = error
            else:
                evaluation = evaluate_subset(result, data, "valid", settings.family)
                metrics = evaluation.metrics
                mlflow.log_metrics(metrics)
                # What the selection score and its interval need, without refitting the trial.
                valid_metrics = {
                    f"valid_{name}": float(metrics[f"valid_{name}"]) for name in METRICS
                }
                trial.set_user_attr(VALID_METRICS_ATTR, valid_metrics)
                trial.set_user_attr(VALID_OUTCOMES_ATTR, outcomes(evaluation))
                if result.budget is not None:
                    trial.set_user_attr(BUDGET_ATTR, int(result.budget))
                    mlflow.log_metric("budget", result.budget)
            _log_curve(curve)
            mlflow.set_tag("optuna.state", "PRUNED" if pruned else "COMPLETE")
        if pruned is not None:
            raise pruned
        return float(metrics[settings.objective_key])

    return objective


def _log_curve(curve: list[tuple[int, float]]) -> None:
    """The validation accuracy reported at each epoch (or few boosting rounds), in one batch."""
    import mlflow
    from mlflow.entities import Metric

    if curve:
        now = int(1000 * time.time())
        metrics = [Metric("valid_curve_accuracy", value, now, step) for step, value in curve]
        mlflow.MlflowClient().log_batch(mlflow.active_run().info.run_id, metrics=metrics)


def optimise(
    study: Any, settings: StudySettings, data: TrainingData, parent_run_id: str, tags: dict
) -> None:
    """Run trials until the study holds `n_trials` finished (complete or pruned) ones."""
    import optuna
    from optuna.trial import TrialState

    n_trials = settings.tuning.n_trials
    remaining = n_trials - finished_trials(study)
    if remaining <= 0:
        log.info("%s: the study already has %d finished trials", study.study_name, n_trials)
        return
    study.optimize(
        make_objective(settings, data, parent_run_id, tags),
        n_trials=remaining,
        callbacks=[
            optuna.study.MaxTrialsCallback(
                n_trials, states=(TrialState.COMPLETE, TrialState.PRUNED)
            )
        ],
        gc_after_trial=True,
    )
