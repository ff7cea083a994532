"""Scoring the files of a catalog with the served model, a batch at a time: the Ray Data actor of
`gtzan-mlops score-catalog`, and the packing of the model it loads.

The driver downloads the model once and hands it to the actors through Ray's object store
(`pack_model`), so the workers need neither the tracking store nor the registry; each actor
unpacks and loads it once, then scores every batch it is given. A file is read by its path on
the actor's node: its size is checked against the model's limit first (serving.max_upload_mib),
then it is read, hashed (sha256) and sent to the model as the bytes a client would send.
Whatever goes wrong with one file (missing, unreadable, not a regular file, too large, not
audio, refused by the model) is its row's `error`, one line, and the batch goes on.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import re
import stat
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from gtzan_mlops.serving.catalog_store import (
    ERROR,
    MODEL_NAME,
    MODEL_VERSION,
    MTIME,
    PATH,
    SHA256,
    SIZE,
    ModelIdentity,
    output_schema,
)
from gtzan_mlops.serving.spec import (
    BASE64_COLUMN,
    GENRE_COLUMN,
    WARNING_COLUMN,
    probability_column,
)

_MODEL_PREFIX = re.compile(rf"^(row \d+: )?({re.escape(BASE64_COLUMN)}\[\d+\]: )?")


def pack_model(folder: Path) -> bytes:
    """A downloaded model folder as one uncompressed tar (the artifacts are small, and mostly
    compressed already)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        archive.add(folder, arcname=".")
    return buffer.getvalue()


def model_classes(folder: Path) -> tuple[str, ...]:
    """The genres a downloaded served model scores, in its order: its signature's `prob_`
    outputs. ValueError if it has none (not a served model of this project)."""
    from mlflow.models import Model

    signature = Model.load(folder).signature
    names = signature.outputs.input_names() if signature and signature.outputs else []
    classes = tuple(str(name).removeprefix("prob_") for name in names if name.startswith("prob_"))
    if not classes:
        raise ValueError("it has no prob_<genre> outputs (not a gtzan-mlops served model?)")
    return classes


class CatalogScorer:
    """A Ray Data actor (map_batches): the served model, loaded once from the packed bytes
    (or their object reference), scoring batches of paths into rows of the output's schema."""

    def __init__(self, packed: Any, model: ModelIdentity, classes: tuple[str, ...]) -> None:
        import mlflow
        import ray

        data = ray.get(packed) if isinstance(packed, ray.ObjectRef) else packed
        # Kept for the actor's life, removed when it ends.
        self._folder = tempfile.TemporaryDirectory(prefix="gtzan-catalog-model-")
        with tarfile.open(fileobj=io.BytesIO(data)) as archive:
            archive.extractall(self._folder.name, filter="data")
        self.model = mlflow.pyfunc.load_model(self._folder.name)
        limits = self.model.unwrap_python_model().limits
        self.max_bytes = int(limits.max_upload_mib * 2**20)
        self.identity = model
        self.classes = classes
        self.schema = output_schema(classes)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        rows = [self.score(str(path)) for path in batch[PATH]]
        return pa.Table.from_pylist(rows, schema=self.schema)

    def score(self, path: str) -> dict[str, Any]:
        """One file's row; its `error` says why it has no scores."""
        row: dict[str, Any] = {
            PATH: path,
            MODEL_NAME: self.identity.name,
            MODEL_VERSION: self.identity.version,
        }
        try:
            info = os.stat(path)
        except FileNotFoundError:
            return {**row, ERROR: "no such file"}
        except OSError as error:
            return {**row, ERROR: f"cannot read its metadata ({error.strerror or error})"}
        row.update({SIZE: info.st_size, MTIME: info.st_mtime_ns})
        if not stat.S_ISREG(info.st_mode):
            return {**row, ERROR: "not a regular file"}
        if info.st_size > self.max_bytes:
            return {**row, ERROR: self._too_large(info.st_size)}
        try:
            with open(path, "rb") as handle:
                data = handle.read(self.max_bytes + 1)
        except OSError as error:
            return {**row, ERROR: f"unreadable ({error.strerror or error})"}
        if len(data) > self.max_bytes:  # it grew after the check
            return {**row, ERROR: self._too_large(len(data))}
        row[SHA256] = hashlib.sha256(data).hexdigest()
        return {**row, **self._classify(data)}

    def _too_large(self, size: int) -> str:
        return (
            f"file of {size / 2**20:.1f} MiB exceeds the model's limit of "
            f"{self.max_bytes / 2**20:g} MiB (serving.max_upload_mib)"
        )

    def _classify(self, data: bytes) -> dict[str, Any]:
        """The model's genre, probabilities and warning for one file's bytes, or its refusal."""
        import pandas as pd
        from mlflow.exceptions import MlflowException

        request = pd.DataFrame({BASE64_COLUMN: [base64.b64encode(data).decode("ascii")]})
        try:
            answer = self.model.predict(request)
        except MlflowException as error:
            return {ERROR: one_line(_MODEL_PREFIX.sub("", error.message, count=1))}
        except Exception as error:  # a model's failure is this file's, never the batch's
            return {ERROR: one_line(f"{type(error).__name__}: {error}")}
        first = answer.iloc[0]
        warning = first.get(WARNING_COLUMN)
        return {
            GENRE_COLUMN: str(first[GENRE_COLUMN]),
            **{
                probability_column(genre): float(first[probability_column(genre)])
                for genre in self.classes
            },
            WARNING_COLUMN: warning if isinstance(warning, str) and warning else None,
        }


def one_line(message: str) -> str:
    """A reason on one line (the first, never a stack trace), without the base64 name."""
    lines = message.strip().splitlines() or ["unknown error"]
    return lines[0].replace(f"{BASE64_COLUMN}[0]", "the file")
