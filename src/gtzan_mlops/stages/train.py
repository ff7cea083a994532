"""The `train` stage of one model family: an Optuna study, every trial a nested MLflow run.

    gtzan-mlops train --family xgboost [--features both] [--n-trials N] [--workers N]
    gtzan-mlops train --family xgboost --join        # one more worker for a running stage

A model is a family on a feature set (`handcrafted`, `musicnn` or `both`): its name
`<family>-<feature set>` names its stage, its record, its reports and its MLflow runs.

1. The active split (`paths.split`) says which rows train, validate and test, and the level the
   models work at (whole clips, or 3 s segments voted per song).
2. An Optuna study maximises the validation metric `train.objective`, sampling the search space
   `train.<family>.space` with a seeded TPE sampler; the first trial is the source study's
   settings (`train.<family>.defaults`). Keras and XGBoost report every epoch (or few boosting
   rounds) and the median pruner stops hopeless trials.
3. The study lives in persistent storage that several processes can share (journal files under
   `optuna-journals/`, or an RDB given by `OPTUNA_STORAGE`), named after everything that decides its
   trials: family, search space, seed, objective, the data and split files (sha256) and the
   training code. So rerunning the stage after an interruption finishes the same study, raising
   `n_trials` adds trials to it, and changing anything else starts a new one.
4. MLflow: one parent run per study (`train-<family> [<split label>]`, reused on resume) and one
   nested run per trial with its hyperparameters, validation metrics and learning curve; tags
   name the git commit, the DVC data hash, the split, and the DVC experiment if any.
5. The selection score (params `selection`), what evaluate chooses the winner by, on data the
   test never touches: the best trial's `selection.metric` on the valid subset, or (source
   `cross_validation`) its hyperparameters refit on `selection.folds` folds of train+valid that
   keep the split's units together, scored once on the pooled out-of-fold predictions. Each
   score carries its bootstrap interval over the split's units (params `uncertainty`).
6. The best trial is refit (on train+valid by default, for the epochs/rounds its early stopping
   chose) and logged as an MLflow model with signature and input example, with its test
   metrics and their intervals, a per-class precision/recall/F1 table and a confusion matrix.
7. Outputs for DVC: `<paths.train_records>/<model>.json` (the record evaluate and promote read)
   and `<paths.train_reports>/<model>/`: metrics.json, the optimisation history (history.csv, and
   optuna_history.png), the test confusion matrix and per-class table, also in MLflow.

Determinism: with `resources.train.workers: 1` the same params, data and code give the same
trials and model (seeded sampler, NumPy/Python/TensorFlow seeds with TF op determinism, seeded
estimators, single-threaded XGBoost). Several workers finish sooner but in an order that varies.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gtzan_mlops import tracking
from gtzan_mlops.cli import stage_arguments, stage_main
from gtzan_mlops.data.splits import (
    SUBSETS,
    feature_dir,
    load_split,
    split_dir,
    split_fingerprint,
    split_label,
    unit_of_track,
)
from gtzan_mlops.evaluation.scoring import (
    METRICS,
    EvaluationError,
    FamilyEvaluation,
    SelectionSettings,
    evaluation_interval,
    per_class_table,
    score_classifier,
    score_intervals,
    score_probabilities,
)
from gtzan_mlops.evaluation.test_data import split_rows
from gtzan_mlops.evaluation.uncertainty import BootstrapSettings, Interval
from gtzan_mlops.features import feature_sets
from gtzan_mlops.features.handcrafted import FeatureSettings
from gtzan_mlops.models import zoo
from gtzan_mlops.settings.loading import ConfigError, resolve_path

log = logging.getLogger(__name__)

PARENT_RUN_ATTR = "mlflow_parent_run_id"
BUDGET_ATTR = "budget"  # epochs or boosting rounds the trial's early stopping chose
VALID_METRICS_ATTR = "valid_metrics"  # the four valid_* metrics of a complete trial
VALID_OUTCOMES_ATTR = "valid_outcomes"  # its per-song and per-row outcomes (see `outcomes`)
CV_SUBSET = "cv"  # metric prefix of the pooled out-of-fold scores
EXAMPLE_ROWS = 5


@dataclass(frozen=True)
class TrainingData:
    """The rows of each subset at the split's level, and what identifies them."""

    level: str
    subsets: dict[str, pd.DataFrame]  # train / valid / test
    classes: list[str]
    feature_set: str
    columns: list[str]  # the model's input columns, in order
    summary: dict[str, Any]  # the split's summary.json
    features_sha256: str
    split_sha256: str
    feature_settings: dict[str, Any]  # FeatureSettings of the tables, stored with the model
    units: dict[str, str] = field(default_factory=dict)  # track -> the split's unit

    @property
    def label(self) -> str:
        return split_label(self.summary)

    def xy(self, subset: str) -> tuple[pd.DataFrame, np.ndarray]:
        rows = self.subsets[subset]
        index = {genre: number for number, genre in enumerate(self.classes)}
        return rows[self.columns], rows["genre"].map(index).to_numpy()

    def train_and_valid(self) -> tuple[pd.DataFrame, np.ndarray]:
        train_x, train_y = self.xy("train")
        valid_x, valid_y = self.xy("valid")
        return pd.concat([train_x, valid_x], ignore_index=True), np.concatenate([train_y, valid_y])

    def train_and_valid_rows(self) -> pd.DataFrame:
        """The train then valid rows, in the order of `train_and_valid`."""
        return pd.concat([self.subsets["train"], self.subsets["valid"]], ignore_index=True)


