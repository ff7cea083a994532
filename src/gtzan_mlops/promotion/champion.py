"""The registry's champion as promotion meets it: the version holding the alias, loaded as
served, and the clips it was trained on (recorded with every version by the promote stage)."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gtzan_mlops.evaluation.scoring import EvaluationError
from gtzan_mlops.promotion.served_evaluation import ServedModel
from gtzan_mlops.tracking import CHAMPION_ALIAS

log = logging.getLogger(__name__)

TRAINING_CLIPS_FILE = "training_clips.csv"  # in each serving run: the version's training clips


def current_champion(client: Any, model_name: str) -> Any | None:
    """The model version holding the champion alias, or None (no model or no alias yet)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(model_name, CHAMPION_ALIAS)
    except MlflowException as error:
        if error.error_code in {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}:
            return None
        raise


@dataclass
class Champion:
    """The version holding the alias, loaded as served, with the samples' sha256 of the clips
    it was trained on (None when it was registered before versions recorded them)."""

    version: Any  # mlflow ModelVersion
    served: ServedModel
    training_clips: set[str] | None


def training_clips_of(version: Any) -> set[str] | None:
    """The samples' sha256 of a version's training clips, from its run's training_clips.csv."""
    import mlflow
    import pandas as pd
    from mlflow.exceptions import MlflowException

    if not version.run_id:
        return None
    with tempfile.TemporaryDirectory() as scratch:
        try:
            path = mlflow.artifacts.download_artifacts(
                run_id=version.run_id, artifact_path=TRAINING_CLIPS_FILE, dst_path=scratch
            )
        except (MlflowException, OSError):
            return None
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    return set(table["samples_sha256"])


def load_champion(
    held_by: Any, model_name: str, unloadable: str, load_model: Callable[[str], Any]
) -> tuple[Champion | None, str | None]:
    """The champion `held_by` (a model version, or None) loaded as served. One that cannot be
    loaded (deleted, corrupt, from an incompatible version) ends the stage with one line naming
    it when `unloadable` is "stop"; with "absent" it is (None, why it counts as absent)."""
    if held_by is None:
        return None, None
    uri = f"models:/{model_name}/{held_by.version}"
    try:
        served = ServedModel(load_model(uri), f"champion version {held_by.version}")
    except Exception as error:  # whatever loading raises: the user gets one line, no trace
        problem = " ".join(f"{type(error).__name__}: {error}".split())[:300]
        message = f"champion version {held_by.version} ({uri}) cannot be loaded: {problem}"
        if unloadable == "stop":
            raise EvaluationError(
                f"{message}; repair or move the alias, or set "
                "promote.unloadable_champion: absent to judge the winner without it"
            ) from None
        log.warning("%s; it counts as absent (promote.unloadable_champion: absent)", message)
        return None, f"{message}, so it counts as absent (promote.unloadable_champion: absent)"
    return Champion(held_by, served, training_clips_of(held_by)), None
