"""The `features` stage: both feature sets of every usable clip, per clip and per segment.

The 57 hand-crafted features and the MSD_musicnn embeddings (with its 50 tag probabilities)
are computed from one decode of each clip (feature_sets.extract_sets). Clips are spread over a
process pool. Each finished clip is saved at once in a per-file cache keyed by the audio's
sha256, the feature settings, the musicnn weights and the extraction code (the source of the
extraction modules, the versions of the libraries), so a rerun after adding clips or after an
interruption extracts only what is missing. A clip that fails is logged with its
reason, listed in `failures.csv` and skipped; the stage still writes the tables of the others.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import signal
import time
import zipfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from gtzan_mlops.cli import stage_main
from gtzan_mlops.console import progress_off
from gtzan_mlops.data.audio import AudioError, decode_mono
from gtzan_mlops.features import feature_sets, musicnn
from gtzan_mlops.features.feature_sets import ExtractedSets, ExtractionSettings, extract_sets
from gtzan_mlops.features.handcrafted import (
    ClipFeatures,
    FeatureError,
    FeatureSettings,
    feature_names,
    warm_up,
)
from gtzan_mlops.features.tf_runtime import import_tensorflow
from gtzan_mlops.settings.loading import resolve_path
from gtzan_mlops.tracking import compute_closure

log = logging.getLogger(__name__)

# What computes a feature value besides its settings: cached features of other code are not reused.
EXTRACTION_MODULES = compute_closure("features.feature_sets")
EXTRACTION_LIBRARIES = ("librosa", "numpy", "scipy", "soundfile", "soxr", "tensorflow-cpu", "keras")

CLIP_TABLE = feature_sets.TABLES[feature_sets.HANDCRAFTED]["clip"]
SEGMENT_TABLE = feature_sets.TABLES[feature_sets.HANDCRAFTED]["segment"]
FAILURES_TABLE = "failures.csv"


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


def extraction_code_fingerprint() -> dict[str, str]:
    """sha256 of the extraction modules and the versions of the libraries they call."""
    from importlib.metadata import version

    from gtzan_mlops.tracking import source_digest

    return {
        "source": source_digest(*EXTRACTION_MODULES),
        **{name: version(name) for name in EXTRACTION_LIBRARIES},
    }


def settings_key(settings: ExtractionSettings) -> str:
    """A short hash of everything that decides a feature value: settings, weights and code."""
    payload = json.dumps(
        {
            **settings.features.to_dict(),
            "musicnn_weights": musicnn.weights_digest(settings.musicnn_weights)
            if settings.musicnn_weights
            else None,
            "code": extraction_code_fingerprint(),
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _load_cached(path: Path) -> tuple[ExtractedSets, int] | None:
    try:
        with np.load(path) as cached:
            embedded = "musicnn_segments" in cached  # absent: hand-crafted only (see settings_key)
            extracted = ExtractedSets(
                ClipFeatures(cached["clip"], cached["segments"]),
                int(cached["length"]),
                cached["musicnn_segments"] if embedded else None,
                cached["musicnn_tags"] if embedded else None,
            )
            return extracted, extracted.length
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        return None  # absent, or a partial file from an interrupted run: extract again


def _save_cached(path: Path, extracted: ExtractedSets) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(partial, "wb") as handle:
        embeddings = (
            {"musicnn_segments": extracted.musicnn_segments, "musicnn_tags": extracted.musicnn_tags}
            if extracted.musicnn_segments is not None
            else {}
        )
        np.savez(
            handle,
            clip=extracted.handcrafted.clip,
            segments=extracted.handcrafted.segments,
            length=extracted.length,
            **embeddings,
        )
    partial.replace(path)  # atomic: an interrupted write never leaves a readable partial entry


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
    # One process per core already uses every core: BLAS and TensorFlow threads inside each
    # would oversubscribe. TensorFlow's pools must be sized before its first op.
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    if embeds:
        tf = import_tensorflow()

        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)


def extract_job(job: ClipJob, settings: ExtractionSettings) -> ClipResult:
    """Both feature sets of one clip, from the cache when present; errors are returned, not
    raised."""
    cached = _load_cached(job.cache_path)
    if cached is not None:
        return ClipResult(job, cached[0], cached[1], from_cache=True)
    try:
        waveform, file_rate = decode_mono(job.audio_path, name=job.label)
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
    _save_cached(job.cache_path, extracted)
    return ClipResult(job, extracted, extracted.length)


class WorkerCrashError(RuntimeError):
    """A worker process of the pool died (a crash inside a native library, or killed)."""


def _run_chunk(jobs: list[ClipJob], settings: ExtractionSettings) -> list[ClipResult]:
    return [extract_job(job, settings) for job in jobs]


def extract_all(
    jobs: list[ClipJob], settings: ExtractionSettings, workers: int, chunksize: int = 1
) -> Iterator[ClipResult]:
    """Results in completion order, from `workers` processes (1: in this process).

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


