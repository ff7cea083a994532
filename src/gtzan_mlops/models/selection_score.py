"""The selection score of a model (params `selection`), what evaluate chooses the winner by, on
data the test never touches: the best trial's `selection.metric` on the valid subset, or (source
`cross_validation`) its hyperparameters refit on `selection.folds` folds of train+valid that keep
the split's units together, scored once on the pooled out-of-fold predictions. Each score carries
its bootstrap interval over the split's units (params `uncertainty`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from gtzan_mlops.evaluation.scoring import (
    FamilyEvaluation,
    evaluation_interval,
    score_probabilities,
)
from gtzan_mlops.models import zoo
from gtzan_mlops.models.study import StudySettings
from gtzan_mlops.models.training_data import TrainingData
from gtzan_mlops.models.trials import BUDGET_ATTR, evaluation_of_trial
from gtzan_mlops.settings.loading import ConfigError
from gtzan_mlops.settings.schema import Selection, Uncertainty

CV_SUBSET = "cv"  # metric prefix of the pooled out-of-fold scores


def best_configuration(
    study: Any, settings: StudySettings
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


def check_folds(data: TrainingData, choice: Selection) -> None:
    """With cross-validation, too few units for the folds fails before any trial, not after the
    study."""
    if choice.source == "cross_validation":
        selection_folds(data.train_and_valid_rows(), data.units, choice.folds, choice.seed)


@dataclass(frozen=True)
class CrossValidation:
    """Out-of-fold predictions of one configuration on the train+valid rows."""

    rows: pd.DataFrame  # train then valid rows (TrainingData.train_and_valid_rows)
    folds: list[np.ndarray]  # positions in `rows` each fold held out
    probabilities: np.ndarray  # row i from the model of the fold that held it out
    evaluation: FamilyEvaluation  # the pooled predictions scored once (subset CV_SUBSET)


def cross_validate(
    settings: StudySettings,
    data: TrainingData,
    hyperparameters: dict[str, Any],
    budget: int | None,
    choice: Selection,
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
            settings.train.seed,
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
    settings: StudySettings,
    data: TrainingData,
    choice: Selection,
    bootstrap: Uncertainty,
) -> dict[str, Any]:
    """The score evaluate chooses the winner by (record["selection"]), with its interval over
    the units of what was scored; the test rows play no part."""
    best, hyperparameters, budget = best_configuration(study, settings)
    if choice.source == "validation":
        evaluation = evaluation_of_trial(best, settings.family, data)
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
