"""The study's workers as Ray tasks (`resources.engine: ray`): `resources.train.workers` tasks of
one CPU each, wherever the cluster has room, join the stage's study through its storage and log
their trials as nested runs of its parent run, as the local worker processes do (workers.py).

What the workers share: the study's storage and the MLflow tracking store, each reached by its
URL from every node, and the training data, sent once through Ray's object store (another node
may not have the project's files). A local Ray (`resources.ray.address: null`) runs on this
machine, so its workers also share the journal file and the SQLite store; the nodes of a cluster
need an RDB and a tracking server or database (`check_shared_stores`)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gtzan_mlops import tracking
from gtzan_mlops.cluster import ClusterError, RaySession, failure_line, ray_session
from gtzan_mlops.models.study import StudySettings, open_study, study_storage
from gtzan_mlops.models.training_data import TrainingData
from gtzan_mlops.models.trials import optimise
from gtzan_mlops.settings.loading import ConfigError
from gtzan_mlops.settings.schema import Resources

log = logging.getLogger(__name__)

NODE_TAG = "gtzan.ray_node"  # every trial run a Ray task logs: the node it ran on
WORKER_TAG = "gtzan.worker"  # and the worker's sampler stream
CANCEL_GRACE_S = 30.0  # for the other workers to end their trial once one worker failed
FILE_SCHEMES = {"", "file", "sqlite"}  # store URIs that name a file of this machine


class WorkerError(RuntimeError):
    """An Optuna worker failed: which one and why, on one line."""


def on_this_machine(uri: str) -> bool:
    """Whether a store URI is a file of this machine: a path, `file:` or `sqlite:` (with any
    driver, `sqlite+pysqlite:`), which other machines cannot open."""
    return urlsplit(uri).scheme.split("+")[0] in FILE_SCHEMES


def check_shared_stores(settings: StudySettings, address: str | None, root: Path) -> None:
    """A ConfigError unless the nodes of the cluster at `address` can all reach the study's
    storage (an RDB server, not the journal file or an SQLite file) and the MLflow store (a
    tracking server or a database server). A local Ray (`address` None) runs on this machine:
    its workers share the journal file and the SQLite store as local processes do."""
    if address is None:
        return
    where = f"train {settings.family}: resources.ray.address {address} runs the trials on other "
    storage = tracking.optuna_storage_url(settings.train.optuna_storage)
    if storage is None or on_this_machine(storage):
        held = "a journal file under optuna-journals/" if storage is None else storage
        raise ConfigError(
            f"{where}machines, which cannot share the Optuna study in {held}: set "
            "train.optuna_storage (or OPTUNA_STORAGE) to an RDB URL every node reaches, e.g. "
            "postgresql+psycopg2://user@host/optuna, or resources.ray.address: null (a Ray "
            "on this machine)"
        )
    uri = tracking.tracking_uri(root)
    if on_this_machine(uri):
        raise ConfigError(
            f"{where}machines, which cannot write to the MLflow store {uri} of this one: set "
            "MLFLOW_TRACKING_URI to a tracking server (http://host:5000) or a database URL "
            "(postgresql+psycopg2://...) every node reaches, or resources.ray.address: null"
        )


@contextlib.contextmanager
def tuning_cluster(
    resources: Resources, settings: StudySettings, root: Path
) -> Iterator[RaySession | None]:
    """The Ray session the study's workers run in, or None (the local engine, or no workers:
    the trials run in this process). Checked before any work: the stores
    (`check_shared_stores`, ConfigError), then the cluster (`ray_session`, ClusterError)."""
    if resources.engine != "ray" or settings.workers < 1:
        yield None
        return
    address = resources.ray.address
    check_shared_stores(settings, address, root)
    # A local Ray gets a CPU per worker: they all run at once, as local processes would.
    cpus = settings.workers if address is None else None
    purpose = f"train {settings.family}"
    with ray_session(address, purpose=purpose, num_cpus=cpus) as session:
        if session.cpus < 1:
            raise ClusterError(
                f"{purpose}: the Ray cluster at {session.address} has no CPU for the Optuna "
                "workers: start nodes with CPUs, or run with resources.engine: local"
            )
        yield session


def sampler_streams(workers: int) -> list[int]:
    """Each worker's sampler stream (`train.seed + stream`): a lone worker samples the stream the
    stage's own process would (0), so that it tunes exactly as the local engine does; several
    sample streams 1..N, as the local worker processes do."""
    return [0] if workers == 1 else list(range(1, workers + 1))


def tune_on_node(
    settings: StudySettings,
    data: TrainingData,
    name: str,
    storage: Any,
    tracking_uri: str,
    parent_run_id: str,
    tags: dict[str, str],
    stream: int,
) -> dict[str, Any]:
    """One worker, in a Ray task: trials of study `name` (in `storage`, with sampler `stream`)
    until the study holds `n_trials` finished ones, each a nested run of `parent_run_id` in the
    store at `tracking_uri`, tagged with the node. Returns the worker, its node and process."""
    import mlflow
    import optuna
    import ray

    # A local Ray's workers inherit the stage's environment: with the run id `mlflow run`
    # launched the stage with, every trial's start_run would log into that run.
    os.environ.pop("MLFLOW_RUN_ID", None)
    mlflow.set_tracking_uri(tracking_uri)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    node = ray.get_runtime_context().get_node_id()
    study = open_study(settings, name, None, worker=stream, create=False, storage=storage)
    node_tags = {NODE_TAG: node, WORKER_TAG: str(stream)}
    optimise(study, settings, data, parent_run_id, {**tags, **node_tags})
    return {"worker": stream, "node": node, "pid": os.getpid()}


def _stop(workers: dict[Any, int]) -> None:
    """Interrupt the running workers (task ref -> worker): a KeyboardInterrupt in their trial,
    which Optuna records as failed and MLflow ends; kill those still running after
    CANCEL_GRACE_S (e.g. in a long C call). Their errors are fetched: Ray would print each one
    as unhandled."""
    import ray

    refs = list(workers)
    for ref in refs:
        ray.cancel(ref)
    _, running = ray.wait(refs, num_returns=len(refs), timeout=CANCEL_GRACE_S)
    for ref in running:
        log.warning(
            "Optuna worker %d did not stop within %.0f s: killed", workers[ref], CANCEL_GRACE_S
        )
        ray.cancel(ref, force=True)
    for ref in refs:
        with contextlib.suppress(ray.exceptions.RayError):
            ray.get(ref, timeout=CANCEL_GRACE_S)


def run_on_ray(
    study: Any,
    settings: StudySettings,
    data: TrainingData,
    parent_run_id: str,
    tags: dict[str, str],
    root: Path,
) -> list[dict[str, Any]]:
    """The study's trials in `settings.workers` Ray tasks of the session this process is in
    (`tuning_cluster`), waiting for them all; the reports of `tune_on_node`. The first worker
    that fails stops the others and is a WorkerError naming it and why."""
    import mlflow
    import ray

    task = ray.remote(num_cpus=1, max_retries=0)(tune_on_node)
    shared = (
        ray.put(data),
        study.study_name,
        study_storage(settings, root),
        mlflow.get_tracking_uri(),
        parent_run_id,
        tags,
    )
    pending = {
        task.options(name=f"optuna-worker-{stream}").remote(settings, *shared, stream): stream
        for stream in sampler_streams(settings.workers)
    }
    reports = []
    while pending:
        [ref], _ = ray.wait(list(pending), num_returns=1)
        worker = pending.pop(ref)
        try:
            report = ray.get(ref)
        except ray.exceptions.RayError as error:
            _stop(pending)
            raise WorkerError(
                f"train {settings.family}: Optuna worker {worker} (a Ray task) failed: "
                f"{failure_line(error)}; the finished trials are kept, rerun to go on"
            ) from error
        log.info("Optuna worker %d ran on node %s (pid %d)", worker, report["node"], report["pid"])
        reports.append(report)
    return reports
