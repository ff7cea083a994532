"""The output of `gtzan-mlops score-catalog`: one Parquet file of scores, written so that a crash
loses nothing already written and a rerun skips what is done.

The file holds one row per file and model version (path, its size, mtime and content sha256,
the genre and the probability of every genre, the model's warning, the model's name and
version, and the reason it failed, if it did). Scores arrive in parts, each a complete Parquet
file written under a temporary name and renamed, in `<output>.parts/`; at the end of a run,
and at the start of the next one if a run died before its end, the parts are merged into the
output, streamed batch by batch, into a new file that replaces the old one at once. A row of a
part replaces the output's row of the same path and model version (a file scored again: it
changed, or it had failed).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from gtzan_mlops.serving.spec import GENRE_COLUMN, WARNING_COLUMN, probability_column

PATH = "path"
SIZE = "size_bytes"
MTIME = "mtime_ns"
SHA256 = "sha256"
MODEL_NAME = "model_name"
MODEL_VERSION = "model_version"
ERROR = "error"
READ_BATCH_ROWS = 65_536  # rows read at a time when merging or finding what is done


class CatalogOutputError(Exception):
    """The output cannot be written or read: which file, and why, on one line."""


@dataclass(frozen=True)
class ModelIdentity:
    """Who scored a row: a registered model's name and version, or (another URI) the URI
    itself with an empty version."""

    name: str
    version: str


def output_schema(classes: Iterable[str]) -> pa.Schema:
    """The columns of the output, for a model of these classes (in its order)."""
    return pa.schema(
        [
            (PATH, pa.string()),
            (SIZE, pa.int64()),
            (MTIME, pa.int64()),
            (SHA256, pa.string()),
            (GENRE_COLUMN, pa.string()),
            *((probability_column(genre), pa.float64()) for genre in classes),
            (WARNING_COLUMN, pa.string()),
            (MODEL_NAME, pa.string()),
            (MODEL_VERSION, pa.string()),
            (ERROR, pa.string()),
        ]
    )


def parts_folder(output: Path) -> Path:
    return output.with_name(output.name + ".parts")


@contextlib.contextmanager
def output_lock(output: Path) -> Iterator[None]:
    """Hold `<output>.lock` (an advisory lock, released when the process ends, however it
    ends) so that two runs never write one output."""
    lock_path = output.with_name(output.name + ".lock")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        handle = lock_path.open("a")
    except OSError as error:
        raise CatalogOutputError(f"{output}: cannot write there ({error.strerror})") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CatalogOutputError(
                f"{output}: another score-catalog run is writing it (it holds {lock_path})"
            ) from None
        yield


def check_schema(output: Path, schema: pa.Schema) -> None:
    """An existing output must have this model's columns (another set of genres cannot share a
    file)."""
    for path in [output, *_parts(output)]:
        found = _read_schema(path)
        if found is not None and not found.remove_metadata().equals(schema):
            raise CatalogOutputError(
                f"{path}: its columns ({', '.join(found.names)}) are not this model's "
                f"({', '.join(schema.names)}); write to another --output"
            )


def _read_schema(path: Path) -> pa.Schema | None:
    if not path.exists():
        return None
    try:
        return pq.read_schema(path)
    except (OSError, pa.ArrowException) as error:
        raise CatalogOutputError(f"{path}: not a readable Parquet file ({error})") from None


def done_files(output: Path, model: ModelIdentity) -> dict[str, tuple[int, int]]:
    """The files this model version has scored without error: path -> (size, mtime_ns) when
    scored. Read column by column and batch by batch: the memory is the paths', not the
    scores'."""
    if not output.exists():
        return {}
    done: dict[str, tuple[int, int]] = {}
    columns = [PATH, SIZE, MTIME, MODEL_NAME, MODEL_VERSION, ERROR]
    for batch in pq.ParquetFile(output).iter_batches(READ_BATCH_ROWS, columns=columns):
        rows = batch.to_pydict()
        for path, size, mtime, name, version, error in zip(*rows.values(), strict=True):
            if error is None and (name, version) == (model.name, model.version):
                done[path] = (size, mtime)
    return done


