"""The `train` stage of one model family: an Optuna study, every trial a nested MLflow run.

    gtzan-mlops train --family xgboost [--features both] [--set train.xgboost.n_trials=N]
        [--set resources.train.workers=N]
    gtzan-mlops train --family xgboost --join        # one more worker for a running stage

A model is a family on a feature set (`handcrafted`, `musicnn` or `both`): its name
`<family>-<feature set>` names its stage, its record, its reports and its MLflow runs.

Each step is a library module of `gtzan_mlops.models`:

1. training_data: the active split (`paths.split`) says which rows train, validate and test, and
   the level the models work at (whole clips, or 3 s segments voted per song).
2. study, trials: an Optuna study maximises the validation metric `train.objective`, sampling
   the search space `train.<family>.space` with a seeded TPE sampler; the first trial is the
   source study's settings (`train.<family>.defaults`); Keras and XGBoost report every epoch (or
   few boosting rounds) and the median pruner stops hopeless trials. The study is stored where
   several processes can share it, named after everything that decides its trials, so a rerun
   finishes it and raising `n_trials` extends it. MLflow: one parent run per study
   (`train-<family> [<split label>]`, reused on resume) and one nested run per trial.
3. workers: with `resources.train.workers` above one, worker processes (`--join`) run the trials;
   with `resources.engine: ray`, that many Ray tasks (ray_workers) on a local Ray or a cluster.
4. selection_score: the selection score (params `selection`) evaluate chooses the winner by, on
   the valid subset or cross-validated on train+valid, never on the test rows.
5. refit: the best trial refit (on `train.refit_on`, for the epochs/rounds its early stopping
   chose) and scored on the test rows, each score with its bootstrap interval.
6. outputs: the model logged to the parent run with its metrics and reports, and for DVC
   `<paths.train_records>/<model>.json` (the record evaluate and promote read) and
   `<paths.train_reports>/<model>/`: metrics.json, the optimisation history (history.csv,
   optuna_history.png), the test confusion matrix and per-class table.

Determinism: with `resources.train.workers: 1` the same params, data and code give the same
trials and model (seeded sampler, NumPy/Python/TensorFlow seeds with TF op determinism, seeded
estimators, single-threaded XGBoost). Several workers finish sooner but in an order that varies.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import fields
from pathlib import Path
from typing import Any

from gtzan_mlops import tracking
from gtzan_mlops.cli import stage_arguments, stage_main
from gtzan_mlops.evaluation.scoring import EvaluationError
from gtzan_mlops.evaluation.uncertainty import Interval
from gtzan_mlops.features import feature_sets
from gtzan_mlops.models import zoo
from gtzan_mlops.models.outputs import (
    OutputPaths,
    log_parent_run,
    training_record,
    write_outputs,
    write_reports,
)
from gtzan_mlops.models.ray_workers import WorkerError, tuning_cluster
from gtzan_mlops.models.refit import refit_best
from gtzan_mlops.models.selection_score import check_folds, selection_score
from gtzan_mlops.models.study import (
    StudySettings,
    completed_any,
    enqueue_defaults,
    finished_trials,
    history_table,
    open_study,
    parent_run,
    run_tags,
    study_name,
)
from gtzan_mlops.models.training_data import load_training_data
from gtzan_mlops.models.workers import join_study, run_trials
from gtzan_mlops.settings.loading import PARAMS_FILE
from gtzan_mlops.settings.schema import Settings

log = logging.getLogger(__name__)


def _start(root: Path) -> None:
    """The MLflow store of `root` (tracking.use_store), and Optuna's per-trial lines off."""
    import optuna

    tracking.use_store(root)
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def run(
    settings: Settings,
    root: Path,
    family: str,
    feature_set: str = feature_sets.HANDCRAFTED,
    worker_arguments: list[str] | None = None,
) -> dict[str, Any]:
    """The stage: tune `family` on `feature_set` (in this process, or in worker processes given
    `worker_arguments`, the --params and --set they read), refit the best trial, score it, log
    and write its outputs; returns its record."""
    study_settings = StudySettings.of(settings, family)
    # With resources.engine: ray, the stores and the cluster are checked before any work.
    with tuning_cluster(settings.resources, study_settings, root) as cluster:
        data = load_training_data(settings, root, feature_set)
        check_folds(data, settings.selection)  # too few units fails now, not after the study
        _start(root)
        tags = run_tags(root, family, data)
        name = study_name(study_settings, data)
        study = open_study(study_settings, name, root)
        enqueue_defaults(study, study_settings)
        parent = parent_run(study, study_settings, data, tags)
        log.info(
            "%s: study %s, %d of %d trials done, parent run %s",
            family,
            name,
            finished_trials(study),
            study_settings.tuning.n_trials,
            parent,
        )
        arguments = worker_arguments or ["--params", str(root / PARAMS_FILE)]
        run_trials(study, study_settings, data, parent, tags, root, arguments, cluster)
    if not completed_any(study):
        raise EvaluationError(f"{family}: no trial of study {name} completed")

    selection = selection_score(
        study, study_settings, data, settings.selection, settings.uncertainty
    )
    refit = refit_best(study, study_settings, data, settings.uncertainty)
    history = history_table(study)
    paths = OutputPaths.of(settings.paths, root, feature_sets.model_key(family, feature_set))
    write_reports(paths.reports, refit.test, history, study_settings, data)
    model_uri, experiment_id = log_parent_run(
        parent, study_settings, data, refit, selection, history, paths.reports
    )
    run_ids = (parent, model_uri, experiment_id)
    record = training_record(study, study_settings, data, refit, selection, len(history), run_ids)
    write_outputs(record, paths)
    return record


def join(
    settings: Settings,
    root: Path,
    family: str,
    feature_set: str,
    name: str | None,
    worker: int | None,
) -> None:
    """`--join`: only run trials of the stage's study (`name`, else the one these settings, data
    and code make), e.g. on another machine; `worker` numbers the stage's own workers."""
    study_settings = StudySettings.of(settings, family)
    data = load_training_data(settings, root, feature_set)
    _start(root)
    tags = run_tags(root, family, data)
    name = name or study_name(study_settings, data)
    join_study(study_settings, data, name, root, worker, tags)


def command(settings: Settings, root: Path, args: argparse.Namespace) -> dict[str, Any] | None:
    """`gtzan-mlops train`: the stage, or with --join one more worker for it."""
    if args.join:
        join(settings, root, args.family, args.features, args.study_name, args.worker)
        return None
    return run(settings, root, args.family, args.features, stage_arguments(args))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--family", required=True, choices=zoo.FAMILIES)
    parser.add_argument(
        "--features",
        default=feature_sets.HANDCRAFTED,
        choices=feature_sets.FEATURE_SETS,
        help="the feature set to train on (default: handcrafted)",
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
        command,
        argv,
        errors=(EvaluationError, feature_sets.FeatureSetError, WorkerError),
        describe=describe,
        arguments=add_arguments,
    )
