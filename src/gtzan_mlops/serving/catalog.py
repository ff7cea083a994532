"""Scoring a catalog of audio files with a registered model through Ray Data: which files, which
model, and the run that streams their scores to the output (serving/catalog_store.py).

The dataset holds the files' paths, not their bytes: each actor (serving/catalog_scorer.py)
reads its files by path on its own node, so on a cluster of several machines the catalog must
be on storage every node sees at the same path. Memory: an actor holds one file at a time and
its batch's rows; the driver the list of paths (of the files still to score, and of those
done) and at most a part's rows of scores, never the audio.

Resuming: a file is skipped when the output already has an error-free row of it by the same
model name and version, with the size and modification time (ns) the file has now. A file
that changed, or failed, is scored again. Comparing contents (the sha256 the output keeps)
would mean reading the whole catalog again on every resume; a `stat` is one metadata call.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import re
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from gtzan_mlops.cluster import RaySession
from gtzan_mlops.data.audio import AUDIO_EXTENSIONS
from gtzan_mlops.serving.catalog_scorer import CatalogScorer, model_classes, pack_model
from gtzan_mlops.serving.catalog_store import (
    ERROR,
    MODEL_NAME,
    MODEL_VERSION,
    PATH,
    ModelIdentity,
    PartWriter,
    check_schema,
    done_files,
    merge_parts,
    output_lock,
    output_schema,
)
from gtzan_mlops.settings.schema import CatalogResources

_log = logging.getLogger(__name__)

# Scores held by the driver before they are written as a part: what a run killed loses at most.
PART_ROWS = 1000
PART_SECONDS = 60.0
# Retries Ray may give a task whose actor died (Ray Data's default never gives up). Past them, or
# when Ray reports the actor unavailable (a crash), the batch is dropped and its files are
# scored one per task; a file whose actor dies then too is reported, not retried for ever.
BATCH_RETRIES = 2
_RAISED = re.compile(r"^[A-Za-z_][\w.]*: ")  # "tarfile.ReadError: ..." in a Ray traceback
WORKER_DIED = (
    "the scoring worker died on this file, also when scored alone (crashed, killed or out of "
    "memory)"
)


class CatalogError(Exception):
    """The catalog or the model cannot be used: what and why, on one line."""


@dataclass(frozen=True)
class CatalogModel:
    """The model a run scores with: who it is, its local copy packed for the actors, its
    classes."""

    identity: ModelIdentity
    packed: bytes
    classes: tuple[str, ...]


@dataclass(frozen=True)
class CatalogRun:
    """What a run did."""

    files: int
    scored: int
    skipped: int
    failed: int
    actors: int
    output: Path
    model: ModelIdentity


def list_catalog(source: Path) -> list[str]:
    """The catalog's files as absolute paths, each once, in order: a folder's audio files
    (AUDIO_EXTENSIONS, any depth, hidden ones left out), or the lines of a list file (relative
    ones from the list's folder; blank lines and `#` comments skipped; every file listed is
    scored, whatever its name)."""
    if source.is_dir():
        found = []
        for folder, subfolders, files in os.walk(source):
            subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
            found += [
                os.path.abspath(os.path.join(folder, name))
                for name in sorted(files)
                if name.lower().endswith(AUDIO_EXTENSIONS) and not name.startswith(".")
            ]
        return found
    try:
        lines = source.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise CatalogError(f"{source}: no such folder or list file") from None
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or error
        raise CatalogError(f"{source}: not a readable list of paths ({reason})") from None
    base = source.resolve().parent
    entries = (line.strip() for line in lines)
    paths = (os.path.abspath(base / entry) for entry in entries if entry and entry[0] != "#")
    return list(dict.fromkeys(paths))


def model_identity(model_uri: str) -> ModelIdentity:
    """A registry URI's model name and version (an alias resolved now, so that the whole run
    uses one version even if the alias moves); any other URI stands for itself."""
    from mlflow import MlflowClient

    if not model_uri.startswith("models:/"):
        return ModelIdentity(model_uri, "")
    name, _, alias = model_uri.removeprefix("models:/").partition("@")
    if alias:
        version = MlflowClient().get_model_version_by_alias(name, alias).version
        return ModelIdentity(name, str(version))
    name, _, version = name.rpartition("/")
    return ModelIdentity(name, version) if version.isdigit() else ModelIdentity(model_uri, "")


def fetch_model(model_uri: str) -> CatalogModel:
    """The model: resolved to one version, downloaded and packed for the actors."""
    import mlflow

    identity = model_identity(model_uri)
    pinned = f"models:/{identity.name}/{identity.version}" if identity.version else model_uri
    with tempfile.TemporaryDirectory(prefix="gtzan-catalog-") as folder:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=pinned, dst_path=folder))
        try:
            classes = model_classes(local)
        except ValueError as error:
            raise CatalogError(f"cannot score with {model_uri}: {error}") from None
        return CatalogModel(identity, pack_model(local), classes)


def score_catalog(
    paths: list[str],
    output: Path,
    model: CatalogModel,
    resources: CatalogResources,
    session: RaySession,
    on_failure: Callable[[str, str], None] = lambda path, reason: None,
) -> CatalogRun:
    """Score the catalog's files not yet scored by this model version into `output`, on the
    Ray session's cluster; `on_failure(path, reason)` for each file that fails."""
    paths = list(dict.fromkeys(paths))
    schema = output_schema(model.classes)
    with output_lock(output):
        check_schema(output, schema)
        merge_parts(output, schema)  # what a run that died before its end had written
        done = done_files(output, model.identity)
        todo = [path for path in paths if not _unchanged(path, done.get(path))]
        actors = _actor_count(resources.actors, session.cpus, len(todo)) if todo else 0
        counts = {"scored": 0, "failed": 0}
        if todo:
            writer = PartWriter(output, schema, PART_ROWS, PART_SECONDS)
            try:
                _run(todo, model, resources.batch_size, actors, writer, counts, on_failure)
            finally:
                writer.flush()
                merge_parts(output, schema)
    return CatalogRun(
        files=len(paths),
        scored=counts["scored"],
        skipped=len(paths) - len(todo),
        failed=counts["failed"],
        actors=actors,
        output=output,
        model=model.identity,
    )


