"""The `promote` stage: register the evaluated winner and move the `champion` alias if it earns it.

The winner of the evaluate stage (`reports/evaluate/evaluation.json`) is logged as the serving
model (serving.py: a pyfunc that takes raw audio) and registered as a new version of
`promote.model_name`, tagged with the split, the data fingerprints, the git commit and its test
metric. The alias `champion` moves to it only
when it beats the current champion on the same test data:

- no champion yet: promoted;
- the champion's tags show the same split file and the same features (sha256): the champion is
  loaded and scored again on the current test set (its stored number is not trusted), and the
  challenger is promoted only if it is better by more than zero and by at least
  `promote.min_improvement`;
- the champion was evaluated on another split or feature version: the numbers are not
  comparable, so nothing is compared. With `promote.on_data_change: keep` (the default) the
  champion stays and the new version is registered with the reason; with `replace` the new
  version becomes champion (for when the split or the features changed on purpose).

The decision and its reason go to `reports/promote/promotion.json` (the key numbers to the DVC
metrics file `metrics/promotion.json`) and to the version's tags and description. Registry
stages (deprecated) are never used: only aliases and tags.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gtzan_mlops import feature_sets
from gtzan_mlops.cli import stage_main
from gtzan_mlops.config import ConfigError, resolve_path
from gtzan_mlops.features import FeatureSettings
from gtzan_mlops.records import (
    EVALUATION_FILE,
    load_family_record,
    record_feature_set,
    record_model,
    stale_reason,
)
from gtzan_mlops.scoring import EvaluationError, score_classifier
from gtzan_mlops.serving import ServingLimits
from gtzan_mlops.split_data import TestData, feature_dir, load_test_data, split_label
from gtzan_mlops.tracking import CHAMPION_ALIAS, champion_uri, module_closure

log = logging.getLogger(__name__)

ON_DATA_CHANGE = ("keep", "replace")
DIFFERENT_DATA = "champion evaluated on different data"
# Scores are means over a few songs: two equal ones computed in another order can differ in the
# last bits, and 0.85 - 0.80 < 0.05 in floating point. Differences within this are ties.
SCORE_TOLERANCE = 1e-9
# What the served model runs besides its classifier (its entry file and all it imports): a
# change here is a new serving model.
SERVING_MODULES = module_closure("serving_model")


@dataclass(frozen=True)
class DataVersion:
    """Which test data a score belongs to: the split file and the features table, by sha256."""

    split_sha256: str
    features_sha256: str


@dataclass(frozen=True)
class ChampionEvidence:
    """The current champion: the data its tags say it was evaluated on, and (only when that is
    the current data) its score recomputed on the current test set."""

    version: str
    data: DataVersion
    value: float | None = None


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    improvement: float | None = None


def decide_promotion(
    challenger_value: float,
    champion: ChampionEvidence | None,
    current_data: DataVersion,
    min_improvement: float,
    on_data_change: str,
) -> Decision:
    """Whether the challenger (scored on `current_data`) takes the champion alias.

    `current_data` is the test data as the champion would see it (its level's features table).
    Pure: no registry access, so every branch is tested directly.
    """
    if on_data_change not in ON_DATA_CHANGE:
        raise ConfigError(f"promote.on_data_change must be one of {ON_DATA_CHANGE}")
    if min_improvement < 0:
        raise ConfigError("promote.min_improvement must not be negative")
    if champion is None:
        return Decision(True, "first model: there was no champion yet")
    if champion.data != current_data:
        changed = [
            name
            for name, then, now in (
                ("split", champion.data.split_sha256, current_data.split_sha256),
                ("features", champion.data.features_sha256, current_data.features_sha256),
            )
            if then != now
        ]
        reason = (
            f"{DIFFERENT_DATA} (champion version {champion.version}: {' and '.join(changed)} "
            "changed since), so the scores are not compared"
        )
        if on_data_change == "replace":
            return Decision(True, f"{reason}; promote.on_data_change=replace: promoted")
        return Decision(
            False,
            f"{reason}; promote.on_data_change=keep: champion kept (set it to replace, or move "
            "the alias by hand, to promote this version)",
        )
    if champion.value is None:
        raise ValueError("a champion on the current data must come with its recomputed score")
    improvement = challenger_value - champion.value
    if improvement > SCORE_TOLERANCE and improvement >= min_improvement - SCORE_TOLERANCE:
        return Decision(
            True,
            f"better than champion version {champion.version} by {improvement:.4f} "
            f"(>= min_improvement {min_improvement:g}) on the same test data",
            improvement,
        )
    return Decision(
        False,
        f"not better than champion version {champion.version} by more than 0 and at least "
        f"min_improvement {min_improvement:g} on the same test data (difference "
        f"{improvement:+.4f}); champion kept",
        improvement,
    )


def serving_settings(
    params: dict[str, Any], record: dict[str, Any], features_dir: Path, musicnn_sha256: str | None
) -> FeatureSettings:
    """The feature settings stored with the served model: those the feature tables were made
    with (their settings record, which must be what params ask for, with the musicnn checkpoint
    the model will carry), and what the winner was trained on (its record), or serving would
    compute other features."""
    try:
        settings = feature_sets.made_with(
            features_dir, FeatureSettings.from_params(params), musicnn_sha256
        )
    except feature_sets.FeatureSetError as error:
        raise EvaluationError(str(error)) from None
    current = settings.to_dict()
    trained = record.get("feature_settings", {})
    differing = {
        key: (value, current[key])
        for key, value in trained.items()
        if key in current and current[key] != value
    }
    if differing:
        raise EvaluationError(
            f"{record['family']}: trained with feature settings that differ from params.yaml "
            f"(trained, now): {differing}; rerun the pipeline"
        )
    return settings


def current_champion(client: Any, model_name: str) -> Any | None:
    """The model version holding the champion alias, or None (no model or no alias yet)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(model_name, CHAMPION_ALIAS)
    except MlflowException as error:
        if error.error_code in {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}:
            return None
        raise


def rescore_version(model_name: str, version: str, metric: str, data: TestData) -> float:
    """Load a registered serving model and score its classifier on the current test set."""
    import mlflow

    served = mlflow.pyfunc.load_model(f"models:/{model_name}/{version}").unwrap_python_model()
    spec = served.spec
    evaluation = score_classifier(
        served.classifier,
        spec.level,
        list(spec.classes),
        feature_sets.columns(spec.feature_set, spec.settings.n_mfcc),
        data.rows(spec.level, spec.feature_set),
        family=f"{model_name} version {version}",
    )
    return float(evaluation.metrics[metric])


def version_tags(
    record: dict[str, Any],
    evaluation: dict[str, Any],
    data: TestData,
    metric: str,
    git_commit: str | None,
) -> dict[str, str]:
    model = record_model(record)
    level, feature_set = record["level"], record_feature_set(record)
    return {
        "model": model,
        "family": record["family"],
        "feature_set": feature_set,
        "flavor": record["flavor"],
        "level": level,
        "split": split_label(data.summary),
        "split_strategy": str(data.summary.get("strategy")),
        "leaky": str(bool(data.summary.get("leaky", False))).lower(),
        "split_sha256": data.split_sha256,
        "features_sha256": data.features_sha256(level, feature_set),
        "git_commit": git_commit or "unknown",
        "metric_name": metric,
        "metric_value": f"{evaluation['families'][model][metric]:.6f}",
        "classifier_uri": record["model_uri"],
        "training_run_id": str(record.get("run_id")),
    }


@dataclass(frozen=True)
class PromotionSettings:
    """The `promote` and `serving` sections of params.yaml."""

    model_name: str
    min_improvement: float
    on_data_change: str
    experiment_name: str | None  # None: the experiment of the winner's training run
    limits: ServingLimits | None = None  # the served model's config (params serving)
    musicnn_weights: Path | None = None  # the checkpoint logged with a model on musicnn features

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> PromotionSettings:
        stage = params["promote"]
        settings = cls(
            model_name=str(stage["model_name"]),
            min_improvement=float(stage["min_improvement"]),
            on_data_change=str(stage["on_data_change"]),
            experiment_name=stage["experiment_name"],
        )
        if settings.on_data_change not in ON_DATA_CHANGE:
            raise ConfigError(f"promote.on_data_change must be one of {ON_DATA_CHANGE}")
        if settings.min_improvement < 0:
            raise ConfigError("promote.min_improvement must not be negative")
        return dataclasses.replace(settings, limits=ServingLimits.from_params(params))


def serving_fingerprint(spec: Any, classifier_uri: str, settings: PromotionSettings) -> str:
    """What a served model is made of: its classifier, spec, serving settings and code."""
    from gtzan_mlops.tracking import source_digest

    payload = {
        "classifier_uri": classifier_uri,
        "spec": spec.to_dict(),
        "limits": settings.limits.to_config() if settings.limits else None,
        "code": source_digest(*SERVING_MODULES),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def judge_challenger(
    held_by: Any,
    record: dict[str, Any],
    data: TestData,
    metric: str,
    challenger_value: float,
    settings: PromotionSettings,
) -> tuple[Decision, ChampionEvidence | None]:
    """Whether the winner (its training `record`, scoring `challenger_value`) takes the alias
    from the registered champion `held_by` (None: there is none), and the champion's evidence:
    its score recomputed on the same test data when that data is what it was evaluated on."""
    if held_by is not None and held_by.tags.get("classifier_uri") == record["model_uri"]:
        # The champion's own classifier, served by other code or settings: nothing to compare.
        reason = (
            f"the classifier of champion version {held_by.version}, with new serving code or "
            "serving settings"
        )
        return Decision(True, reason), None
    feature_set = record_feature_set(record)
    current_data = DataVersion(
        data.split_sha256, data.features_sha256(record["level"], feature_set)
    )
    champion: ChampionEvidence | None = None
    if held_by is not None:
        # The champion is compared on the data it would see now: its own level's features.
        level = held_by.tags.get("level", record["level"])
        held_set = held_by.tags.get("feature_set", feature_sets.HANDCRAFTED)
        current_data = DataVersion(data.split_sha256, data.features_sha256(level, held_set))
        then = DataVersion(
            held_by.tags.get("split_sha256", ""), held_by.tags.get("features_sha256", "")
        )
        champion = ChampionEvidence(
            version=held_by.version,
            data=then,
            value=rescore_version(settings.model_name, held_by.version, metric, data)
            if then == current_data
            else None,
        )
    decision = decide_promotion(
        challenger_value,
        champion,
        current_data,
        settings.min_improvement,
        settings.on_data_change,
    )
    return decision, champion


def register_serving_model(
    spec: Any,
    record: dict[str, Any],
    metric: str,
    challenger_value: float,
    tags: dict[str, str],
    decision: Decision,
    settings: PromotionSettings,
) -> Any:
    """Log the serving model of `spec` around the winner's classifier in a `serving-<model>`
    run, register it as a new version with `tags` and the decision, and move the champion alias
    to it if the decision says so; returns the model version."""
    import mlflow
    from mlflow import MlflowClient

    from gtzan_mlops import serving, tracking

    launched = tracking.launched_run_id()  # `mlflow run . -e promote`: log into its run
    if launched:
        experiment_id = None
    elif settings.experiment_name:
        experiment_id = tracking.ensure_experiment(settings.experiment_name)
    else:
        experiment_id = record.get("experiment_id")
    with mlflow.start_run(
        run_id=launched,
        experiment_id=experiment_id,
        run_name=f"serving-{record_model(record)}",
        tags={"gtzan.stage": "promote", **tags},
    ):
        model_info = serving.log_serving_model(
            spec,
            record["model_uri"],
            settings.limits,
            musicnn_weights=settings.musicnn_weights,
        )
        mlflow.log_metric(metric, challenger_value)
    tags = {
        **tags,
        "promotion": "promoted" if decision.promote else "not promoted",
        "promotion_reason": decision.reason,
    }
    name = settings.model_name
    version = mlflow.register_model(model_info.model_uri, name, tags=tags)
    client = MlflowClient()
    client.update_model_version(name, version.version, description=decision.reason)
    if decision.promote:
        client.set_registered_model_alias(name, CHAMPION_ALIAS, version.version)
    return version


def promote_winner(
    evaluation: dict[str, Any],
    record: dict[str, Any],
    data: TestData,
    feature_settings: FeatureSettings,
    settings: PromotionSettings,
    git_commit: str | None = None,
) -> dict[str, Any]:
    """Register the evaluated winner (its training `record`) as a new serving-model version and
    move the champion alias if `decide_promotion` says so; returns the promotion summary.

    Uses the active MLflow tracking store and registry.
    """
    from mlflow import MlflowClient

    from gtzan_mlops import serving

    name = settings.model_name
    if settings.limits is None:
        raise ConfigError("promotion needs the serving limits (params serving)")
    winner, metric = evaluation["winner"], evaluation["selection_metric"]
    if record_model(record) != winner:
        raise EvaluationError(f"the record is of {record_model(record)}, the winner is {winner}")
    feature_set = record_feature_set(record)
    challenger_value = float(evaluation["families"][winner][metric])
    summary: dict[str, Any] = {
        "model_name": name,
        "split": split_label(data.summary),
        "leaky": bool(data.summary.get("leaky", False)),
        "model": winner,
        "family": record["family"],
        "feature_set": feature_set,
        "metric": metric,
        "challenger_value": challenger_value,
        "model_uri": champion_uri(name),
    }

    spec = serving.ServingSpec(
        family=record["family"],
        flavor=record["flavor"],
        level=record["level"],
        classes=tuple(record["classes"]),
        feature_settings=feature_settings.to_dict(),
        feature_set=feature_set,
    )
    fingerprint = serving_fingerprint(spec, record["model_uri"], settings)
    held_by = current_champion(MlflowClient(), name)
    if held_by is not None and held_by.tags.get("serving_fingerprint") == fingerprint:
        # A rerun with the same winner, serving code and settings: nothing new to register.
        reason = f"the winner is already the champion (version {held_by.version})"
        return {
            **summary,
            "version": int(held_by.version),
            "promoted": False,
            "reason": reason,
            "champion_version": int(held_by.version),
        }

    decision, champion = judge_challenger(held_by, record, data, metric, challenger_value, settings)
    # The new version is registered whatever the decision, so every evaluated winner can be
    # found (and promoted by hand) with the reason it was or was not promoted.
    tags = {
        **version_tags(record, evaluation, data, metric, git_commit),
        "serving_fingerprint": fingerprint,
    }
    version = register_serving_model(
        spec, record, metric, challenger_value, tags, decision, settings
    )
    return {
        **summary,
        "version": int(version.version),
        "promoted": decision.promote,
        "reason": decision.reason,
        "previous_champion_version": int(champion.version) if champion else None,
        "previous_champion_value": champion.value if champion else None,
        "improvement": decision.improvement,
        "min_improvement": settings.min_improvement,
        "on_data_change": settings.on_data_change,
        "champion_version": int(version.version)
        if decision.promote
        else (int(champion.version) if champion else None),
    }


def run(params: dict[str, Any], root: Path) -> dict[str, Any]:
    """The stage: promote the evaluated winner, write the decision and its key metrics."""
    from gtzan_mlops import tracking

    settings = PromotionSettings.from_params(params)
    paths = params["paths"]
    evaluate_path = resolve_path(paths["evaluate_reports"], root) / EVALUATION_FILE
    records_dir = resolve_path(paths["train_records"], root)
    output = resolve_path(paths["promote_reports"], root) / "promotion.json"
    metrics_path = resolve_path(paths["metrics"], root) / "promotion.json"
    try:
        evaluation = json.loads(evaluate_path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise EvaluationError(f"{evaluate_path}: no such file (run the evaluate stage)") from error
    record = load_family_record(records_dir / f"{evaluation['winner']}.json")
    musicnn_sha256 = None
    if feature_sets.uses_musicnn(record_feature_set(record)):
        from gtzan_mlops.musicnn import weights_digest

        extraction = feature_sets.ExtractionSettings.from_params(params, root)
        settings = dataclasses.replace(settings, musicnn_weights=extraction.musicnn_weights)
        musicnn_sha256 = weights_digest(extraction.musicnn_weights)
    feature_settings = serving_settings(params, record, feature_dir(params, root), musicnn_sha256)
    data = load_test_data(params, root)
    stale = stale_reason(record, data)
    if stale:
        # Its tags would name the current data while its score came from other data.
        raise EvaluationError(
            f"{record_model(record)}: {stale} than the current one; rerun train and evaluate"
        )

    tracking.use_store(root)
    summary = promote_winner(
        evaluation,
        record,
        data,
        feature_settings,
        settings,
        git_commit=tracking.git_commit(root),
    )
    for path, content in ((output, summary), (metrics_path, key_metrics(summary))):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content, indent=2) + "\n")
    return summary


def key_metrics(summary: dict[str, Any]) -> dict[str, Any]:
    """The DVC metrics of the stage: what was decided, for which version, on which split."""
    return {
        "split": summary["split"],
        "model": summary["model"],
        "version": summary["version"],
        "promoted": summary["promoted"],
        "champion_version": summary["champion_version"],
        summary["metric"]: summary["challenger_value"],
    }


def describe(summary: dict[str, Any]) -> str:
    verdict = "promoted to champion" if summary["promoted"] else "registered, not promoted"
    return (
        f"{summary['model_name']} version {summary['version']} ({summary['model']}): "
        f"{verdict}: {summary['reason']}"
    )


def main(argv: list[str] | None = None) -> int:
    return stage_main("promote", __doc__, run, argv, errors=(EvaluationError,), describe=describe)