def load_training_data(
    params: dict[str, Any], root: Path, feature_set: str = feature_sets.HANDCRAFTED
) -> TrainingData:
    folder = split_dir(params, root)
    assignments, summary = load_split(folder)
    level = summary["level"]
    features = feature_dir(params, root)
    path = features / feature_sets.TABLES[feature_sets.HANDCRAFTED][level]
    table = split_rows(features, assignments, feature_set, level)
    classes = list(params["genres"])
    unknown = sorted(set(table["genre"]) - set(classes))
    if unknown:
        raise ConfigError(f"{path}: genres {unknown} are not in params genres {classes}")
    subsets = {
        subset: table[table["subset"] == subset].reset_index(drop=True) for subset in SUBSETS
    }
    for subset, rows in subsets.items():
        if rows.empty:
            raise EvaluationError(f"the {split_label(summary)} split has no {subset} rows")
    return TrainingData(
        level=level,
        subsets=subsets,
        classes=classes,
        feature_set=feature_set,
        columns=feature_sets.columns(feature_set, int(params["features"]["n_mfcc"])),
        summary=summary,
        features_sha256=feature_sets.tables_digest(features, feature_set, level),
        split_sha256=split_fingerprint(folder),
        # What made the tables, checked against what params ask for.
        feature_settings=feature_sets.made_with(
            features, FeatureSettings.from_params(params)
        ).to_dict(),
        units=unit_of_track(assignments),
    )


# --- settings -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FamilySettings:
    family: str
    n_trials: int
    space: dict[str, Any]
    defaults: dict[str, Any]
    seed: int
    objective: str  # one of evaluate.METRICS, measured on the valid subset
    refit_on: str
    experiment_name: str
    storage: str | None
    workers: int
    n_startup_trials: int
    n_warmup_steps: int

    @classmethod
    def from_params(cls, params: dict[str, Any], family: str) -> FamilySettings:
        stage = params["train"]
        if family not in zoo.FAMILIES:
            raise ConfigError(f"unknown family {family!r}; known: {', '.join(zoo.FAMILIES)}")
        if family not in stage:
            raise ConfigError(f"params.yaml: missing setting 'train.{family}'")
        own = stage[family]
        objective = str(stage["objective"])
        if objective not in METRICS:
            raise ConfigError(f"train.objective must be one of {METRICS}, got {objective!r}")
        refit_on = str(stage["refit_on"])
        if refit_on not in ("train", "train_valid"):
            raise ConfigError(f"train.refit_on must be train or train_valid, got {refit_on!r}")
        pruner = stage["pruner"]
        settings = cls(
            family=family,
            n_trials=int(own["n_trials"]),
            space=dict(own["space"]),
            defaults=dict(own["defaults"]),
            seed=int(stage["seed"]),
            objective=objective,
            refit_on=refit_on,
            experiment_name=tracking.experiment_name(params),
            storage=stage["optuna_storage"],
            workers=int(params["resources"]["train"]["workers"]),
            n_startup_trials=int(pruner["n_startup_trials"]),
            n_warmup_steps=int(pruner["n_warmup_steps"]),
        )
        if settings.n_trials < 1:
            raise ConfigError(f"train.{family}.n_trials must be at least 1")
        return settings

    @property
    def objective_key(self) -> str:
        return f"valid_{self.objective}"


