"""The served model: raw audio of whole songs in, a genre and the probability of every genre out.

What the registry holds under `models:/<promote.model_name>@champion` is this MLflow pyfunc, so
`mlflow models serve` and `gtzan-mlops predict` both classify audio files, not feature vectors.
It wraps the winning family's native model (a copy, as the artifact `classifier`) with what turns
audio into that model's input: the feature settings, the class order and the level (artifact
`spec`, a JSON file, read-only at serving time) and, for a model on the `musicnn` or `both`
feature set, the MSD_musicnn checkpoint (artifact `musicnn_weights`), so loading it needs
neither the musicnn package nor a network. Decoding goes through `audio.decode_audio` and
features through `feature_sets.extract_sets`, the functions the pipeline trained on, so serving
cannot drift from training.

Input: a DataFrame, one row per song, with one of two string columns per row:
  `audio_base64` the bytes of a WAV/AU/FLAC/MP3/OGG file, base64-encoded
  `audio_path`   a file under the server's `audio_root` (off unless `allow_audio_path`)
Output: one row per input row: `genre` (the most probable genre), one float column
`prob_<genre>` per genre in the order of params `genres`, and `warning` (null, or why the answer
is less sure, e.g. a truncated file). With the request parameter `timeline` true, a `timeline`
column holds, per analysed segment, its start and end in seconds, its genre and probabilities.

Through `mlflow models serve` (POST /invocations, Content-Type: application/json):
  request   {"dataframe_split": {"columns": ["audio_base64"], "data": [["UklGRiQ..."]]},
             "params": {"timeline": true}}
  response  {"predictions": [{"genre": "jazz", "prob_blues": 0.01, ..., "warning": null}]}
A bad request (no or both columns, too many rows, not audio, silent, shorter than one segment,
over a limit) is answered HTTP 400 with {"error_code": "INVALID_PARAMETER_VALUE", "message":
"row 0: <name>: <problem>"}; a busy server 429; an unexpected failure 500 with a message and no
stack trace (the trace goes to the server's log).

Whole songs: a song is cut into excerpts of `clip_seconds` (GTZAN's 30 s clips), each turned
into features exactly as the pipeline does a clip; a segment-level model classifies every
segment, a clip-level one every excerpt, and the probabilities are averaged. Beyond
`max_segments` segments, evenly spaced excerpts cover the song instead of all of them.

Bounds on each request (ServingLimits, params `serving`, stored in the model config and
overridable at serve time, e.g. `SERVING_MODEL_CONFIG='{"max_rows": 4}' mlflow models serve`):
rows per request and their total size; per file its encoded size, and from its header, before
anything is decoded, its channels, sample rate, duration and decoded size. Files are decoded in
blocks and down-mixed as read, and at most `max_concurrent_decodes` rows are decoded and
classified at once per server process, in the model's own long-lived threads (MLflow runs each
request in a thread of its own). The request body itself is read whole by MLflow's scoring
server before any of this: `gtzan-mlops serve` bounds it, and admits requests, in the app
(serving_app.py); in front of a bare `mlflow models serve`, a proxy must (deploy/nginx.conf).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import json
import logging
import math
import os
import shutil
import stat
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, BinaryIO

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models.signature import ModelSignature
from mlflow.protos.databricks_pb2 import (
    INTERNAL_ERROR,
    INVALID_PARAMETER_VALUE,
    REQUEST_LIMIT_EXCEEDED,
    TEMPORARILY_UNAVAILABLE,
)
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema
from threadpoolctl import threadpool_limits

import gtzan_mlops
from gtzan_mlops.data.audio import (
    AudioError,
    AudioHeader,
    DecodeLimits,
    QualityGates,
    decode_audio,
    probe_audio,
    quality_problems,
)
from gtzan_mlops.features import feature_sets, musicnn
from gtzan_mlops.features.handcrafted import FeatureError, FeatureSettings, segment_bounds, warm_up
from gtzan_mlops.features.musicnn import CHECKPOINT_FILES, MusicnnError
from gtzan_mlops.settings.loading import ConfigError, section

PATH_COLUMN = "audio_path"
BASE64_COLUMN = "audio_base64"
INPUT_COLUMNS = (PATH_COLUMN, BASE64_COLUMN)
GENRE_COLUMN = "genre"
WARNING_COLUMN = "warning"
TIMELINE_COLUMN = "timeline"
TIMELINE_PARAM = "timeline"  # request parameter: add the per-segment timeline
CLASSIFIER_ARTIFACT = "classifier"
SPEC_ARTIFACT = "spec"
MUSICNN_ARTIFACT = "musicnn_weights"
SERVING_MODEL_NAME = "serving_model"  # the logged model's name inside its run
BEFORE_LOUDNESS = {"loudness_target_dbfs": None, "loudness_max_gain_db": 0.0}
BEFORE_MAX_PEAK = {"max_peak": math.inf}
# A model logged before admission existed waited for a slot as long as MLflow's default request
# timeout allowed, and ran until then.
BEFORE_ADMISSION = {"max_queue_wait_s": 60.0, "request_timeout_s": 60.0}
# Set in the request's context by the served app's guard (serving_app.py) when the request
# arrives: the model's time budget runs from then, not from when MLflow has parsed the body.
REQUEST_ARRIVAL: ContextVar[float | None] = ContextVar("gtzan_request_arrival", default=None)

_log = logging.getLogger(__name__)

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
        # A model logged before loudness normalisation existed was trained on the clips as they
        # were: it keeps computing its features that way.
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


class ServingError(MlflowException):
    """An error the served model answers with, its message exactly as written here.

    MLflow's scoring server rewrites the message of every MlflowException out of `predict` as
    "Failed to predict data '<the request's DataFrame>'. Error: <message>" (mlflow/pyfunc/
    scoring_server/__init__.py, `invocations`), and that DataFrame's repr quotes the first
    characters of every base64 cell: the client's own bytes, echoed. Our messages name the
    row and the problem instead, so the message is set once and later assignments are
    ignored."""

    @property
    def message(self) -> str:
        return self._message

    @message.setter
    def message(self, value: str) -> None:
        if not hasattr(self, "_message"):
            self._message = value


def invalid_input(message: str) -> MlflowException:
    """The error for a bad request: the scoring server answers it with HTTP 400."""
    return ServingError(message, error_code=INVALID_PARAMETER_VALUE)


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
            f"upload of about {len(compact) * 3 / 4 / 2**20:.1f} MiB exceeds the limit of "
            f"{max_bytes / 2**20:g} MiB"
        )
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ValueError(f"{BASE64_COLUMN} is not valid base64 ({error})") from error


@dataclass(frozen=True)
class ServingLimits:
    """What one request may cost and read (params `serving`; the quality gates from `data`).
    Stored as the model config of the served model, so every field can be overridden at serve
    time."""

    max_rows: int  # songs per request
    max_request_mib: float  # their encoded audio together
    max_upload_mib: float  # one song's encoded audio
    max_audio_seconds: float  # one song's duration, from its header
    max_channels: int
    max_sample_rate: int
    max_decoded_mib: float  # frames x channels as float32, from the header
    max_segments: int  # segments analysed per song; beyond it, evenly spaced excerpts
    max_concurrent_decodes: int  # rows decoded and classified at once, per server process
    max_queue_wait_s: float  # longest wait for a slot, from arrival, before a 429
    request_timeout_s: float  # a request's whole time budget, from arrival; then its work stops
    allow_audio_path: bool
    audio_root: str | None  # the only folder audio_path may read (symlinks resolved)
    musicnn_batch_size: int  # patches per MSD_musicnn pass: its activations' memory
    min_duration_s: float
    silence_peak: float
    max_peak: float

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> ServingLimits:
        serving = section(params, "serving")
        known = {field.name for field in fields(cls)} - {
            "min_duration_s",
            "silence_peak",
            "max_peak",
        }
        unknown = sorted(set(serving) - known)
        if unknown:
            raise ConfigError(f"params serving.{unknown[0]}: unknown setting")
        data = section(params, "data")
        values = {
            **serving,
            "min_duration_s": data["min_duration_s"],
            "silence_peak": data["silence_peak"],
            "max_peak": data["max_peak"],
        }
        try:
            return cls.from_config(values)
        except ValueError as error:
            raise ConfigError(f"params serving: {error}") from error

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ServingLimits:
        """From a model config (or params), every field required and of its type."""
        # A model logged before the max_peak gate or admission existed keeps serving as it did.
        config = {**BEFORE_MAX_PEAK, **BEFORE_ADMISSION, **config}
        values: dict[str, Any] = {}
        for field in fields(cls):
            if field.name not in config:
                raise ValueError(f"{field.name} is missing")
            value = config[field.name]
            if field.name == "audio_root":
                values[field.name] = None if value in (None, "") else str(value)
            elif field.name == "allow_audio_path":
                if not isinstance(value, bool):
                    raise ValueError(f"{field.name} must be true or false, got {value!r}")
                values[field.name] = value
            else:
                kind = int if field.type == "int" else float
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ValueError(f"{field.name} must be a number, got {value!r}")
                if value < 0 or (kind is int and value != int(value)):
                    raise ValueError(f"{field.name} must be a non-negative {kind.__name__}")
                values[field.name] = kind(value)
        for name in ("max_rows", "max_segments", "max_concurrent_decodes", "musicnn_batch_size"):
            if values[name] < 1:
                raise ValueError(f"{name} must be at least 1")
        if values["request_timeout_s"] <= 0:
            raise ValueError("request_timeout_s must be above 0")
        if values["allow_audio_path"] and values["audio_root"] is None:
            raise ValueError("allow_audio_path needs an audio_root to read from")
        return cls(**values)

    def to_config(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def decode(self) -> DecodeLimits:
        return DecodeLimits(
            max_seconds=self.max_audio_seconds,
            max_channels=self.max_channels,
            max_sample_rate=self.max_sample_rate,
            max_decoded_mib=self.max_decoded_mib,
        )

    @property
    def gates(self) -> QualityGates:
        return QualityGates(self.min_duration_s, self.silence_peak, self.max_peak)


@dataclass(frozen=True)
class SegmentResult:
    """One analysed stretch of a song: a segment (segment-level model) or an excerpt."""

    start_s: float
    end_s: float
    probabilities: np.ndarray  # (n_classes,)


def song_windows(
    n_samples: int, file_rate: int, settings: FeatureSettings, level: str, max_segments: int
) -> list[tuple[int, int]]:
    """Sample ranges (at `file_rate`) of the excerpts of a song that are classified.

    Back to back `clip_seconds` excerpts cover the song, each processed as the pipeline
    processes a clip. A tail shorter than one segment belongs to the excerpt before it (so a
    30.01 s GTZAN clip is one excerpt, as in the pipeline); a longer tail is an excerpt of its
    own, for a clip-level model one ending at the song's end (overlapping its neighbour, as the
    last segment of a clip does). When the excerpts hold more than `max_segments` segments,
    `max_segments // segments per clip` excerpts evenly spaced over the song are classified."""
    window = round(settings.clip_seconds * file_rate)
    segment = round(settings.segment_seconds * file_rate)
    starts = list(range(0, n_samples, window))
    if len(starts) > 1 and n_samples - starts[-1] < segment:
        starts.pop()
    windows = [(start, min(start + window, n_samples)) for start in starts]
    windows[-1] = (windows[-1][0], n_samples)
    if level == "clip" and len(windows) > 1:
        windows[-1] = (n_samples - window, n_samples)
    most = max(1, max_segments // settings.max_segments)
    if len(windows) > most:
        spaced = np.linspace(0, n_samples - window, most).round().astype(int)
        windows = [(int(start), int(start) + window) for start in spaced]
    return windows


def classify_song(
    classifier: Any,
    spec: ServingSpec,
    waveform: np.ndarray,
    file_rate: int,
    max_segments: int,
    musicnn_weights: Path | None = None,
    musicnn_batch_size: int | None = None,
    deadline: float | None = None,
) -> list[SegmentResult]:
    """The probabilities of every analysed segment (or excerpt) of one mono song at
    `file_rate`, in time order (see song_windows). A model on musicnn embeddings needs
    `musicnn_weights`. Past `deadline` (time.monotonic()) it stops with RequestTimeout."""
    settings = spec.settings
    bases = feature_sets.base_sets(spec.feature_set)
    if feature_sets.MUSICNN in bases and musicnn_weights is None:
        raise MusicnnError(f"a model on the {spec.feature_set} feature set needs musicnn weights")
    columns = feature_sets.columns(spec.feature_set, settings.n_mfcc)
    results: list[SegmentResult] = []
    for begin, end in song_windows(len(waveform), file_rate, settings, spec.level, max_segments):
        if deadline is not None and time.monotonic() > deadline:
            raise RequestTimeout("the song took longer than the server's request timeout")
        extracted = feature_sets.extract_sets(
            waveform[begin:end],
            file_rate,
            settings,
            musicnn_weights if feature_sets.MUSICNN in bases else None,
            include_clip=spec.level == "clip",
            handcrafted=feature_sets.HANDCRAFTED in bases,
            batch_size=musicnn_batch_size,
        )
        offset = begin / file_rate
        if spec.level == "segment":
            rows = extracted.segment_rows(spec.feature_set)
            spans = [
                (offset + start / settings.sample_rate, offset + stop / settings.sample_rate)
                for start, stop in segment_bounds(extracted.length, settings)
            ]
        else:
            rows = extracted.clip_row(spec.feature_set)[np.newaxis, :]
            spans = [(offset, end / file_rate)]
        if len(rows) == 0:
            continue
        probabilities = np.asarray(
            classifier.predict_proba(pd.DataFrame(rows, columns=columns)), dtype=np.float64
        )
        if probabilities.shape != (len(rows), len(spec.classes)):
            raise RuntimeError(
                f"the classifier returned probabilities of shape {probabilities.shape}, "
                f"expected ({len(rows)}, {len(spec.classes)})"
            )
        results += [SegmentResult(a, b, p) for (a, b), p in zip(spans, probabilities, strict=True)]
    if not results:
        raise FeatureError("no complete segment to classify")
    return results


class RequestTimeout(Exception):
    """The request ran past the scoring server's timeout: its work stops (HTTP 503)."""