def jobs_from_manifest(
    manifest: pd.DataFrame, root: Path, cache_dir: Path, key: str
) -> list[ClipJob]:
    """One job per clip the manifest marks `ok`."""
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


def build_tables(results: list[ClipResult], settings: FeatureSettings) -> dict[str, pd.DataFrame]:
    """Every table of the stage by file name: per feature set its clip and segment tables, the
    clip's mean MSD tag probabilities and the failures; sorted by track (and segment)."""
    hand_names = list(feature_names(settings.n_mfcc))
    rows: dict[str, list[dict[str, Any]]] = {
        name: [] for level in feature_sets.TABLES.values() for name in level.values()
    }
    tags: list[dict[str, Any]] = []
    failures: list[dict[str, str]] = []
    for result in sorted(results, key=lambda item: item.job.track_id):
        job, extracted = result.job, result.features
        if extracted is None:
            failures.append({"track_id": job.track_id, "path": job.label, "reason": result.error})
            continue
        clip_key = {"track_id": job.track_id, "genre": job.genre, "length": result.clip_length}
        for base, names in (
            (feature_sets.HANDCRAFTED, hand_names),
            (feature_sets.MUSICNN, list(musicnn.EMBEDDING_NAMES)),
        ):
            tables = feature_sets.TABLES[base]
            rows[tables["clip"]].append(
                {**clip_key, **dict(zip(names, extracted.clip_row(base), strict=True))}
            )
            for index, values in enumerate(extracted.segment_rows(base)):
                rows[tables["segment"]].append(
                    {
                        "track_id": job.track_id,
                        "segment": index,
                        "genre": job.genre,
                        "length": settings.segment_samples,
                        **dict(zip(names, values, strict=True)),
                    }
                )
        mean_tags = extracted.musicnn_tags.mean(axis=0)
        tags.append({**clip_key, **dict(zip(musicnn.MSD_TAGS, mean_tags, strict=True))})

    def frame(name: str, level: str, features: list[str]) -> pd.DataFrame:
        keys = feature_sets.KEY_COLUMNS[level]
        return pd.DataFrame(rows[name], columns=[*keys, "genre", "length", *features])

    tables: dict[str, pd.DataFrame] = {}
    for base, features in (
        (feature_sets.HANDCRAFTED, hand_names),
        (feature_sets.MUSICNN, list(musicnn.EMBEDDING_NAMES)),
    ):
        for level, name in feature_sets.TABLES[base].items():
            tables[name] = frame(name, level, features)
    tables[feature_sets.TAGS_TABLE] = pd.DataFrame(
        tags, columns=["track_id", "genre", "length", *musicnn.MSD_TAGS]
    )
    tables[FAILURES_TABLE] = pd.DataFrame(failures, columns=["track_id", "path", "reason"])
    return tables


def run(params: dict[str, Any], root: Path, show_progress: bool = True) -> dict[str, int]:
    """Extract every usable clip of the manifest and write the tables; returns counts."""
    settings = ExtractionSettings.from_params(params, root)
    paths, resources = params["paths"], params["resources"]["features"]
    manifest_path = resolve_path(paths["manifest"], root)
    output_dir = resolve_path(paths["features"], root)
    cache_dir = resolve_path(paths["features_cache"], root)
    workers = int(resources["workers"]) or os.cpu_count() or 1

    try:
        manifest = pd.read_csv(manifest_path, dtype={"track_id": str, "sha256": str})
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"{manifest_path}: manifest not found (run the fetch stage first)"
        ) from error
    jobs = jobs_from_manifest(manifest, root, cache_dir, settings_key(settings))
    skipped_in_manifest = int((manifest["status"] != "ok").sum())

    results = []
    progress = tqdm(
        total=len(jobs), desc="features", unit="clip", disable=progress_off(show_progress)
    )
    with progress:
        for result in extract_all(jobs, settings, workers, int(resources["chunksize"])):
            if result.error:
                log.warning("skipped %s", result.error)
            results.append(result)
            progress.update()

    tables = build_tables(results, settings.features)
    output_dir.mkdir(parents=True, exist_ok=True)
    for name, table in tables.items():
        table.to_csv(output_dir / name, index=False)
    weights = settings.musicnn_weights
    feature_sets.write_settings(
        output_dir,
        settings.features,
        musicnn.weights_digest(weights) if weights else None,
        extraction_code_fingerprint(),
    )
    counts = {
        "clips": len(tables[CLIP_TABLE]),
        "segments": len(tables[SEGMENT_TABLE]),
        "failed": len(tables[FAILURES_TABLE]),
        "from_cache": sum(result.from_cache for result in results),
        "excluded_by_manifest": skipped_in_manifest,
    }
    return counts


def main(argv: list[str] | None = None) -> int:
    return stage_main("features", __doc__, run, argv, errors=(WorkerCrashError,))
