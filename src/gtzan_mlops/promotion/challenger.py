"""The evaluated winner as the model that is served: the feature settings it is stored with, its
serving spec, what it is made of (its fingerprint), and logging it with its training clips."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gtzan_mlops.evaluation.records import record_feature_set
from gtzan_mlops.evaluation.scoring import EvaluationError
from gtzan_mlops.features import feature_sets
from gtzan_mlops.promotion.champion import TRAINING_CLIPS_FILE
from gtzan_mlops.promotion.served_evaluation import CLIPS_COLUMNS, SplitClips
from gtzan_mlops.tracking import compute_closure

if TYPE_CHECKING:
    from gtzan_mlops.serving.spec import ServingSpec
    from gtzan_mlops.settings.schema import FeatureSettings, ServedConfig

# What the served model runs besides its classifier (its entry file and all it imports): a
# change here is a new serving model.
SERVING_MODULES = compute_closure("serving.model_entry")


def serving_feature_settings(
    current: FeatureSettings,
    record: dict[str, Any],
    features_dir: Path,
    musicnn_sha256: str | None,
) -> FeatureSettings:
    """The feature settings stored with the served model: those the feature tables were made
    with (their settings record, which must be `current`, what params ask for, with the musicnn
    checkpoint the model will carry), and what the winner was trained on (its record), or
    serving would compute other features."""
    try:
        settings = feature_sets.made_with(features_dir, current, musicnn_sha256)
    except feature_sets.FeatureSetError as error:
        raise EvaluationError(str(error)) from None
    now = settings.to_dict()
    trained = record.get("feature_settings", {})
    differing = {
        key: (value, now[key]) for key, value in trained.items() if key in now and now[key] != value
    }
    if differing:
        raise EvaluationError(
            f"{record['family']}: trained with feature settings that differ from params.yaml "
            f"(trained, now): {differing}; rerun the pipeline"
        )
    return settings


def serving_spec(record: dict[str, Any], feature_settings: FeatureSettings) -> ServingSpec:
    """What the served model of the winner's training `record` classifies with."""
    from gtzan_mlops.serving.spec import ServingSpec

    return ServingSpec(
        family=record["family"],
        flavor=record["flavor"],
        level=record["level"],
        classes=tuple(record["classes"]),
        feature_settings=feature_settings.to_dict(),
        feature_set=record_feature_set(record),
    )


def serving_fingerprint(spec: ServingSpec, classifier_uri: str, config: ServedConfig) -> str:
    """What a served model is made of: its classifier, spec, config (serving limits and
    quality gates) and code."""
    from gtzan_mlops.tracking import source_digest

    payload = {
        "classifier_uri": classifier_uri,
        "spec": spec.to_dict(),
        "limits": config.model_dump(),
        "code": source_digest(*SERVING_MODULES),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def log_challenger(
    spec: ServingSpec,
    record: dict[str, Any],
    clips: SplitClips,
    config: ServedConfig,
    musicnn_weights: Path | None,
) -> Any:
    """Log the serving model of `spec` (its model config `config`, and the musicnn checkpoint
    of a model on musicnn features) and its training clips into the active run; returns
    MLflow's ModelInfo."""
    import mlflow

    from gtzan_mlops.serving.packaging import log_serving_model

    info = log_serving_model(spec, record["model_uri"], config, musicnn_weights=musicnn_weights)
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / TRAINING_CLIPS_FILE
        clips.training[list(CLIPS_COLUMNS)].to_csv(path, index=False)
        mlflow.log_artifact(str(path))
    return info
