"""Which models the pipeline trains, which of them can win, and how the winner is chosen: by the
selection score each training stage recorded (params `selection`), never by a test score."""

from __future__ import annotations

from typing import Any

from gtzan_mlops.evaluation.records import record_model
from gtzan_mlops.evaluation.scoring import EvaluationError
from gtzan_mlops.features import feature_sets
from gtzan_mlops.settings.schema import Evaluate, Selection, Train

SCORE_DIGITS = 9  # selection scores equal to this many decimals are a tie


def selection_rule(selection: Selection) -> str:
    """How the selection score is computed, in words: `validation song_macro_f1`."""
    return f"{selection.source} {selection.metric}"


def trained_models(evaluate: Evaluate, train: Train) -> tuple[list[str], list[str]]:
    """The models (`<family>-<feature set>`) the pipeline trains, and those that can win, in
    order of preference on a tie: every family of `evaluate.families` (null: `train.families`)
    on each of `train.feature_sets`, and the `evaluate.candidates` also on each of
    `train.candidate_feature_sets`."""
    families = list(evaluate.families or train.families)
    sets = list(train.feature_sets)
    candidate_sets = list(dict.fromkeys([*sets, *train.candidate_feature_sets]))
    winners = [feature_sets.model_key(f, s) for f in evaluate.candidates for s in candidate_sets]
    models = [feature_sets.model_key(f, s) for f in families for s in sets]
    return list(dict.fromkeys([*models, *winners])), winners


def selection_of(record: dict[str, Any], selection: Selection) -> dict[str, Any]:
    """A training record's selection score, if it was computed by the rule of `selection`."""
    recorded = record.get("selection")
    if not recorded:
        raise EvaluationError(
            f"{record_model(record)}: its training record has no selection score (trained by "
            "an older version of the train stage); rerun train"
        )
    if (str(recorded["source"]), str(recorded["metric"])) != (selection.source, selection.metric):
        raise EvaluationError(
            f"{record_model(record)}: its selection score is {recorded['source']} "
            f"{recorded['metric']}, params ask for {selection_rule(selection)}; rerun train "
            "(dvc repro does)"
        )
    return recorded


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