class ServerBusy(RequestTimeout):
    """No decoding slot came free before the request's timeout (HTTP 429)."""


def request_deadline(request_timeout_s: float) -> float:
    """When work on the current request stops (time.monotonic()): `request_timeout_s` after it
    arrived at the served app's guard (REQUEST_ARRIVAL), else after now, and never later than
    the scoring server's own timeout (MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT, which
    `mlflow models serve` sets): past it the client has its 504, and nobody reads the answer."""
    arrival = REQUEST_ARRIVAL.get()
    budget = request_timeout_s
    scoring_timeout = os.environ.get("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT")
    with contextlib.suppress(ValueError):
        budget = min(budget, float(scoring_timeout)) if scoring_timeout else budget
    return (time.monotonic() if arrival is None else arrival) + budget


_PATH_REFUSAL = (
    f"{PATH_COLUMN}: no readable regular audio file at this path under the server's audio folder"
)


def open_under_root(text: str, root: str, max_bytes: int) -> BinaryIO:
    """An open file of `text` (absolute, or relative to `root`) if its real path, symlinks
    resolved, is a regular file under `root`; else ValueError with one message for every
    refusal (missing, outside, unreadable, not a regular file), so that nothing outside the
    root can be probed. No `~` expansion. Files larger than `max_bytes` are refused too."""
    base = Path(os.path.realpath(root))
    try:
        real = Path(os.path.realpath(base / text, strict=True))
        if not real.is_relative_to(base):
            raise ValueError(_PATH_REFUSAL)
        # O_NONBLOCK: a FIFO swapped in after the check must not hang the open; O_NOFOLLOW: nor
        # may a symlink.
        descriptor = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except (OSError, ValueError):
        raise ValueError(_PATH_REFUSAL) from None
    info = os.fstat(descriptor)
    if not stat.S_ISREG(info.st_mode):
        os.close(descriptor)
        raise ValueError(_PATH_REFUSAL)
    if info.st_size > max_bytes:
        os.close(descriptor)
        raise ValueError(
            f"file of {info.st_size / 2**20:.1f} MiB exceeds the limit of {max_bytes / 2**20:g} MiB"
        )
    handle = os.fdopen(descriptor, "rb")
    return handle


