"""The refit of a study's best trial: its hyperparameters (with the space's fixed values) fitted
on `train.refit_on` (train+valid, for the epochs or boosting rounds its early stopping chose; or
train, stopping early on valid again), then scored once on the test rows, each score with its
bootstrap interval over the split's units."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gtzan_mlops.evaluation.scoring import FamilyEvaluation, score_intervals
from gtzan_mlops.models import zoo
from gtzan_mlops.models.selection_score import best_configuration
from gtzan_mlops.models.study import StudySettings
from gtzan_mlops.models.training_data import TrainingData
from gtzan_mlops.models.trials import evaluate_subset
from gtzan_mlops.settings.schema import Uncertainty


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
    study: Any, settings: StudySettings, data: TrainingData, bootstrap: Uncertainty
) -> Refit:
    """Refit the best trial (on `train.refit_on`) and score it on the test rows."""
    best, hyperparameters, budget = best_configuration(study, settings)
    n_classes = len(data.classes)
    if settings.train.refit_on == "train_valid":
        result = zoo.fit_family(
            settings.family,
            hyperparameters,
            data.train_and_valid(),
            n_classes,
            settings.train.seed,
            budget=budget,
        )
    else:
        result = zoo.fit_family(
            settings.family,
            hyperparameters,
            data.xy("train"),
            n_classes,
            settings.train.seed,
            valid=data.xy("valid"),
        )
    test = evaluate_subset(result, data, "test", settings.family)
    intervals = score_intervals(test, data.units, bootstrap)
    return Refit(best, hyperparameters, budget, result, test, intervals)
