"""The served model: raw audio in, a genre and the probability of every genre out.

What the registry holds under `models:/<promote.model_name>@champion` is this MLflow pyfunc, so
`mlflow models serve` and `gtzan-mlops predict` both classify audio files, not feature vectors.
It wraps the winning family's native model (a copy, as the artifact `classifier`) with what turns
audio into that model's input: the feature settings, the class order and the level (artifact
`spec`, a JSON file, read-only at serving time) and, for a model on the `musicnn` or `both`
feature set, the MSD_musicnn checkpoint (artifact `musicnn_weights`), so loading it needs
neither the musicnn package nor a network. Decoding goes through `audio.decode_mono` and
features through `feature_sets.extract_sets`, the functions the pipeline trained on, so serving
cannot drift from training.

Input: a DataFrame, one row per clip, with one of two string columns per row:
  `audio_path`   a path to an audio file on the serving machine (can be switched off, see below)
  `audio_base64` the bytes of a WAV/AU/FLAC/MP3/OGG file, base64-encoded
Output: a DataFrame with one row per input row: `genre` (the most probable genre) and one float
column `prob_<genre>` per genre, in the order of params `genres`.

Through `mlflow models serve` (POST /invocations, Content-Type: application/json):
  request   {"dataframe_split": {"columns": ["audio_base64"], "data": [["UklGRiQ..."]]}}
         or {"dataframe_records": [{"audio_path": "/music/song.wav"}]}
  response  {"predictions": [{"genre": "jazz", "prob_blues": 0.01, ..., "prob_rock": 0.02}]}
A bad input (empty, not audio, shorter than one segment, too large or too long, no or both
columns) raises
MlflowException(INVALID_PARAMETER_VALUE), which the scoring server answers with HTTP 400 and
{"error_code": "INVALID_PARAMETER_VALUE", "message": "... row 0: <name>: <problem>"}.

Segment-level models classify every segment of the clip (at most clip_seconds / segment_seconds
of them, from the start) and average the segment probabilities; clip-level models classify the
features of the whole clip.

Two operational settings live in the model config and can be changed at serving time without
re-logging, e.g. `SERVING_MODEL_CONFIG='{"allow_audio_path": false}' mlflow models serve ...`
(the variable MLflow's scoring server reads) or `mlflow.pyfunc.load_model(uri, model_config=...)`:
`max_upload_mb` (largest accepted audio, encoded), `max_audio_seconds` (longest accepted audio,
checked before decoding) and `allow_audio_path` (reading paths on the server; switch it off for
an endpoint others can reach).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models.signature import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types.schema import ColSpec, Schema
from threadpoolctl import threadpool_limits

import gtzan_mlops
from gtzan_mlops import feature_sets
from gtzan_mlops.audio import AudioError, decode_mono
from gtzan_mlops.features import FeatureError, FeatureSettings, warm_up
from gtzan_mlops.musicnn import CHECKPOINT_FILES, MusicnnError

PATH_COLUMN = "audio_path"
BASE64_COLUMN = "audio_base64"
INPUT_COLUMNS = (PATH_COLUMN, BASE64_COLUMN)
GENRE_COLUMN = "genre"
CLASSIFIER_ARTIFACT = "classifier"
SPEC_ARTIFACT = "spec"
MUSICNN_ARTIFACT = "musicnn_weights"
SERVING_MODEL_NAME = "serving_model"  # the logged model's name inside its run

# Distributions the served model imports besides its flavor's (models.FLAVOR_REQUIREMENTS);
# pinned to the installed versions when logged, so an environment built from the model
# (env-manager virtualenv/uv) matches the one it was trained and logged in.
_BASE_REQUIREMENTS = (
    "mlflow",
    "numpy",
    "pandas",
    "scipy",
    "scikit-learn",
    "librosa",
    "soundfile",
    "soxr",
    "pyyaml",
    "cloudpickle",
    "filelock",
)


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
            feature_set=str(values.get("feature_set", feature_sets.HANDCRAFTED)),
        )

    @property
    def settings(self) -> FeatureSettings:
        return FeatureSettings(**self.feature_settings)


def probability_column(genre: str) -> str:
    return f"prob_{genre}"


def output_columns(classes: tuple[str, ...] | list[str]) -> list[str]:
    return [GENRE_COLUMN, *(probability_column(genre) for genre in classes)]


def input_signature(classes: tuple[str, ...] | list[str]) -> ModelSignature:
    """Two optional string inputs (a row uses one of them); genre plus one probability each."""
    inputs = Schema([ColSpec("string", name, required=False) for name in INPUT_COLUMNS])
    outputs = Schema(
        [
            ColSpec("string", GENRE_COLUMN),
            *(ColSpec("double", probability_column(genre)) for genre in classes),
        ]
    )
    return ModelSignature(inputs=inputs, outputs=outputs)


def invalid_input(message: str) -> MlflowException:
    """The error for a bad request: the scoring server answers it with HTTP 400."""
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _present(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, float) and math.isnan(value):
        return False
    return not (isinstance(value, str) and not value.strip())


def decode_base64_audio(text: str, max_bytes: int) -> bytes:
    """The bytes of a base64 string (line breaks and a `data:...;base64,` prefix allowed)."""
    if not isinstance(text, str):
        raise ValueError(f"{BASE64_COLUMN} must be a string, got {type(text).__name__}")
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    compact = "".join(text.split())
    # Checked before decoding, so an oversized body is refused without a second copy in memory.
    if len(compact) * 3 // 4 > max_bytes:
        raise ValueError(
            f"upload of about {len(compact) * 3 / 4 / 2**20:.1f} MB exceeds the limit of "
            f"{max_bytes / 2**20:g} MB"
        )
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ValueError(f"{BASE64_COLUMN} is not valid base64 ({error})") from error


def classify_waveform(
    classifier: Any,
    spec: ServingSpec,
    waveform: np.ndarray,
    file_rate: int | None = None,
    musicnn_weights: Path | None = None,
    musicnn_batch_size: int = 16,
) -> tuple[np.ndarray, int]:
    """Probabilities (n_classes,) of one mono waveform at `file_rate` (default: the spec's
    sample rate), and how many feature rows they come from (segments for a segment-level model,
    1 for a clip-level one). A model on musicnn embeddings needs `musicnn_weights`."""
    settings = spec.settings
    bases = feature_sets.base_sets(spec.feature_set)
    if feature_sets.MUSICNN in bases and musicnn_weights is None:
        raise MusicnnError(f"a model on the {spec.feature_set} feature set needs musicnn weights")
    extracted = feature_sets.extract_sets(
        waveform,
        file_rate or settings.sample_rate,
        settings,
        musicnn_weights if feature_sets.MUSICNN in bases else None,
        include_clip=spec.level == "clip",
        handcrafted=feature_sets.HANDCRAFTED in bases,
        batch_size=musicnn_batch_size,
    )
    if spec.level == "segment":
        rows = extracted.segment_rows(spec.feature_set)
    else:
        rows = extracted.clip_row(spec.feature_set)[np.newaxis, :]
    if len(rows) == 0:
        raise FeatureError("no complete segment to classify")
    frame = pd.DataFrame(rows, columns=feature_sets.columns(spec.feature_set, settings.n_mfcc))
    probabilities = np.asarray(classifier.predict_proba(frame), dtype=np.float64)
    if probabilities.shape != (len(rows), len(spec.classes)):
        raise RuntimeError(
            f"the classifier returned probabilities of shape {probabilities.shape}, expected "
            f"({len(rows)}, {len(spec.classes)})"
        )
    return probabilities.mean(axis=0), len(rows)


class GenreClassifier(mlflow.pyfunc.PythonModel):
    """Raw audio in, genre and probabilities out (see the module docstring for the shapes).

    Logged as code (serving_model.py), not pickled: everything it needs is read from the
    artifacts and the model config in `load_context`.
    """

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from gtzan_mlops.models import load_classifier  # the training helpers' loader

        spec_path = Path(context.artifacts[SPEC_ARTIFACT])
        self.spec = ServingSpec.from_dict(json.loads(spec_path.read_text(encoding="utf-8")))
        self.classifier = load_classifier(context.artifacts[CLASSIFIER_ARTIFACT], self.spec.flavor)
        config = context.model_config or {}
        self.max_upload_bytes = int(float(config.get("max_upload_mb", 50)) * 2**20)
        self.max_audio_seconds = float(config.get("max_audio_seconds", 600))
        self.allow_audio_path = bool(config.get("allow_audio_path", True))
        self.musicnn_batch_size = int(config.get("musicnn_batch_size", 16))
        # The checkpoint logged with the model (the folder holding its ".index" file).
        weights = context.artifacts.get(MUSICNN_ARTIFACT)
        self.musicnn_weights = Path(weights) if weights else None
        # Single-threaded BLAS: the features' matrix products are small, and BLAS threads only
        # contend with each other and with concurrent requests (segments of a 30 s clip, this
        # 2-core machine: 546 ms with one BLAS thread, 625 ms with the default two).
        threadpool_limits(1)
        # librosa's JIT code compiled (or read from numba's cache) now, one server worker at a
        # time, rather than in the first request and in several workers at once.
        warm_up(self.spec.settings)
        if feature_sets.uses_musicnn(self.spec.feature_set):
            from gtzan_mlops import musicnn

            if self.musicnn_weights is None:
                raise MusicnnError("the model has no musicnn_weights artifact")
            musicnn.embedder(self.musicnn_weights, self.musicnn_batch_size)  # built once, here

    def _waveform(self, row: dict[str, Any], index: int) -> tuple[str, np.ndarray, int]:
        """The name used in messages, the decoded mono waveform of one input row and its rate."""
        path, encoded = row.get(PATH_COLUMN), row.get(BASE64_COLUMN)
        has_path, has_bytes = _present(path), _present(encoded)
        if has_path == has_bytes:
            raise ValueError(
                f"row {index}: give exactly one of {PATH_COLUMN} or {BASE64_COLUMN} "
                f"({'both' if has_path else 'neither'} given)"
            )
        if has_path:
            if not self.allow_audio_path:
                raise ValueError(
                    f"row {index}: {PATH_COLUMN} is switched off on this server; send the file "
                    f"as {BASE64_COLUMN}"
                )
            name = str(path)
            file = Path(name).expanduser()
            if file.is_file() and file.stat().st_size > self.max_upload_bytes:
                raise ValueError(
                    f"row {index}: {name}: file of {file.stat().st_size / 2**20:.1f} MB exceeds "
                    f"the limit of {self.max_upload_bytes / 2**20:g} MB"
                )
            return name, *decode_mono(file, name=name, max_seconds=self.max_audio_seconds)
        name = f"{BASE64_COLUMN}[{index}]"
        try:
            data = decode_base64_audio(encoded, self.max_upload_bytes)
        except ValueError as error:
            raise ValueError(f"row {index}: {name}: {error}") from error
        return name, *decode_mono(data, name=name, max_seconds=self.max_audio_seconds)

    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        if isinstance(model_input, dict):
            model_input = pd.DataFrame(model_input)
        if not isinstance(model_input, pd.DataFrame):
            raise invalid_input(
                f"expected a table with a column {PATH_COLUMN} or {BASE64_COLUMN}, got "
                f"{type(model_input).__name__}"
            )
        if not set(INPUT_COLUMNS) & set(model_input.columns):
            raise invalid_input(
                f"the input has no {PATH_COLUMN} or {BASE64_COLUMN} column (one of them per row, "
                "one row per clip)"
            )
        if model_input.empty:
            raise invalid_input("the input holds no clips (0 rows)")

        # Every row is decoded and checked before any is classified, so one request reports all
        # of its bad rows at once, and cheaply.
        waveforms: list[tuple[np.ndarray, int]] = []
        problems: list[str] = []
        segment_seconds = self.spec.settings.segment_seconds
        rows = model_input.reindex(columns=list(INPUT_COLUMNS)).to_dict("records")
        for index, row in enumerate(rows):
            try:
                name, waveform, file_rate = self._waveform(row, index)
            except (AudioError, ValueError, OSError) as error:
                message = str(error)
                problems.append(message if message.startswith("row ") else f"row {index}: {error}")
                continue
            seconds = len(waveform) / file_rate
            if seconds < segment_seconds:
                problems.append(
                    f"row {index}: {name}: {seconds:.2f} s of audio is shorter than one "
                    f"{segment_seconds:g} s segment"
                )
                continue
            waveforms.append((waveform, file_rate))
        if problems:
            raise invalid_input("; ".join(problems))

        probabilities = []
        for index, (waveform, file_rate) in enumerate(waveforms):
            try:
                probabilities.append(
                    classify_waveform(
                        self.classifier,
                        self.spec,
                        waveform,
                        file_rate,
                        self.musicnn_weights,
                        self.musicnn_batch_size,
                    )[0]
                )
            except FeatureError as error:
                raise invalid_input(f"row {index}: {error}") from error
        table = np.vstack(probabilities)
        result = pd.DataFrame(
            table, columns=[probability_column(genre) for genre in self.spec.classes]
        )
        result.insert(0, GENRE_COLUMN, [self.spec.classes[i] for i in table.argmax(axis=1)])
        return result


def synthetic_example_clip(settings: FeatureSettings, seconds: float | None = None) -> bytes:
    """A small synthetic WAV (8 kHz, 8-bit: a few kB) one segment long plus a margin: the
    model's input example, which also documents the request format in the logged model."""
    import soundfile

    rate = 8000
    duration = seconds if seconds is not None else settings.segment_seconds + 0.5
    time = np.arange(int(duration * rate)) / rate
    rng = np.random.default_rng(0)
    tone = 0.4 * np.sin(2 * np.pi * 220.0 * time) + 0.05 * rng.standard_normal(len(time))
    buffer = io.BytesIO()
    soundfile.write(buffer, tone.astype(np.float32), rate, format="WAV", subtype="PCM_U8")
    return buffer.getvalue()