@dataclass
class _Row:
    """One request row after the cheap checks: how to open its audio and what it declares."""

    name: str
    open: Any  # () -> BinaryIO
    header: AudioHeader


class GenreClassifier(mlflow.pyfunc.PythonModel):
    """Raw audio in, genre and probabilities out (see the module docstring for the shapes).

    Logged as code (serving_model.py), not pickled: everything it needs is read from the
    artifacts and the model config in `load_context`.
    """

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from gtzan_mlops.models.zoo import load_classifier  # the training helpers' loader

        spec_path = Path(context.artifacts[SPEC_ARTIFACT])
        self.spec = ServingSpec.from_dict(json.loads(spec_path.read_text(encoding="utf-8")))
        self.classifier = load_classifier(context.artifacts[CLASSIFIER_ARTIFACT], self.spec.flavor)
        try:
            self.limits = ServingLimits.from_config(context.model_config or {})
        except ValueError as error:
            raise MlflowException(f"the served model's config: {error}") from None
        self._decoding = threading.BoundedSemaphore(self.limits.max_concurrent_decodes)
        # Songs are decoded and classified in this many long-lived threads, not in whichever of
        # MLflow's request threads asked: TensorFlow's oneDNN keeps a scratch pool per thread
        # that has run the musicnn network (about 95 MiB per patch of a batch, never returned),
        # and glibc an arena, so the server's memory is bounded by the slots, not by how many
        # threads MLflow's pool has used.
        self._workers = ThreadPoolExecutor(
            self.limits.max_concurrent_decodes, thread_name_prefix="gtzan-classify"
        )
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
            from gtzan_mlops.features import musicnn

            if self.musicnn_weights is None:
                raise MusicnnError("the model has no musicnn_weights artifact")
            musicnn.embedder(self.musicnn_weights, self.limits.musicnn_batch_size)  # built once

    def _row(self, row: dict[str, Any], index: int) -> _Row:
        """The cheap checks of one row: its source, size and header, before any decoding."""
        limits = self.limits
        max_bytes = int(limits.max_upload_mib * 2**20)
        path, encoded = row.get(PATH_COLUMN), row.get(BASE64_COLUMN)
        has_path, has_bytes = _present(path), _present(encoded)
        if has_path == has_bytes:
            raise ValueError(
                f"give exactly one of {PATH_COLUMN} or {BASE64_COLUMN} "
                f"({'both' if has_path else 'neither'} given)"
            )
        if has_path:
            if not limits.allow_audio_path or limits.audio_root is None:
                raise ValueError(
                    f"{PATH_COLUMN} is switched off on this server; send the file as "
                    f"{BASE64_COLUMN}"
                )
            if not isinstance(path, str):
                raise ValueError(f"{PATH_COLUMN} must be a string")
            name, root = path, limits.audio_root  # the client's own words, never the real path

            def opener() -> BinaryIO:
                try:
                    return open_under_root(path, root, max_bytes)
                except ValueError as error:
                    refusal = str(error) == _PATH_REFUSAL
                    raise ValueError(str(error) if refusal else f"{path}: {error}") from None
        else:
            name = f"{BASE64_COLUMN}[{index}]"
            try:
                data = decode_base64_audio(encoded, max_bytes)
            except ValueError as error:
                raise ValueError(f"{name}: {error}") from None

            def opener() -> BinaryIO:
                return io.BytesIO(data)

        with opener() as handle:
            header = probe_audio(handle, name, limits.decode)
        shortest = max(limits.min_duration_s, self.spec.settings.segment_seconds)
        if header.duration_s < shortest:
            raise ValueError(
                f"{name}: {header.duration_s:.2f} s of audio is shorter than "
                + (
                    f"one {self.spec.settings.segment_seconds:g} s segment"
                    if shortest == self.spec.settings.segment_seconds
                    else f"min_duration_s {limits.min_duration_s:g} s"
                )
            )
        return _Row(name, opener, header)

    def _classify(self, row: _Row, deadline: float | None) -> tuple[list[SegmentResult], str]:
        """Decode and classify one row, at most max_concurrent_decodes at once; its warning."""
        # A slot must come free within max_queue_wait_s (and before the deadline).
        wait = self.limits.max_queue_wait_s
        if deadline is not None:
            wait = min(wait, deadline - time.monotonic())
        if not self._decoding.acquire(timeout=max(0.0, wait)):
            raise ServerBusy("the server is busy: too many songs are being decoded; retry later")
        try:
            return self._workers.submit(self._decode_and_classify, row, deadline).result()
        finally:
            self._decoding.release()

    def _decode_and_classify(
        self, row: _Row, deadline: float | None
    ) -> tuple[list[SegmentResult], str]:
        """In one of the model's own worker threads: decode, check and classify one row."""
        with row.open() as handle:
            decoded = decode_audio(handle, row.name, self.limits.decode)
        problems = quality_problems(
            decoded.duration_s, decoded.peak, decoded.truncation, self.limits.gates
        )
        refused = [problem for problem in problems if problem.kind != "truncated"]
        if refused:
            raise ValueError(f"{row.name}: {refused[0].message}")
        warning = "; ".join(problem.message for problem in problems)
        segments = classify_song(
            self.classifier,
            self.spec,
            decoded.waveform,
            decoded.sample_rate,
            self.limits.max_segments,
            self.musicnn_weights,
            self.limits.musicnn_batch_size,
            deadline,
        )
        return segments, warning

    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        try:
            return self._predict(model_input, params or {})
        except MlflowException:
            raise
        except ServerBusy as error:
            raise ServingError(str(error), error_code=REQUEST_LIMIT_EXCEEDED) from None
        except RequestTimeout as error:
            raise ServingError(str(error), error_code=TEMPORARILY_UNAVAILABLE) from None
        except Exception:
            # The trace stays in the server's log: a response never carries it, nor paths.
            _log.exception("unexpected error while classifying a request")
            raise ServingError(
                "internal error while classifying the audio (details are in the server's log)",
                error_code=INTERNAL_ERROR,
            ) from None

    def _predict(self, model_input: Any, params: dict[str, Any]) -> pd.DataFrame:
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
                "one row per song)"
            )
        if model_input.empty:
            raise invalid_input("the input holds no songs (0 rows)")
        limits = self.limits
        if len(model_input) > limits.max_rows:
            raise invalid_input(
                f"{len(model_input)} rows exceed the limit of {limits.max_rows} songs per request"
            )
        if BASE64_COLUMN in model_input.columns:
            encoded = model_input[BASE64_COLUMN].map(lambda v: len(v) if isinstance(v, str) else 0)
            total_mib = int(encoded.sum()) * 3 / 4 / 2**20
            if total_mib > limits.max_request_mib:
                raise invalid_input(
                    f"the request's audio, about {total_mib:.1f} MiB, exceeds the limit of "
                    f"{limits.max_request_mib:g} MiB per request"
                )
        deadline = request_deadline(limits.request_timeout_s)

        # Every row is checked from its header before any is decoded, so one request reports
        # all of its bad rows at once, and cheaply.
        checked: list[_Row] = []
        problems: list[str] = []
        rows = model_input.reindex(columns=list(INPUT_COLUMNS)).to_dict("records")
        for index, row in enumerate(rows):
            try:
                checked.append(self._row(row, index))
            except (AudioError, ValueError) as error:
                problems.append(f"row {index}: {error}")
        if problems:
            raise invalid_input("; ".join(problems))

        # Then one row at a time: a request holds one decoded song.
        songs: list[list[SegmentResult]] = []
        warnings: list[str | None] = []
        for index, row in enumerate(checked):
            try:
                segments, warning = self._classify(row, deadline)
            except (AudioError, FeatureError, ValueError) as error:
                raise invalid_input(f"row {index}: {error}") from None
            songs.append(segments)
            warnings.append(warning or None)
        table = np.vstack([np.mean([s.probabilities for s in song], axis=0) for song in songs])
        classes = self.spec.classes
        result = pd.DataFrame(table, columns=[probability_column(genre) for genre in classes])
        result.insert(0, GENRE_COLUMN, [classes[i] for i in table.argmax(axis=1)])
        result[WARNING_COLUMN] = warnings
        if params.get(TIMELINE_PARAM):
            result[TIMELINE_COLUMN] = [timeline_records(song, classes) for song in songs]
        return result


