"""The Optuna study of a model: its settings, its name (everything that decides its trials), its
storage shared by worker processes, its first trial, its parent MLflow run and its history.

The study lives in persistent storage that several processes can share (journal files under
`optuna-journals/`, or an RDB given by `OPTUNA_STORAGE`), named after everything that decides its
trials: family, search space, seed, objective, the data and split files (sha256) and the
training code. So rerunning the stage after an interruption finishes the same study, raising
`n_trials` adds trials to it, and changing anything else starts a new one.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gtzan_mlops import tracking
from gtzan_mlops.features import feature_sets
from gtzan_mlops.models import zoo
from gtzan_mlops.models.training_data import TrainingData
from gtzan_mlops.settings.loading import ConfigError
from gtzan_mlops.settings.schema import Choice, IntRange, Settings, SpaceEntry, Train, Tuning

log = logging.getLogger(__name__)

PARENT_RUN_ATTR = "mlflow_parent_run_id"


@dataclass(frozen=True)
class StudySettings:
    """What the study of one family runs with, from the typed settings: the family's section
    (`train.<family>`: n_trials, defaults, space; on the demo set within `demo_budget`), the
    train section (seed, objective, refit_on, pruner, optuna_storage), the worker processes and
    the MLflow experiment."""

    family: str
    tuning: Tuning
    train: Train
    workers: int  # resources.train.workers
    experiment_name: str  # mlflow.experiment_name

    @classmethod
    def of(cls, settings: Settings, family: str) -> StudySettings:
        if family not in zoo.FAMILIES:
            raise ConfigError(f"unknown family {family!r}; known: {', '.join(zoo.FAMILIES)}")
        tuning: Tuning = getattr(settings.train, family)
        if settings.data.source == "demo":
            tuning = demo_budget(tuning, settings.train, family)
        return cls(
            family=family,
            tuning=tuning,
            train=settings.train,
            workers=settings.resources.train.workers,
            experiment_name=settings.mlflow.experiment_name,
        )

    @property
    def space(self) -> dict[str, SpaceEntry]:
        return self.tuning.space

    @property
    def objective_key(self) -> str:
        """The validation metric maximised: `valid_<train.objective>`."""
        return f"valid_{self.train.objective}"


def demo_budget(tuning: Tuning, train: Train, family: str) -> Tuning:
    """`tuning` within the demo set's own budget: at most `train.demo_max_trials` trials and
    `train.demo_max_epochs` epochs (the Keras families' `epochs`, fixed or the top of its range).
    The capped epochs are part of the space, so they name another study than the full budget."""
    update: dict[str, Any] = {}
    cap = train.demo_max_trials
    if cap is not None and tuning.n_trials > cap:
        log.info(
            "%s: %d trials on the demo set, not train.%s.n_trials=%d (train.demo_max_trials)",
            family, cap, family, tuning.n_trials,
        )  # fmt: skip
        update["n_trials"] = cap
    epochs = tuning.space.get("epochs")
    cap = train.demo_max_epochs
    capped: SpaceEntry | None = None
    if cap is not None and isinstance(epochs, IntRange) and epochs.high > cap:
        capped = epochs.model_copy(update={"low": min(epochs.low, cap), "high": cap})
    elif cap is not None and isinstance(epochs, int) and not isinstance(epochs, bool):
        capped = cap if epochs > cap else None
    if capped is not None:
        log.info(
            "%s: at most %d epochs on the demo set, not train.%s.space.epochs=%s "
            "(train.demo_max_epochs)",
            family, cap, family, epochs,
        )  # fmt: skip
        update["space"] = {**tuning.space, "epochs": capped}
    return tuning.model_copy(update=update) if update else tuning


def code_fingerprint() -> str:
    """sha256 of the modules that decide a trial's outcome: everything the stage imports."""
    return tracking.source_digest(*tracking.compute_closure("stages.train"))


def study_name(settings: StudySettings, data: TrainingData) -> str:
    """`<family>-<feature set>-<split label>-<fingerprint>`: one study per thing that changes its
    trials or the refit. `n_trials` and `workers` are left out, so raising them continues the
    study. The space and defaults enter as written in params.yaml."""
    written = settings.tuning.model_dump(mode="python", exclude_unset=True)
    pruner = settings.train.pruner
    decisive = {
        "family": settings.family,
        "feature_set": data.feature_set,
        "space": written["space"],
        "defaults": written["defaults"],
        "seed": settings.train.seed,
        "objective": settings.train.objective,
        "refit_on": settings.train.refit_on,  # a param of the parent run, which is immutable
        "pruner": [pruner.n_startup_trials, pruner.n_warmup_steps],
        "classes": data.classes,
        "features": data.features_sha256,
        "split": data.split_sha256,
        "code": code_fingerprint(),
    }
    payload = json.dumps(decisive, sort_keys=True, default=str).encode()
    key = feature_sets.model_key(settings.family, data.feature_set)
    return f"{key}-{data.label}-{hashlib.sha256(payload).hexdigest()[:12]}"


def study_storage(settings: StudySettings, root: Path | None) -> Any:
    """The family's storage: an RDB URL (OPTUNA_STORAGE, else train.optuna_storage), else its
    journal file under `root`'s store (tracking.optuna_storage). Both pickle, for Ray tasks."""
    return tracking.optuna_storage(settings.family, root, settings.train.optuna_storage)


def open_study(
    settings: StudySettings,
    name: str,
    root: Path | None,
    worker: int = 0,
    create: bool = True,
    storage: Any = None,
) -> Any:
    """Study `name` in `storage` (default: `study_storage`), created if `create` (else it must
    exist). Each worker samples from its own seeded stream (`train.seed + worker`), or parallel
    workers would repeat trials; the median pruner follows `train.pruner`."""
    import optuna

    storage = storage or study_storage(settings, root)
    sampler = optuna.samplers.TPESampler(seed=settings.train.seed + worker)
    pruner = optuna.pruners.MedianPruner(
        n_startup_trials=settings.train.pruner.n_startup_trials,
        n_warmup_steps=settings.train.pruner.n_warmup_steps,
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


def completed_any(study: Any) -> bool:
    return any(trial.state.name == "COMPLETE" for trial in study.get_trials(deepcopy=False))


def within_space(spec: SpaceEntry | None, value: Any) -> bool:
    """Whether a search space entry (None: no entry) can propose `value`."""
    if isinstance(spec, Choice):
        return value in spec.choices
    if not isinstance(spec, zoo.SPACE_RANGES):
        return False
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return float(spec.low) <= float(value) <= float(spec.high)


def enqueue_defaults(study: Any, settings: StudySettings) -> None:
    """The source study's settings as the first trial of a new study (those within the space)."""
    if study.trials:
        return
    chosen = {
        name: value
        for name, value in settings.tuning.defaults.items()
        if within_space(settings.space.get(name), value)
    }
    if chosen:
        study.enqueue_trial(chosen, skip_if_exists=True)


def run_tags(root: Path, family: str, data: TrainingData) -> dict[str, str]:
    """The tags of the parent run and of every trial's run: the code and data (tracking.run_tags),
    the model and what it trains on."""
    return {
        **tracking.run_tags(root),
        "family": family,
        "feature_set": data.feature_set,
        "model": feature_sets.model_key(family, data.feature_set),
        "split": data.label,
        "leaky": str(data.leaky).lower(),
        "level": data.level,
        "features_sha256": data.features_sha256,
        "split_sha256": data.split_sha256,
    }


def parent_run(study: Any, settings: StudySettings, data: TrainingData, tags: dict) -> str:
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


def recorded_parent_run(study: Any) -> str:
    """The parent run the stage recorded in its study (for a joining worker)."""
    parent = study.user_attrs.get(PARENT_RUN_ATTR)
    if not parent:
        raise ConfigError(
            f"study {study.study_name!r} has no parent run yet: start the stage first"
        )
    return parent


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