def code_fingerprint() -> str:
    """sha256 of the modules that decide a trial's outcome: everything the stage imports."""
    return tracking.source_digest(*tracking.compute_closure("stages.train"))


def study_name(settings: FamilySettings, data: TrainingData) -> str:
    """`<family>-<split label>-<fingerprint>`: one study per thing that changes its trials or the
    refit. `n_trials` and `workers` are left out, so raising them continues the study."""
    decisive = {
        "family": settings.family,
        "feature_set": data.feature_set,
        "space": settings.space,
        "defaults": settings.defaults,
        "seed": settings.seed,
        "objective": settings.objective,
        "refit_on": settings.refit_on,  # logged as a param of the parent run, which is immutable
        "pruner": [settings.n_startup_trials, settings.n_warmup_steps],
        "classes": data.classes,
        "features": data.features_sha256,
        "split": data.split_sha256,
        "code": code_fingerprint(),
    }
    payload = json.dumps(decisive, sort_keys=True, default=str).encode()
    key = feature_sets.model_key(settings.family, data.feature_set)
    return f"{key}-{data.label}-{hashlib.sha256(payload).hexdigest()[:12]}"


def open_study(
    settings: FamilySettings, name: str, root: Path, worker: int = 0, create: bool = True
):
    import optuna

    storage = tracking.optuna_storage(settings.family, root, settings.storage)
    # Each worker samples from its own seeded stream, or parallel workers would repeat trials.
    sampler = optuna.samplers.TPESampler(seed=settings.seed + worker)
    pruner = optuna.pruners.MedianPruner(
        n_startup_trials=settings.n_startup_trials, n_warmup_steps=settings.n_warmup_steps
    )
    if not create:
        try:
            return optuna.load_study(
                study_name=name, storage=storage, sampler=sampler, pruner=pruner
            )
        except KeyError as error:
            raise ConfigError(
                f"no Optuna study {name!r} in the storage: start the stage first (a joining "
                "worker needs the same data, params and code as the stage)"
            ) from error
    return optuna.create_study(
        study_name=name,
        storage=storage,
        direction="maximize",
        sampler=sampler,
        pruner=pruner,
        load_if_exists=True,
    )


def finished_trials(study: Any) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def within_space(spec: Any, value: Any) -> bool:
    if not isinstance(spec, dict):
        return False
    if spec.get("type") == "categorical":
        return value in spec.get("choices", [])
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return float(spec["low"]) <= float(value) <= float(spec["high"])


def enqueue_defaults(study: Any, settings: FamilySettings) -> None:
    """The source study's settings as the first trial of a new study (those within the space)."""
    if study.trials:
        return
    chosen = {
        name: value
        for name, value in settings.defaults.items()
        if within_space(settings.space.get(name), value)
    }
    if chosen:
        study.enqueue_trial(chosen, skip_if_exists=True)


# --- the objective --------------------------------------------------------------------------


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


def evaluation_of_trial(
    trial: Any, settings: FamilySettings, data: TrainingData
) -> FamilyEvaluation:
    """The validation scoring a complete trial stored (`outcomes`), rebuilt for its intervals."""
    stored = stored_attr(trial, VALID_OUTCOMES_ATTR, settings.family)
    songs = stored["song_tracks"]
    return FamilyEvaluation(
        family=settings.family,
        level=data.level,
        metrics=dict(stored_attr(trial, VALID_METRICS_ATTR, settings.family)),
        subset="valid",
        actual=list(stored["row_actual"]),
        predicted=list(stored["row_predicted"]),
        row_tracks=[songs[number] for number in stored["row_song"]],
        song_tracks=list(songs),
        song_actual=list(stored["song_actual"]),
        song_predicted=list(stored["song_predicted"]),
    )