def pip_requirements(flavor: str, feature_set: str = feature_sets.HANDCRAFTED) -> list[str]:
    """The installed versions of what the served model imports (TensorFlow and Keras run the
    musicnn embedding, whatever the classifier's flavor)."""
    from gtzan_mlops.models import FLAVOR_REQUIREMENTS, installed_requirements

    names = [*_BASE_REQUIREMENTS, *FLAVOR_REQUIREMENTS.get(flavor, ())]
    if feature_sets.uses_musicnn(feature_set):
        names += [name for name in FLAVOR_REQUIREMENTS["keras"] if name not in names]
    return installed_requirements(tuple(names))


def _weights_artifact(weights: Path, scratch: Path) -> Path:
    """A folder holding only the checkpoint files the model reads, and their licence notice."""
    folder = scratch / MUSICNN_ARTIFACT
    folder.mkdir()
    for name in CHECKPOINT_FILES:
        shutil.copyfile(weights / name, folder / name)
    shutil.copyfile(Path(__file__).with_name("MUSICNN_NOTICE"), folder / "NOTICE")
    return folder


def package_dir() -> Path:
    """The gtzan_mlops package folder, logged with the model (code_paths) so that the served
    model imports the same extraction code even where this project is not installed."""
    return Path(gtzan_mlops.__file__).resolve().parent


