"""What the stages hand on: the training records (`data/train/<family>-<feature set>.json`)
that evaluate and promote read, whether a record still matches the current data, and the name
of evaluate's summary that promote reads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gtzan_mlops.evaluation.scoring import LEVELS, EvaluationError
from gtzan_mlops.evaluation.test_data import TestData
from gtzan_mlops.features import feature_sets

RECORD_KEYS = ("family", "flavor", "model_uri", "level", "classes", "feature_settings")
EVALUATION_FILE = "evaluation.json"  # in paths.evaluate_reports: every model's test metrics


def load_family_record(path: Path) -> dict[str, Any]:
    """A training stage's `data/train/<family>.json`, checked for what evaluation needs."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise EvaluationError(f"{path}: no such file (was the family trained?)") from error
    except json.JSONDecodeError as error:
        raise EvaluationError(f"{path}: not valid JSON ({error})") from error
    missing = [key for key in RECORD_KEYS if key not in record]
    if missing:
        raise EvaluationError(f"{path}: missing {', '.join(missing)}")
    if record["level"] not in LEVELS:
        raise EvaluationError(f"{path}: level must be one of {LEVELS}, got {record['level']!r}")
    return record


def record_feature_set(record: dict[str, Any]) -> str:
    """A training record's feature set (records written before feature sets: handcrafted)."""
    return str(record.get("feature_set", feature_sets.HANDCRAFTED))


def record_model(record: dict[str, Any]) -> str:
    """A training record's model name, `<family>-<feature set>`."""
    return str(
        record.get("model") or feature_sets.model_key(record["family"], record_feature_set(record))
    )


def stale_reason(record: dict[str, Any], data: TestData) -> str | None:
    """Why a family's record does not belong to the current features and split, if it does not."""
    level, feature_set = record["level"], record_feature_set(record)
    current = data.features_sha256(level, feature_set)
    if record.get("features_sha256") and record["features_sha256"] != current:
        return "trained on another version of the features"
    if record.get("split_sha256") and record["split_sha256"] != data.split_sha256:
        return "trained on another split"
    return None
