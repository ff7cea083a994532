"""The served model: raw audio of whole songs in, a genre and the probability of every genre out.

What the registry holds under `models:/<promote.model_name>@champion` is this MLflow pyfunc, so
`mlflow models serve` and `gtzan-mlops predict` both classify audio files, not feature vectors.
It wraps the winning family's native model (a copy, as the artifact `classifier`) with what turns
audio into that model's input: the feature settings, the class order and the level (artifact
`spec`, a JSON file, read-only at serving time: serving/spec.py) and, for a model on the
`musicnn` or `both` feature set, the MSD_musicnn checkpoint (artifact `musicnn_weights`), so
loading it needs neither the musicnn package nor a network (serving/packaging.py logs it).
Decoding goes through `audio.decode_audio` and features through `feature_sets.extract_sets`, the
functions the pipeline trained on, so serving cannot drift from training (serving/windows.py).

The request and answer columns are serving/spec.py's. Through `mlflow models serve` (POST
/invocations, Content-Type: application/json):
  request   {"dataframe_split": {"columns": ["audio_base64"], "data": [["UklGRiQ..."]]},
             "params": {"timeline": true}}
  response  {"predictions": [{"genre": "jazz", "prob_blues": 0.01, ..., "warning": null}]}
A bad request (no or both columns, too many rows, not audio, silent, shorter than one segment,
over a limit) is answered HTTP 400 with {"error_code": "INVALID_PARAMETER_VALUE", "message":
"row 0: <name>: <problem>"}; a busy server 429; an unexpected failure 500 with a message and no
stack trace (the trace goes to the server's log).

Each request is bounded by the model config (serving/limits.py). Files are decoded in blocks and
down-mixed as read, and at most `max_concurrent_decodes` rows are decoded and classified at once
per server process, in the model's own long-lived threads (MLflow runs each request in a thread
of its own). The request body itself is read whole by MLflow's scoring server before any of
this: `gtzan-mlops serve` bounds it, and admits requests, in the app (serving/guard.py); in
front of a bare `mlflow models serve`, a proxy must (deploy/nginx.conf).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    INTERNAL_ERROR,
    INVALID_PARAMETER_VALUE,
    REQUEST_LIMIT_EXCEEDED,
    TEMPORARILY_UNAVAILABLE,
)
from threadpoolctl import threadpool_limits

from gtzan_mlops.data.audio import AudioError, decode_audio
from gtzan_mlops.data.quality import quality_problems
from gtzan_mlops.features import feature_sets
from gtzan_mlops.features.handcrafted import FeatureError, warm_up
from gtzan_mlops.features.musicnn import MusicnnError
from gtzan_mlops.serving.inputs import Row, check_row, request_rows
from gtzan_mlops.serving.limits import (
    RequestTimeout,
    ServerBusy,
    decode_limits,
    quality_gates,
    read_served_config,
    request_deadline,
)
from gtzan_mlops.serving.spec import (
    CLASSIFIER_ARTIFACT,
    GENRE_COLUMN,
    MUSICNN_ARTIFACT,
    SPEC_ARTIFACT,
    TIMELINE_COLUMN,
    TIMELINE_PARAM,
    WARNING_COLUMN,
    ServingSpec,
    probability_column,
)
from gtzan_mlops.serving.windows import SegmentResult, classify_song, timeline_records
from gtzan_mlops.settings.loading import ConfigError

_log = logging.getLogger(__name__)


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


class GenreClassifier(mlflow.pyfunc.PythonModel):
    """Raw audio in, genre and probabilities out (see the module docstring for the shapes).

    Logged as code (serving/model_entry.py), not pickled: everything it needs is read from the
    artifacts and the model config in `load_context`.
    """

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from gtzan_mlops.models.zoo import load_classifier  # the training helpers' loader

        spec_path = Path(context.artifacts[SPEC_ARTIFACT])
        self.spec = ServingSpec.from_dict(json.loads(spec_path.read_text(encoding="utf-8")))
        self.classifier = load_classifier(context.artifacts[CLASSIFIER_ARTIFACT], self.spec.flavor)
        try:
            self.limits = read_served_config(context.model_config or {})
        except ConfigError as error:
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

    def _classify(self, row: Row, deadline: float | None) -> tuple[list[SegmentResult], str]:
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
        self, row: Row, deadline: float | None
    ) -> tuple[list[SegmentResult], str]:
        """In one of the model's own worker threads: decode, check and classify one row."""
        with row.open() as handle:
            decoded = decode_audio(handle, row.name, decode_limits(self.limits))
        problems = quality_problems(
            decoded.duration_s, decoded.peak, decoded.truncation, quality_gates(self.limits)
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
        try:
            rows = request_rows(model_input, self.limits)
        except ValueError as error:
            raise invalid_input(str(error)) from None
        deadline = request_deadline(self.limits.request_timeout_s)

        # Every row is checked from its header before any is decoded, so one request reports
        # all of its bad rows at once, and cheaply.
        checked: list[Row] = []
        problems: list[str] = []
        segment_seconds = self.spec.settings.segment_seconds
        for index, row in enumerate(rows):
            try:
                checked.append(check_row(row, index, self.limits, segment_seconds))
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