def log_serving_model(
    spec: ServingSpec,
    classifier_uri: str,
    max_upload_mb: float,
    allow_audio_path: bool = True,
    max_audio_seconds: float = 600.0,
    name: str = SERVING_MODEL_NAME,
    input_example: bool = True,
    musicnn_weights: Path | None = None,
    musicnn_batch_size: int = 16,
) -> mlflow.models.model.ModelInfo:
    """Log the serving pyfunc into the active run; returns its ModelInfo (`.model_uri`).

    `classifier_uri` is the native model (e.g. `models:/m-...` or `runs:/<id>/model`); MLflow
    copies it into the pyfunc's artifacts, so the served model does not depend on the run. A
    model on musicnn embeddings needs `musicnn_weights` (the checkpoint folder): its files and
    licence notice are logged with the model.
    """
    with tempfile.TemporaryDirectory() as scratch:
        spec_path = Path(scratch) / "serving_spec.json"
        spec_path.write_text(json.dumps(spec.to_dict(), indent=2) + "\n", encoding="utf-8")
        artifacts = {CLASSIFIER_ARTIFACT: classifier_uri, SPEC_ARTIFACT: str(spec_path)}
        if feature_sets.uses_musicnn(spec.feature_set):
            if musicnn_weights is None:
                raise MusicnnError(f"a model on {spec.feature_set} features needs musicnn weights")
            artifacts[MUSICNN_ARTIFACT] = str(_weights_artifact(musicnn_weights, Path(scratch)))
        example = None
        if input_example:
            clip = synthetic_example_clip(spec.settings)
            example = pd.DataFrame({BASE64_COLUMN: [base64.b64encode(clip).decode("ascii")]})
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(Path(__file__).with_name("serving_model.py")),
            artifacts=artifacts,
            model_config={
                "max_upload_mb": float(max_upload_mb),
                "allow_audio_path": bool(allow_audio_path),
                "max_audio_seconds": float(max_audio_seconds),
                "musicnn_batch_size": int(musicnn_batch_size),
            },
            signature=input_signature(spec.classes),
            input_example=example,
            code_paths=[str(package_dir())],
            pip_requirements=pip_requirements(spec.flavor, spec.feature_set),
            metadata={"gtzan": spec.to_dict()},
        )
