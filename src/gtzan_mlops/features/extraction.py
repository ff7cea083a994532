"""The features stage's extraction: one job per usable clip of the manifest, each decoded once
and both feature sets computed from it (`compute_job`), spread over a process pool, each
finished clip saved at once in the per-clip cache (clip_cache.py). On Ray the same `compute_job`
runs as Ray tasks (ray_extraction.py).

A clip that fails is returned with its reason, not raised. A worker process that dies (a crash
inside a native library, or killed) ends the extraction with WorkerCrashError naming the clips
it may have been on, instead of a wait for it forever; and the workers end with the stage,
however it ends.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from gtzan_mlops.data.audio import AudioError, decode_mono
from gtzan_mlops.features import musicnn
from gtzan_mlops.features.clip_cache import load_cached, save_cached
from gtzan_mlops.features.feature_sets import ExtractedSets, ExtractionSettings, extract_sets
from gtzan_mlops.features.handcrafted import FeatureError, warm_up
from gtzan_mlops.features.tf_runtime import import_tensorflow
from gtzan_mlops.settings.loading import resolve_path


@dataclass(frozen=True)
class ClipJob:
    track_id: str
    genre: str
    audio_path: Path
    cache_path: Path
    name: str = ""  # the path as the manifest lists it (relative to the repository): for messages

    @property
    def label(self) -> str:
        return self.name or str(self.audio_path)


@dataclass(frozen=True)
class ClipResult:
    job: ClipJob
    features: ExtractedSets | None
    clip_length: int = 0
    error: str = ""
    from_cache: bool = False


class WorkerCrashError(RuntimeError):
    """A worker process of the pool died (a crash inside a native library, or killed)."""


def jobs_from_manifest(
    manifest: pd.DataFrame, root: Path, cache_dir: Path, key: str
) -> list[ClipJob]:
    """One job per clip the manifest marks `ok`, cached under `cache_dir/key/<sha256>.npz`."""
    usable = manifest[manifest["status"] == "ok"]
    return [
        ClipJob(
            track_id=row.track_id,
            genre=row.genre,
            audio_path=resolve_path(row.path, root),
            cache_path=cache_dir / key / f"{row.sha256}.npz",
            name=str(row.path),
        )
        for row in usable.itertuples(index=False)
    ]


def extract_job(job: ClipJob, settings: ExtractionSettings) -> ClipResult:
    """Both feature sets of one clip, from the cache when present, else computed and cached;
    errors are returned, not raised."""
    cached = load_cached(job.cache_path)
    if cached is not None:
        return ClipResult(job, cached, cached.length, from_cache=True)
    result = compute_job(job, settings)
    if result.features is not None:
        save_cached(job.cache_path, result.features)
    return result


def compute_job(
    job: ClipJob, settings: ExtractionSettings, audio: bytes | None = None
) -> ClipResult:
    """Both feature sets of one clip, decoded from its file, or from `audio` (the file's bytes,
    read elsewhere) when given; a clip that cannot be used is returned with its reason."""
    try:
        waveform, file_rate = decode_mono(job.audio_path if audio is None else audio, job.label)
        extracted = extract_sets(
            waveform,
            file_rate,
            settings.features,
            settings.musicnn_weights,
            batch_size=settings.musicnn_batch_size,
        )
    except (AudioError, FeatureError, musicnn.MusicnnError) as error:
        message = str(error)
        if not message.startswith(job.label):
            message = f"{job.label}: {message}"
        return ClipResult(job, None, error=message)
    return ClipResult(job, extracted, extracted.length)


def _end_with_parent(parent: int) -> None:
    """End this worker when the stage that started it ends, however it ends (SIGKILL leaves no
    chance to stop the pool): Linux kills it with the parent (PR_SET_PDEATHSIG); elsewhere, or
    if the parent died before that was set, a watchdog thread notices the new parent."""
    import ctypes
    import threading

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    if os.getppid() != parent:
        os._exit(1)
    threading.Thread(target=watch, daemon=True, name="parent-watchdog").start()


def _worker_init(embeds: bool, parent: int) -> None:
    _end_with_parent(parent)
    limit_threads(embeds)


def limit_threads(embeds: bool) -> None:
    """One thread per worker process: one process per core already uses every core, BLAS and
    TensorFlow threads inside each would oversubscribe. Call it before TensorFlow's first op
    (its pools are sized then)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    if embeds:
        tf = import_tensorflow()

        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)


def _run_chunk(jobs: list[ClipJob], settings: ExtractionSettings) -> list[ClipResult]:
    return [extract_job(job, settings) for job in jobs]


def extract_all(
    jobs: list[ClipJob], settings: ExtractionSettings, workers: int, chunksize: int
) -> Iterator[ClipResult]:
    """Results in completion order, from `workers` processes (1: in this process), handed
    `chunksize` clips at a time.

    A worker that dies ends the stage with `WorkerCrashError` naming the clips it may have been
    on, instead of waiting for it forever; the clips finished so far are in the cache already.
    """
    if workers <= 1 or len(jobs) <= 1:
        yield from (extract_job(job, settings) for job in jobs)
        return
    # Compiles librosa's numba code here, so the workers only read its cache.
    warm_up(settings.features)
    size = max(1, chunksize)
    chunks = [jobs[start : start + size] for start in range(0, len(jobs), size)]
    with ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),  # no forked copies of a threaded parent
        initializer=_worker_init,
        initargs=(settings.musicnn_weights is not None, os.getpid()),
    ) as pool:
        pending = {pool.submit(_run_chunk, chunk, settings): chunk for chunk in chunks}
        try:
            for future in as_completed(pending):
                yield from future.result()
                del pending[future]
        except BrokenProcessPool as error:
            unfinished = [job.label for chunk in pending.values() for job in chunk]
            shown = ", ".join(unfinished[:10]) + (" ..." if len(unfinished) > 10 else "")
            raise WorkerCrashError(
                f"a worker process of the features stage died ({error}); {len(unfinished)} "
                f"clips unfinished, among them the one it was on: {shown}. Clips finished so "
                "far are cached; rerun with resources.features.workers: 1 to see which clip fails"
            ) from error
        finally:
            # Stopped early (an error, Ctrl-C): drop the chunks not started instead of waiting.
            pool.shutdown(cancel_futures=True)