def make_objective(settings: FamilySettings, data: TrainingData, parent_run_id: str, tags: dict):
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
                    settings.seed,
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
    study: Any, settings: FamilySettings, data: TrainingData, parent_run_id: str, tags: dict
) -> None:
    """Run trials until the study holds `n_trials` finished (complete or pruned) ones."""
    import optuna
    from optuna.trial import TrialState

    remaining = settings.n_trials - finished_trials(study)
    if remaining <= 0:
        log.info(
            "%s: the study already has %d finished trials", study.study_name, settings.n_trials
        )
        return
    study.optimize(
        make_objective(settings, data, parent_run_id, tags),
        n_trials=remaining,
        callbacks=[
            optuna.study.MaxTrialsCallback(
                settings.n_trials, states=(TrialState.COMPLETE, TrialState.PRUNED)
            )
        ],
        gc_after_trial=True,
    )


# --- the selection score --------------------------------------------------------------------


def best_configuration(
    study: Any, settings: FamilySettings
) -> tuple[Any, dict[str, Any], int | None]:
    """The best trial, its hyperparameters (with the space's fixed values) and the epochs or
    boosting rounds its early stopping chose (None for the classic families)."""
    best = study.best_trial
    return best, {**zoo.fixed(settings.space), **best.params}, best.user_attrs.get(BUDGET_ATTR)


def selection_folds(
    rows: pd.DataFrame, units: Mapping[str, str], folds: int, seed: int
) -> list[np.ndarray]:
    """The positions in `rows` each of `folds` folds holds out: stratified by genre, every unit
    of the split (a track missing from `units` is its own) in exactly one fold, so no song, copy
    or artist is both fitted and scored."""
    from sklearn.model_selection import StratifiedGroupKFold

    groups = rows["track_id"].astype(str).map(lambda track: units.get(track, track))
    n_units = int(groups.nunique())
    if n_units < folds:
        raise ConfigError(
            f"selection.folds is {folds} but train+valid holds only {n_units} units (songs, or "
            "the groups the split keeps together): lower selection.folds or set "
            "selection.source: validation"
        )
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    split = splitter.split(np.zeros(len(rows)), rows["genre"].astype(str), groups)
    return [held_out for _, held_out in split]


@dataclass(frozen=True)
class CrossValidation:
    """Out-of-fold predictions of one configuration on the train+valid rows."""

    rows: pd.DataFrame  # train then valid rows (TrainingData.train_and_valid_rows)
    folds: list[np.ndarray]  # positions in `rows` each fold held out
    probabilities: np.ndarray  # row i from the model of the fold that held it out
    evaluation: FamilyEvaluation  # the pooled predictions scored once (subset CV_SUBSET)


def cross_validate(
    settings: FamilySettings,
    data: TrainingData,
    hyperparameters: dict[str, Any],
    budget: int | None,
    choice: SelectionSettings,
) -> CrossValidation:
    """`hyperparameters` fitted on all folds but one, in turn, for the `budget` the best trial's
    early stopping chose (as the train+valid refit: no fold has rows to stop early on); the
    held-out predictions pooled and scored once, so songs are voted exactly as on the test
    rows."""
    rows = data.train_and_valid_rows()
    features, labels = data.train_and_valid()
    folds = selection_folds(rows, data.units, choice.folds, choice.seed)
    probabilities = np.full((len(rows), len(data.classes)), np.nan)
    for number, held_out in enumerate(folds, start=1):
        kept = np.setdiff1d(np.arange(len(rows)), held_out)
        absent = sorted(set(data.classes) - set(rows["genre"].iloc[kept]))
        if absent:
            raise ConfigError(
                f"selection fold {number} of {len(folds)} holds out every train+valid song of "
                f"{absent}: lower selection.folds or set selection.source: validation"
            )
        result = zoo.fit_family(
            settings.family,
            hyperparameters,
            (features.iloc[kept].reset_index(drop=True), labels[kept]),
            len(data.classes),
            settings.seed,
            budget=budget,
        )
        probabilities[held_out] = result.model.predict_proba(
            features.iloc[held_out].reset_index(drop=True)
        )
    evaluation = score_probabilities(
        probabilities, data.level, data.classes, rows, settings.family, CV_SUBSET
    )
    return CrossValidation(rows, folds, probabilities, evaluation)