class PartWriter:
    """Rows to `<output>.parts/`, a complete Parquet file every `part_rows` rows or
    `part_seconds` (and at `flush`): each part is written under a temporary name and renamed,
    so a part is either whole or absent."""

    def __init__(
        self, output: Path, schema: pa.Schema, part_rows: int, part_seconds: float
    ) -> None:
        self.folder = parts_folder(output)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.schema = schema
        self.part_rows = part_rows
        self.part_seconds = part_seconds
        self._run = uuid.uuid4().hex[:12]
        self._pending: list[pa.Table] = []
        self._rows = 0
        self._count = 0
        self._since = time.monotonic()

    def add(self, table: pa.Table) -> None:
        self._pending.append(table.select(self.schema.names).cast(self.schema))
        self._rows += table.num_rows
        if self._rows >= self.part_rows or time.monotonic() - self._since >= self.part_seconds:
            self.flush()

    def flush(self) -> None:
        if not self._rows:
            return
        table = pa.concat_tables(self._pending)
        final = self.folder / f"part-{self._run}-{self._count:06d}.parquet"
        temporary = final.with_suffix(".tmp")
        pq.write_table(table, temporary)
        _fsync(temporary)
        os.replace(temporary, final)
        self._pending, self._rows, self._count = [], 0, self._count + 1
        self._since = time.monotonic()


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _parts(output: Path) -> list[Path]:
    """The complete parts, oldest first (a `.tmp` file is a part a crash cut short)."""
    folder = parts_folder(output)
    if not folder.is_dir():
        return []
    return sorted(folder.glob("*.parquet"), key=lambda path: (path.stat().st_mtime_ns, path.name))


def merge_parts(output: Path, schema: pa.Schema) -> int:
    """Fold the parts into the output (a new file, renamed over the old one) and remove them;
    returns the rows the parts held. A part's row replaces the output's row of its path and
    model version; a later part's, an earlier part's."""
    parts = _parts(output)
    if not parts:
        _remove_parts(output)
        return 0
    keys: dict[tuple[Any, Any, Any], int] = {}  # (path, model, version) -> its last part
    for index, part in enumerate(parts, start=1):
        for batch in _batches(part, [PATH, MODEL_NAME, MODEL_VERSION]):
            for key in zip(*batch.to_pydict().values(), strict=True):
                keys[key] = index
    temporary = output.with_name(output.name + ".merging")
    added = 0
    with pq.ParquetWriter(temporary, schema) as writer:
        sources = [output] if output.exists() else []
        for index, source in enumerate([*sources, *parts], start=1 - len(sources)):
            for batch in _batches(source, None):
                rows = batch.to_pydict()
                keep = [
                    keys.get(key, index) == index
                    for key in zip(rows[PATH], rows[MODEL_NAME], rows[MODEL_VERSION], strict=True)
                ]
                kept = pa.Table.from_batches([batch]).filter(pa.array(keep, pa.bool_()))
                writer.write_table(kept.cast(schema))
                added += kept.num_rows if index > 0 else 0
    _fsync(temporary)
    os.replace(temporary, output)
    _remove_parts(output)
    return added


def _batches(path: Path, columns: list[str] | None) -> Iterator[pa.RecordBatch]:
    try:
        yield from pq.ParquetFile(path).iter_batches(READ_BATCH_ROWS, columns=columns)
    except (OSError, pa.ArrowException) as error:
        raise CatalogOutputError(f"{path}: not a readable Parquet file ({error})") from None


def _remove_parts(output: Path) -> None:
    folder = parts_folder(output)
    if folder.is_dir():
        for leftover in folder.iterdir():
            leftover.unlink()
        folder.rmdir()
