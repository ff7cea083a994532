"""What a served model is: the spec that turns audio into its native model's input, and the
columns and signature of its requests and answers.

Input: a DataFrame, one row per song, with one of two string columns per row:
  `audio_base64` the bytes of a WAV/AU/FLAC/MP3/OGG file, base64-encoded
  `audio_path`   a file under the server's `audio_root` (off unless `allow_audio_path`)
Output: one row per input row: `genre` (the most probable genre), one float column
`prob_<genre>` per genre in the order of params `genres`, and `warning` (null, or why the answer
is less sure, e.g. a truncated file). With the request parameter `timeline` true, a `timeline`
column holds, per analysed segment, its start and end in seconds, its genre and probabilities.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from mlflow.models.signature import ModelSignature
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

from gtzan_mlops.features import feature_sets
from gtzan_mlops.settings.schema import FeatureSettings

PATH_COLUMN = "audio_path"
BASE64_COLUMN = "audio_base64"
INPUT_COLUMNS = (PATH_COLUMN, BASE64_COLUMN)
GENRE_COLUMN = "genre"
WARNING_COLUMN = "warning"
TIMELINE_COLUMN = "timeline"
TIMELINE_PARAM = "timeline"  # request parameter: add the per-segment timeline
# The served model's artifacts: its native model, this spec (JSON) and the musicnn checkpoint.
CLASSIFIER_ARTIFACT = "classifier"
SPEC_ARTIFACT = "spec"
MUSICNN_ARTIFACT = "musicnn_weights"
# A model logged before loudness normalisation existed was trained on the clips as they were.
BEFORE_LOUDNESS = {"loudness_target_dbfs": None, "loudness_max_gain_db": 0.0}


@dataclass(frozen=True)
class ServingSpec:
    """What turns audio into the native model's input and its output into genres."""

    family: str
    flavor: str  # how models.load_classifier loads the native model: sklearn | xgboost | keras
    level: str  # "segment": classify each segment and average; "clip": the whole clip
    classes: tuple[str, ...]  # the order of the native model's probability columns
    feature_settings: dict[str, Any]  # FeatureSettings.to_dict() of the features it trained on
    feature_set: str = feature_sets.HANDCRAFTED  # handcrafted | musicnn | both

    def __post_init__(self) -> None:
        if self.level not in {"clip", "segment"}:
            raise ValueError(f"level must be 'clip' or 'segment', got {self.level!r}")
        if not self.classes:
            raise ValueError("classes must not be empty")
        feature_sets.check_feature_set(self.feature_set)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "classes": list(self.classes)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ServingSpec:
        return cls(
            family=str(values["family"]),
            flavor=str(values["flavor"]),
            level=str(values["level"]),
            classes=tuple(values["classes"]),
            feature_settings=dict(values["feature_settings"]),
            # A spec logged before feature sets existed is a hand-crafted model's.
            feature_set=str(values.get("feature_set", feature_sets.HANDCRAFTED)),
        )

    @property
    def settings(self) -> FeatureSettings:
        # A model logged before loudness normalisation existed keeps computing its features
        # from the clips as they are.
        return FeatureSettings(**{**BEFORE_LOUDNESS, **self.feature_settings})


def probability_column(genre: str) -> str:
    return f"prob_{genre}"


def output_columns(classes: tuple[str, ...] | list[str]) -> list[str]:
    return [GENRE_COLUMN, *(probability_column(genre) for genre in classes), WARNING_COLUMN]


def input_signature(classes: tuple[str, ...] | list[str]) -> ModelSignature:
    """Two optional string inputs (a row uses one of them); genre plus one probability each and
    a warning; the request parameter `timeline` adds the per-segment probabilities."""
    inputs = Schema([ColSpec("string", name, required=False) for name in INPUT_COLUMNS])
    outputs = Schema(
        [
            ColSpec("string", GENRE_COLUMN),
            *(ColSpec("double", probability_column(genre)) for genre in classes),
            ColSpec("string", WARNING_COLUMN, required=False),
        ]
    )
    parameters = ParamSchema([ParamSpec(TIMELINE_PARAM, "boolean", False)])
    return ModelSignature(inputs=inputs, outputs=outputs, params=parameters)
