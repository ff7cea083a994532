"""The `features` stage: the 57 features of every usable clip, per clip and per segment.

Clips are spread over a process pool. Each finished clip is saved at once in a per-file cache
keyed by the audio's sha256, the feature settings and the extraction code (the source of
features.py and audio.py, the versions of the audio libraries), so a rerun after adding clips or
after an interruption extracts only what is missing. A clip that fails is logged with its
reason, listed in `failures.csv` and skipped; the stage still writes the tables of the others.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
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

from gtzan_mlops.audio import AudioError, load_waveform
from gtzan_mlops.cli import stage_main
from gtzan_mlops.config import resolve_path
from gtzan_mlops.features import (
    ClipFeatures,
    FeatureError,
    FeatureSettings,
    extract_clip,
    feature_names,
    warm_up,
)

log = logging.getLogger(__name__)

# What computes a feature value besides its settings: cached features of other code are not reused.
EXTRACTION_MODULES = ("features.py", "audio.py")
EXTRACTION_LIBRARIES = ("librosa", "numpy", "scipy", "soundfile", "soxr")

CLIP_TABLE = "features_30_sec.csv"
SEGMENT_TABLE = "features_3_sec.csv"
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
    features: ClipFeatures | None
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


def settings_key(settings: FeatureSettings) -> str:
    """A short hash of everything that decides a feature value: settings and extraction code."""
    payload = json.dumps(
        {**settings.to_dict(), "code": extraction_code_fingerprint()}, sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _load_cached(path: Path) -> tuple[ClipFeatures, int] | None:
    try:
        with np.load(path) as cached:
            return ClipFeatures(cached["clip"], cached["segments"]), int(cached["length"])
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        return None  # absent, or a partial file from an interrupted run: extract again


def _save_cached(path: Path, features: ClipFeatures, length: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(partial, "wb") as handle:
        np.savez(handle, clip=features.clip, segments=features.segments, length=length)
    partial.replace(path)  # atomic: an interrupted write never leaves a readable partial entry


def _worker_init() -> None:
    # One process per core already uses every core: BLAS threads inside each would oversubscribe.
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)


def extract_job(job: ClipJob, settings: FeatureSettings) -> ClipResult:
    """Features of one clip, from the cache when present; errors are returned, not raised."""
    cached = _load_cached(job.cache_path)
    if cached is not None:
        return ClipResult(job, cached[0], cached[1], from_cache=True)
    try:
        waveform = load_waveform(job.audio_path, settings.sample_rate, name=job.label)
        features = extract_clip(waveform, settings)
    except (AudioError, FeatureError) as error:
        message = str(error)
        if not message.startswith(job.label):
            message = f"{job.label}: {message}"
        return ClipResult(job, None, error=message)
    _save_cached(job.cache_path, features, len(waveform))
    return ClipResult(job, features, len(waveform))


class WorkerCrashError(RuntimeError):
    """A worker process of the pool died (a crash inside a native library, or killed)."""


def _run_chunk(jobs: list[ClipJob], settings: FeatureSettings) -> list[ClipResult]:
    return [extract_job(job, settings) for job in jobs]


def extract_all(
    jobs: list[ClipJob], settings: FeatureSettings, workers: int, chunksize: int = 1
) -> Iterator[ClipResult]:
    """Results in completion order, from `workers` processes (1: in this process).

    A worker that dies ends the stage with `WorkerCrashError` naming the clips it may have been
    on, instead of waiting for it forever; the clips finished so far are in the cache already.
    """
    if workers <= 1 or len(jobs) <= 1:
        yield from (extract_job(job, settings) for job in jobs)
        return
    warm_up(settings)  # compiles librosa's numba code here, so the workers only read its cache
    size = max(1, chunksize)
    chunks = [jobs[start : start + size] for start in range(0, len(jobs), size)]
    with ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),  # no forked copies of a threaded parent
        initializer=_worker_init,
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
                "far are cached; rerun with features.workers: 1 to see which clip fails"
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


def build_tables(
    results: list[ClipResult], settings: FeatureSettings
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The clip table, the segment table and the failures, sorted by track (and segment)."""
    names = list(feature_names(settings.n_mfcc))
    clip_rows: list[dict[str, Any]] = []
    segment_rows: list[dict[str, Any]] = []
    failures: list[dict[str, str]] = []
    for result in sorted(results, key=lambda item: item.job.track_id):
        job = result.job
        if result.features is None:
            failures.append({"track_id": job.track_id, "path": job.label, "reason": result.error})
            continue
        key = {"track_id": job.track_id}
        clip_rows.append(
            {
                **key,
                "genre": job.genre,
                "length": result.clip_length,
                **dict(zip(names, result.features.clip, strict=True)),
            }
        )
        for index, values in enumerate(result.features.segments):
            segment_rows.append(
                {
                    **key,
                    "segment": index,
                    "genre": job.genre,
                    "length": settings.segment_samples,
                    **dict(zip(names, values, strict=True)),
                }
            )
    clip_table = pd.DataFrame(clip_rows, columns=["track_id", "genre", "length", *names])
    segment_table = pd.DataFrame(
        segment_rows, columns=["track_id", "segment", "genre", "length", *names]
    )
    failure_table = pd.DataFrame(failures, columns=["track_id", "path", "reason"])
    return clip_table, segment_table, failure_table


def run(params: dict[str, Any], root: Path, show_progress: bool = True) -> dict[str, int]:
    """Extract every usable clip of the manifest and write the tables; returns counts."""
    settings = FeatureSettings.from_params(params)
    stage = params["features"]
    manifest_path = resolve_path(stage.get("manifest", "data/manifest.csv"), root)
    output_dir = resolve_path(stage.get("output_dir", "data/features"), root)
    cache_dir = resolve_path(stage.get("cache_dir", "data/features/cache"), root)
    workers = int(stage.get("workers", 0)) or os.cpu_count() or 1

    try:
        manifest = pd.read_csv(manifest_path, dtype={"track_id": str, "sha256": str})
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"{manifest_path}: manifest not found (run the fetch stage first)"
        ) from error
    jobs = jobs_from_manifest(manifest, root, cache_dir, settings_key(settings))
    skipped_in_manifest = int((manifest["status"] != "ok").sum())

    results = []
    progress = tqdm(total=len(jobs), desc="features", unit="clip", disable=not show_progress)
    with progress:
        for result in extract_all(jobs, settings, workers, int(stage.get("chunksize", 1))):
            if result.error:
                log.warning("skipped %s", result.error)
            results.append(result)
            progress.update()

    clip_table, segment_table, failure_table = build_tables(results, settings)
    output_dir.mkdir(parents=True, exist_ok=True)
    clip_table.to_csv(output_dir / CLIP_TABLE, index=False)
    segment_table.to_csv(output_dir / SEGMENT_TABLE, index=False)
    failure_table.to_csv(output_dir / FAILURES_TABLE, index=False)
    counts = {
        "clips": len(clip_table),
        "segments": len(segment_table),
        "failed": len(failure_table),
        "from_cache": sum(result.from_cache for result in results),
        "excluded_by_manifest": skipped_in_manifest,
    }
    log.info("features: %s", ", ".join(f"{name} {count}" for name, count in counts.items()))
    return counts


def main(argv: list[str] | None = None) -> int:
    return stage_main("features", __doc__, run, argv, errors=(WorkerCrashError,))