def _unchanged(path: str, scored: tuple[int, int] | None) -> bool:
    if scored is None:
        return False
    try:
        info = os.stat(path)
    except OSError:
        return False
    return (info.st_size, info.st_mtime_ns) == scored


def _actor_count(wanted: int, cpus: int, files: int) -> int:
    """resources.catalog.actors (0: one per CPU of the cluster), at most one per CPU (each
    holds one) and one per file."""
    if wanted > cpus:
        _log.warning("%d actors asked for, the cluster has %d CPUs: using %d", wanted, cpus, cpus)
    return max(1, min(wanted or cpus, cpus, files))


def _run(
    todo: list[str],
    model: CatalogModel,
    batch_size: int,
    actors: int,
    writer: PartWriter,
    counts: dict[str, int],
    on_failure: Callable[[str, str], None],
) -> None:
    """The Ray Data passes: batches of `batch_size` files, then the files of any batch lost
    with its actor, one at a time; a file that still gets no row is reported as WORKER_DIED."""
    import ray

    packed = ray.put(model.packed)
    started, missing = time.monotonic(), set(todo)
    with _data_context():
        # Per pass: files per task, retries of a task, tasks an actor holds at once (alone, a
        # file that kills its actor takes no other file's task down with it), CPUs an actor
        # reserves. The second pass's reserve none: an actor of the first that Ray was
        # restarting after a crash when the pass ended outlives it (Ray 2.60 does not end an
        # actor that goes out of scope while it restarts), idle but holding its CPU until the
        # run ends, and on a cluster of one CPU the second pass would wait for it for ever.
        # Its pool is still `actors` strong.
        passes = ((batch_size, BATCH_RETRIES, None, 1), (1, 1, 1, 0))
        for size, retries, in_flight, cpus in passes:
            if not missing:
                break
            pending = [path for path in todo if path in missing]
            options = {"retries": retries, "in_flight": in_flight, "cpus": cpus}
            dataset = _scored(pending, packed, model, size, actors, **options)
            failure = None
            try:
                for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
                    _collect(batch, missing, writer, counts, on_failure)
            except ray.exceptions.RayError as error:  # e.g. an actor that cannot load the model
                failure = f"the Ray actors could not score: {_cause(error)}"
            finally:
                # A finished dataset's actors live as long as it does (reference cycles).
                del dataset
                gc.collect()
            if failure:
                raise CatalogError(failure)
    for path in sorted(missing):
        _collect(_died_row(path, model), missing, writer, counts, on_failure)
    _log.info("scored %d files in %.1f s", len(todo), time.monotonic() - started)


