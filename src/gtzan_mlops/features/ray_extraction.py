"""The features stage's extraction on Ray (`resources.engine: ray`): each clip not in the cache
is one Ray task running the local engine's `extraction.compute_job`, so the results, and the
tables made from them, are those of the local engine.

Audio reaches the workers as object-store bytes: the driver reads each clip's file and passes
its bytes with the task. The manifest's paths are the driver's; the nodes need no shared storage
and no copy of the data, only the installed project (checked by `cluster.ray_session`). The
MSD_musicnn checkpoint travels the same way, once per stage (`ShippedWeights`), so a node uses
the very weights the cache key names. The per-clip cache stays on the driver: each result is
saved there as it arrives, so a rerun after a crash extracts only what is missing.

Memory does not grow with the catalog: at most `in_flight` clips are submitted at a time
(`ray.wait` for one to finish before the next is read). Each Ray worker process limits itself to
one thread, warms librosa's JIT up under the machine's lock and builds the musicnn model once,
for every clip it runs (Ray reuses a worker process for many tasks of a job).

Failures, as in the local pool: a clip that cannot be used comes back as a failure row (an
exception of the clip, not the worker: not retried). A task whose worker process or node dies
is retried once by Ray; if it dies again the clip is a failure row saying so and the stage goes
on. Nothing waits forever: if no clip finishes within STALL_TIMEOUT_S (a cluster without a free
CPU, a hung node) the extraction ends with RayExtractionError naming the clips in flight.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gtzan_mlops.cluster import failure_line
from gtzan_mlops.features import musicnn
from gtzan_mlops.features.clip_cache import load_cached, save_cached
from gtzan_mlops.features.extraction import ClipJob, ClipResult, compute_job, limit_threads
from gtzan_mlops.features.feature_sets import ExtractionSettings
from gtzan_mlops.features.handcrafted import warm_up

# No clip finished for this long: the cluster cannot run the tasks (e.g. no node with a free
# CPU). A clip takes seconds, the first of a worker process some more (imports, model build).
STALL_TIMEOUT_S = 600.0
TASK_OPTIONS = {"num_cpus": 1, "max_retries": 1, "retry_exceptions": False}


class RayExtractionError(RuntimeError):
    """The cluster finished no clip for too long; the message names the clips in flight."""


@dataclasses.dataclass(frozen=True)
class ShippedWeights:
    """The MSD_musicnn checkpoint in the object store. `files` is an ObjectRef inside a
    dataclass, which Ray does not resolve for the task: a worker process fetches it only the
    first time it needs the model."""

    digest: str
    files: Any  # ObjectRef of {checkpoint file name: bytes}


@dataclasses.dataclass(frozen=True)
class WorkerOutcome:
    """A task's result, and which worker process computed it."""

    result: ClipResult
    worker: str  # "<node id prefix>:<pid>"
    models_built: int  # musicnn models this worker process has built so far


@dataclasses.dataclass
class _ProcessState:
    """What a Ray worker process keeps between the clips it extracts."""

    threads_limited: bool = False
    ready: dict[str, ExtractionSettings] = dataclasses.field(default_factory=dict)
    models: set[tuple[str, int]] = dataclasses.field(default_factory=set)  # (digest, batch)


_PROCESS = _ProcessState()


def ship_weights(folder: Path) -> ShippedWeights:
    """Put the checkpoint files of `folder` in the object store (about 10 MB, once per stage)."""
    import ray

    files = {name: (folder / name).read_bytes() for name in musicnn.CHECKPOINT_FILES}
    return ShippedWeights(musicnn.weights_digest(folder), ray.put(files))


def _node_weights(shipped: ShippedWeights) -> Path:
    """This node's copy of the shipped checkpoint, written once per node (each file atomically,
    so worker processes writing at once leave whole files) and checked by its digest."""
    import ray

    folder = Path(tempfile.gettempdir()) / f"gtzan-mlops-{os.getuid()}-musicnn-{shipped.digest}"
    complete = all((folder / name).is_file() for name in musicnn.CHECKPOINT_FILES)
    if complete and musicnn.weights_digest(folder) == shipped.digest:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in ray.get(shipped.files).items():
        partial = folder / f"{name}.{os.getpid()}.tmp"
        partial.write_bytes(data)
        partial.replace(folder / name)
    if musicnn.weights_digest(folder) != shipped.digest:
        raise musicnn.MusicnnError(f"{folder}: the shipped checkpoint's digest does not match")
    return folder