def selection_score(
    study: Any,
    settings: FamilySettings,
    data: TrainingData,
    choice: SelectionSettings,
    bootstrap: BootstrapSettings,
) -> dict[str, Any]:
    """The score evaluate chooses the winner by (record["selection"]), with its interval over
    the units of what was scored; the test rows play no part."""
    best, hyperparameters, budget = best_configuration(study, settings)
    if choice.source == "validation":
        evaluation = evaluation_of_trial(best, settings, data)
        subset, folds = "valid", None
    else:
        evaluation = cross_validate(settings, data, hyperparameters, budget, choice).evaluation
        subset, folds = f"train+valid, {choice.folds} folds", choice.folds
    interval = evaluation_interval(evaluation, choice.metric, data.units, bootstrap)
    return {
        "source": choice.source,
        "metric": choice.metric,
        "subset": subset,
        **interval.to_dict(),
        "folds": folds,
    }


def selection_metrics(selection: dict[str, Any]) -> dict[str, float | int]:
    """The selection score as flat metrics: selection_<metric>, _low, _high (and _folds)."""
    name = f"selection_{selection['metric']}"
    flat = {
        name: float(selection["value"]),
        f"{name}_low": float(selection["low"]),
        f"{name}_high": float(selection["high"]),
    }
    if selection.get("folds"):
        flat["selection_folds"] = int(selection["folds"])
    return flat