def timeline_records(song: list[SegmentResult], classes: tuple[str, ...]) -> list[dict[str, Any]]:
    """The JSON of a song's timeline: per segment its span, genre and probabilities."""
    return [
        {
            "start_s": round(segment.start_s, 3),
            "end_s": round(segment.end_s, 3),
            GENRE_COLUMN: classes[int(segment.probabilities.argmax())],
            "probabilities": dict(zip(classes, segment.probabilities.tolist(), strict=True)),
        }
        for segment in song
    ]


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
    from gtzan_mlops.models.zoo import FLAVOR_REQUIREMENTS, installed_requirements

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
    shutil.copyfile(Path(musicnn.__file__).with_name("MUSICNN_NOTICE"), folder / "NOTICE")
    return folder


def package_dir() -> Path:
    """The gtzan_mlops package folder, logged with the model (code_paths) so that the served
    model imports the same extraction code even where this project is not installed."""
    return Path(gtzan_mlops.__file__).resolve().parent


def log_serving_model(
    spec: ServingSpec,
    classifier_uri: str,
    limits: ServingLimits,
    name: str = SERVING_MODEL_NAME,
    input_example: bool = True,
    musicnn_weights: Path | None = None,
) -> mlflow.models.model.ModelInfo:
    """Log the serving pyfunc into the active run; returns its ModelInfo (`.model_uri`).

    `classifier_uri` is the native model (e.g. `models:/m-...` or `runs:/<id>/model`); MLflow
    copies it into the pyfunc's artifacts, so the served model does not depend on the run.
    `limits` become its model config. A model on musicnn embeddings needs `musicnn_weights`
    (the checkpoint folder): its files and licence notice are logged with the model.
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
            python_model=str(Path(__file__).with_name("model_entry.py")),
            artifacts=artifacts,
            model_config=limits.to_config(),
            signature=input_signature(spec.classes),
            input_example=example,
            code_paths=[str(package_dir())],
            pip_requirements=pip_requirements(spec.flavor, spec.feature_set),
            metadata={"gtzan": spec.to_dict()},
        )