def _prepare(settings: ExtractionSettings, shipped: ShippedWeights | None) -> ExtractionSettings:
    """This process, ready for clips of `settings` (once per process and settings): one thread,
    librosa's JIT warmed up, the checkpoint on this node and its model built. Returns the
    settings naming this node's checkpoint."""
    key = json.dumps(
        [settings.features.to_dict(), shipped and shipped.digest, settings.musicnn_batch_size],
        sort_keys=True,
    )
    if key in _PROCESS.ready:
        return _PROCESS.ready[key]
    if not _PROCESS.threads_limited:
        limit_threads(embeds=shipped is not None)
        _PROCESS.threads_limited = True
    warm_up(settings.features)
    local = dataclasses.replace(settings, musicnn_weights=None)
    if shipped is not None and settings.musicnn_batch_size is not None:
        local = dataclasses.replace(local, musicnn_weights=_node_weights(shipped))
        musicnn.embedder(local.musicnn_weights, settings.musicnn_batch_size)  # kept per process
        _PROCESS.models.add((shipped.digest, settings.musicnn_batch_size))
    _PROCESS.ready[key] = local
    return local


def extract_on_worker(
    job: ClipJob, audio: bytes, settings: ExtractionSettings, shipped: ShippedWeights | None
) -> WorkerOutcome:
    """The Ray task: both feature sets of one clip from its bytes, on a prepared process."""
    import ray

    result = compute_job(job, _prepare(settings, shipped), audio)
    worker = f"{ray.get_runtime_context().get_node_id()[:12]}:{os.getpid()}"
    return WorkerOutcome(result, worker, len(_PROCESS.models))


def _read_audio(job: ClipJob) -> bytes | None:
    """The clip's bytes; None when its file is missing, unreadable or empty."""
    try:
        return job.audio_path.read_bytes() or None
    except OSError:
        return None


def _died_twice(job: ClipJob, error: Exception) -> ClipResult:
    detail = failure_line(error)
    return ClipResult(
        job,
        None,
        error=f"{job.label}: the worker died twice on this clip ({detail}); it was skipped",
    )


class RayExtraction:
    """The clips of `jobs` extracted on the connected Ray (inside `cluster.ray_session`): an
    iterable of ClipResult in completion order, cached clips first, with at most `in_flight`
    clips submitted at a time. `workers` tells, after the iteration, each worker process that
    extracted a clip and how many musicnn models it built."""

    def __init__(self, jobs: list[ClipJob], settings: ExtractionSettings, in_flight: int):
        if in_flight < 1:
            raise ValueError(f"in_flight must be at least 1, got {in_flight}")
        self.jobs = jobs
        self.settings = settings
        self.in_flight = in_flight
        self.workers: dict[str, int] = {}

    def __iter__(self) -> Iterator[ClipResult]:
        todo: deque[ClipJob] = deque()
        for job in self.jobs:
            cached = load_cached(job.cache_path)
            if cached is None:
                todo.append(job)
            else:
                yield ClipResult(job, cached, cached.length, from_cache=True)
        if todo:
            yield from self._extract(todo)

    def _extract(self, todo: deque[ClipJob]) -> Iterator[ClipResult]:
        import ray

        weights = self.settings.musicnn_weights
        shipped = ship_weights(weights) if weights is not None else None
        task = ray.remote(extract_on_worker).options(**TASK_OPTIONS)
        pending: dict[Any, ClipJob] = {}
        while todo or pending:
            while todo and len(pending) < self.in_flight:
                job = todo.popleft()
                audio = _read_audio(job)
                if audio is None:
                    # Decoding the path here refuses it at once, in the local engine's words.
                    yield self._finished(job, compute_job(job, self.settings))
                    continue
                pending[task.remote(job, audio, self.settings, shipped)] = job
            if not pending:
                continue
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=STALL_TIMEOUT_S)
            if not ready:
                raise self._stalled(pending.values())
            for ref in ready:
                yield self._collect(ref, pending.pop(ref))

    def _collect(self, ref: Any, job: ClipJob) -> ClipResult:
        import ray

        try:
            outcome: WorkerOutcome = ray.get(ref)
        except ray.exceptions.RayTaskError:
            raise  # a bug, not a clip's problem: it ends the stage, as in the local pool
        except ray.exceptions.RayError as error:  # its worker or node died, on the retry too
            return _died_twice(job, error)
        self.workers[outcome.worker] = outcome.models_built
        return self._finished(job, dataclasses.replace(outcome.result, job=job))

    @staticmethod
    def _finished(job: ClipJob, result: ClipResult) -> ClipResult:
        if result.features is not None:
            save_cached(job.cache_path, result.features)
        return result

    @staticmethod
    def _stalled(jobs: Any) -> RayExtractionError:
        labels = [job.label for job in jobs]
        shown = ", ".join(labels[:5]) + (" ..." if len(labels) > 5 else "")
        return RayExtractionError(
            f"no clip finished on the Ray cluster within {STALL_TIMEOUT_S:.0f} s ({len(labels)} "
            f"in flight: {shown}); check that its nodes are alive and have free CPUs (`ray "
            "status`). Clips finished so far are cached: a rerun extracts only the others"
        )