def with_bounds(metrics: dict[str, Any], intervals: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """`metrics` with <name>_low and <name>_high after each metric that has an interval."""
    flat: dict[str, Any] = {}
    for name, value in metrics.items():
        flat[name] = value
        if name in intervals:
            flat[f"{name}_low"] = float(intervals[name]["low"])
            flat[f"{name}_high"] = float(intervals[name]["high"])
    return flat


# --- the stage ------------------------------------------------------------------------------


def parent_run(study: Any, settings: FamilySettings, data: TrainingData, tags: dict) -> str:
    """The study's parent run: the run `mlflow run` launched this stage in, else the one the
    study recorded if it still exists, else a new one. Recorded in the study for its workers."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    run_name = f"train-{settings.family} [{data.feature_set} features, {data.label} split]"
    run_tags = {**tags, "gtzan.stage": "train", "optuna.study": study.study_name}
    chosen = tracking.launched_run_id()
    if chosen:
        client.update_run(chosen, name=run_name)
        for key, value in run_tags.items():
            client.set_tag(chosen, key, value)
    else:
        known = study.user_attrs.get(PARENT_RUN_ATTR)
        if known:
            try:
                client.get_run(known)
                return known
            except MlflowException:
                log.warning(
                    "parent run %s of %s is gone: starting a new one", known, study.study_name
                )
        experiment = tracking.ensure_experiment(settings.experiment_name)
        chosen = client.create_run(experiment, run_name=run_name, tags=run_tags).info.run_id
    study.set_user_attr(PARENT_RUN_ATTR, chosen)
    return chosen


def history_table(study: Any) -> pd.DataFrame:
    """trial, state, value (the last reported value for a pruned trial), best_value so far."""
    from optuna.trial import TrialState

    rows = []
    best = -np.inf
    for trial in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        if trial.state == TrialState.COMPLETE:
            value = float(trial.value)
            best = max(best, value)
        elif trial.state == TrialState.PRUNED and trial.intermediate_values:
            value = float(trial.intermediate_values[max(trial.intermediate_values)])
        else:
            continue
        rows.append(
            {
                "trial": trial.number,
                "state": trial.state.name,
                "value": value,
                "best_value": best if np.isfinite(best) else np.nan,
            }
        )
    return pd.DataFrame(rows, columns=["trial", "state", "value", "best_value"])


@dataclass(frozen=True)
class OutputPaths:
    """Where the stage of one family writes (all declared in dvc.yaml)."""

    record: Path  # <paths.train_records>/<model>.json: what evaluate and promote read
    reports: Path  # <paths.train_reports>/<model>/: DVC plots, also logged to the parent run

    @property
    def metrics(self) -> Path:
        """Validation and test metrics, named after the split. A plain output, not a DVC metrics
        file: `dvc metrics show` and `dvc exp show` stay readable with the compact
        metrics/evaluate.json, which holds every family's test score."""
        return self.reports / "metrics.json"

    @classmethod
    def from_params(cls, params: dict[str, Any], root: Path, model: str) -> OutputPaths:
        """Paths of `model` (`<family>-<feature set>`)."""
        paths = params["paths"]
        return cls(
            record=resolve_path(paths["train_records"], root) / f"{model}.json",
            reports=resolve_path(paths["train_reports"], root) / model,
        )


def write_reports(
    folder: Path,
    test: FamilyEvaluation,
    history: pd.DataFrame,
    settings: FamilySettings,
    data: TrainingData,
) -> None:
    """The optimisation history (CSV for `dvc plots`, PNG), the per-class test table and the
    test confusion matrix (per song) of one family."""
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


@dataclass(frozen=True)
class Refit:
    """The best trial refit and scored on the test rows."""

    trial: Any  # the study's best trial
    hyperparameters: dict[str, Any]
    budget: int | None
    result: zoo.FitResult
    test: FamilyEvaluation
    test_intervals: dict[str, dict[str, Any]]  # score_intervals of `test`


def refit_best(
    study: Any, settings: FamilySettings, data: TrainingData, bootstrap: BootstrapSettings
) -> Refit:
    """Refit the best trial (on `settings.refit_on`) and score it on the test rows."""
    best, hyperparameters, budget = best_configuration(study, settings)
    n_classes = len(data.classes)
    if settings.refit_on == "train_valid":
        result = zoo.fit_family(
            settings.family,
            hyperparameters,
            data.train_and_valid(),
            n_classes,
            settings.seed,
            budget=budget,
        )
    else:
        result = zoo.fit_family(
            settings.family,
            hyperparameters,
            data.xy("train"),
            n_classes,
            settings.seed,
            valid=data.xy("valid"),
        )
    test = evaluate_subset(result, data, "test", settings.family)
    intervals = score_intervals(test, data.units, bootstrap)
    return Refit(best, hyperparameters, budget, result, test, intervals)


def log_parent_run(
    parent_run_id: str,
    settings: FamilySettings,
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
                "refit_on": settings.refit_on,
                "seed": settings.seed,
            }
        )
        mlflow.set_tags(
            {
                **{f"best.{name}": str(value) for name, value in refit.hyperparameters.items()},
                "best_trial": str(refit.trial.number),
                "budget": str(refit.budget),
                "n_trials": str(settings.n_trials),
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
    settings: FamilySettings,
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
            "leaky": bool(data.summary.get("leaky", False)),
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


def refit_and_log(
    study: Any,
    settings: FamilySettings,
    data: TrainingData,
    parent_run_id: str,
    reports: Path,
    bootstrap: BootstrapSettings,
    selection: dict[str, Any],
) -> dict[str, Any]:
    """Refit the best trial and score it on the test rows, write its reports, log all to the
    parent run; returns the model's record (write_outputs) with `selection` (selection_score)."""
    refit = refit_best(study, settings, data, bootstrap)
    history = history_table(study)
    write_reports(reports, refit.test, history, settings, data)
    model_uri, experiment_id = log_parent_run(
        parent_run_id, settings, data, refit, selection, history, reports
    )
    return training_record(
        study,
        settings,
        data,
        refit,
        selection,
        len(history),
        (parent_run_id, model_uri, experiment_id),
    )


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


def start_workers(
    count: int,
    family: str,
    name: str,
    n_trials: int,
    root: Path,
    stage_arguments: list[str],
    feature_set: str = feature_sets.HANDCRAFTED,
) -> list[subprocess.Popen]:
    """`count` processes joining study `name` (each `gtzan-mlops train --join`), reading the
    same params (`stage_arguments`: --params and --set of this command)."""
    processes = []
    for worker in range(1, count + 1):
        command = [
            sys.executable,
            "-m",
            "gtzan_mlops",
            "train",
            "--family",
            family,
            "--features",
            feature_set,
            "--join",
            "--study-name",
            name,
            "--worker",
            str(worker),
            "--n-trials",
            str(n_trials),
            *stage_arguments,
        ]
        processes.append(subprocess.Popen(command, cwd=root))
    return processes


def run(
    params: dict[str, Any],
    root: Path,
    family: str,
    feature_set: str = feature_sets.HANDCRAFTED,
    n_trials: int | None = None,
    workers: int | None = None,
    join: bool = False,
    worker: int | None = None,
    name: str | None = None,
    stage_arguments: list[str] | None = None,
) -> dict[str, Any] | None:
    """Tune and train `family`; with `join`, only run trials of the stage's running study."""
    import dataclasses

    import optuna

    settings = FamilySettings.from_params(params, family)
    if n_trials:
        settings = dataclasses.replace(settings, n_trials=int(n_trials))
    if workers:
        settings = dataclasses.replace(settings, workers=int(workers))
    choice = SelectionSettings.from_params(params)
    bootstrap = BootstrapSettings.from_params(params)
    data = load_training_data(params, root, feature_set)
    if choice.source == "cross_validation" and not join:
        # Too few units for the folds fails now, not after the study.
        selection_folds(data.train_and_valid_rows(), data.units, choice.folds, choice.seed)
    tracking.use_store(root)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tags = {
        **tracking.run_tags(root),
        "family": family,
        "feature_set": feature_set,
        "model": feature_sets.model_key(family, feature_set),
        "split": data.label,
        "leaky": str(bool(data.summary.get("leaky", False))).lower(),
        "level": data.level,
        "features_sha256": data.features_sha256,
        "split_sha256": data.split_sha256,
    }
    name = name or study_name(settings, data)

    if join:
        # A worker started by hand (another machine) gets a sampler stream of its own: with the
        # stage's seed it would propose the same parameters as the stage's own process.
        stream = worker if worker is not None else os.getpid()
        study = open_study(settings, name, root, worker=stream, create=False)
        parent = study.user_attrs.get(PARENT_RUN_ATTR)
        if not parent:
            raise ConfigError(f"study {name!r} has no parent run yet: start the stage first")
        optimise(study, settings, data, parent, tags)
        return None

    study = open_study(settings, name, root)
    enqueue_defaults(study, settings)
    parent = parent_run(study, settings, data, tags)
    log.info(
        "%s: study %s, %d of %d trials done, parent run %s",
        family,
        name,
        finished_trials(study),
        settings.n_trials,
        parent,
    )
    if settings.workers > 1:
        arguments = stage_arguments or ["--params", str(root / "params.yaml")]
        processes = start_workers(
            settings.workers, family, name, settings.n_trials, root, arguments, feature_set
        )
        failed = [process.args for process in processes if process.wait() != 0]
        if failed:
            raise RuntimeError(f"{len(failed)} Optuna worker(s) failed: {failed}")
    else:
        optimise(study, settings, data, parent, tags)
    if not any(trial.state.name == "COMPLETE" for trial in study.get_trials(deepcopy=False)):
        raise EvaluationError(f"{family}: no trial of study {name} completed")
    paths = OutputPaths.from_params(params, root, feature_sets.model_key(family, feature_set))
    selection = selection_score(study, settings, data, choice, bootstrap)
    record = refit_and_log(study, settings, data, parent, paths.reports, bootstrap, selection)
    write_outputs(record, paths)
    return record


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--family", required=True, choices=zoo.FAMILIES)
    parser.add_argument(
        "--features",
        default=feature_sets.HANDCRAFTED,
        choices=feature_sets.FEATURE_SETS,
        help="the feature set to train on (default: handcrafted)",
    )
    parser.add_argument(
        "--n-trials", type=float, default=0, help="trials in the study (0: params' n_trials)"
    )
    parser.add_argument(
        "--workers", type=int, default=0, help="Optuna worker processes (0: params' workers)"
    )
    parser.add_argument(
        "--join",
        action="store_true",
        help="only run trials of the stage's study (it must exist), e.g. on another machine",
    )
    parser.add_argument("--study-name", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)


def shown(interval: dict[str, Any]) -> str:
    """`value [low, high]` of an Interval stored as a dict."""
    return Interval(**{item.name: interval[item.name] for item in fields(Interval)}).describe()


def describe(record: dict[str, Any]) -> str:
    selection = record["selection"]
    return (
        f"{record['family']} on {record['feature_set']} features, {record['split']['label']} "
        f"split ({record['level']} level): "
        f"selection {selection['metric']} {shown(selection)} ({selection['subset']}), "
        f"test song accuracy {shown(record['test_intervals']['test_song_accuracy'])}, "
        f"model {record['model_uri']}"
    )


def main(argv: list[str] | None = None) -> int:
    return stage_main(
        "train",
        __doc__,
        lambda params, root, args: run(
            params,
            root,
            args.family,
            feature_set=args.features,
            n_trials=int(args.n_trials),
            workers=args.workers,
            join=args.join,
            worker=args.worker,
            name=args.study_name,
            stage_arguments=stage_arguments(args),
        ),
        argv,
        errors=(EvaluationError, feature_sets.FeatureSetError),
        describe=describe,
        arguments=add_arguments,
    )