def _scored(
    paths: list[str],
    packed: Any,
    model: CatalogModel,
    size: int,
    actors: int,
    *,
    retries: int,
    in_flight: int | None,
    cpus: int,
) -> Any:
    """The dataset of `paths` scored by a pool of model-holding actors, `size` files a task."""
    import ray

    dataset = ray.data.from_items(
        [{PATH: path} for path in paths],
        # One block per batch: a block lost with its actor costs one batch, not more.
        override_num_blocks=math.ceil(len(paths) / size),
    )
    with warnings.catch_warnings():
        # Ray 2.60 has no named parameter for an actor task's retries yet (Ray Data's own
        # default, retrying for ever, would never give up on a file that kills its actor).
        warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated")
        return dataset.map_batches(
            CatalogScorer,
            fn_constructor_args=(packed, model.identity, model.classes),
            batch_size=size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(
                size=min(actors, len(paths)), max_tasks_in_flight_per_actor=in_flight
            ),
            num_cpus=cpus,
            max_task_retries=retries,
        )


@contextlib.contextmanager
def _data_context() -> Iterator[None]:
    """Ray Data's settings for the runs in the block, restored after: no plan printed at the
    start (the progress stays: bars, or log lines when not on a terminal), and a block whose
    actor died for good dropped, not the run (its files are scored again one at a time)."""
    from ray.data import DataContext

    context = DataContext.get_current()
    saved = (context.print_on_execution_start, context.max_errored_blocks)
    context.print_on_execution_start, context.max_errored_blocks = False, -1
    try:
        yield
    finally:
        context.print_on_execution_start, context.max_errored_blocks = saved


def _cause(error: Exception) -> str:
    """The exception a Ray error carries (the last frame's `Type: message` line), else its
    first line."""
    lines = str(error).splitlines() or [type(error).__name__]
    frames = [index for index, line in enumerate(lines) if line.lstrip().startswith('File "')]
    after = lines[frames[-1] + 1 :] if frames else []
    return next((line for line in after if _RAISED.match(line)), lines[0]).strip()


def _died_row(path: str, model: CatalogModel) -> pa.Table:
    row = {
        PATH: path,
        MODEL_NAME: model.identity.name,
        MODEL_VERSION: model.identity.version,
        ERROR: WORKER_DIED,
    }
    return pa.Table.from_pylist([row], schema=output_schema(model.classes))


def _collect(
    batch: Any,
    missing: set[str],
    writer: PartWriter,
    counts: dict[str, int],
    on_failure: Callable[[str, str], None],
) -> None:
    """A batch of rows: written (through the part writer), counted, failures reported.

    The rows are copied out of Ray's object store: a table read from it zero-copy would pin
    its object there for as long as the part writer holds the rows."""
    rows = (batch if isinstance(batch, pa.Table) else pa.table(batch)).to_pylist()
    for row in rows:
        missing.discard(row[PATH])
        if row[ERROR] is None:
            counts["scored"] += 1
        else:
            counts["failed"] += 1
            on_failure(row[PATH], row[ERROR])
    writer.add(pa.Table.from_pylist(rows, schema=writer.schema))
