"""The `features` stage: both feature sets of every usable clip, per clip and per segment.

The 57 hand-crafted features and the MSD_musicnn embeddings (with its 50 tag probabilities)
are computed from one decode of each clip (feature_sets.extract_sets). Clips are spread over a
process pool (features/extraction.py), or with `resources.engine: ray` run as Ray tasks on a
cluster (features/ray_extraction.py), with the same results. Each finished clip is saved at once
in a per-file cache keyed by the audio's sha256, the feature settings, the musicnn weights and
the extraction code (features/clip_cache.py), so a rerun after adding clips or after an
interruption extracts only what is missing. A clip that fails is logged with its reason, listed
in `failures.csv` and skipped; the stage still writes the tables of the others.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from gtzan_mlops.cli import stage_main
from gtzan_mlops.cluster import ray_session
from gtzan_mlops.console import progress_off
from gtzan_mlops.features import feature_sets, musicnn
from gtzan_mlops.features.clip_cache import extraction_code_fingerprint, settings_key
from gtzan_mlops.features.extraction import (
    ClipJob,
    ClipResult,
    WorkerCrashError,
    extract_all,
    jobs_from_manifest,
)
from gtzan_mlops.features.feature_sets import ExtractionSettings
from gtzan_mlops.features.ray_extraction import RayExtraction, RayExtractionError
from gtzan_mlops.features.tables import CLIP_TABLE, FAILURES_TABLE, SEGMENT_TABLE, build_tables
from gtzan_mlops.settings.loading import resolve_path
from gtzan_mlops.settings.schema import Settings

log = logging.getLogger(__name__)


def run(settings: Settings, root: Path, show_progress: bool = True) -> dict[str, int]:
    """Extract every usable clip of the manifest and write the tables; returns counts."""
    extraction = ExtractionSettings.of(settings, root)
    paths = settings.paths
    manifest_path = resolve_path(paths.manifest, root)
    output_dir = resolve_path(paths.features, root)
    cache_dir = resolve_path(paths.features_cache, root)

    try:
        manifest = pd.read_csv(manifest_path, dtype={"track_id": str, "sha256": str})
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"{manifest_path}: manifest not found (run the fetch stage first)"
        ) from error
    jobs = jobs_from_manifest(manifest, root, cache_dir, settings_key(extraction))
    skipped_in_manifest = int((manifest["status"] != "ok").sum())

    results = []
    with (
        _engine(jobs, extraction, settings) as extracted,
        tqdm(
            total=len(jobs), desc="features", unit="clip", disable=progress_off(show_progress)
        ) as progress,
    ):
        for result in extracted:
            if result.error:
                log.warning("skipped %s", result.error)
            results.append(result)
            progress.update()

    tables = build_tables(results, settings.features)
    output_dir.mkdir(parents=True, exist_ok=True)
    for name, table in tables.items():
        table.to_csv(output_dir / name, index=False)
    weights = extraction.musicnn_weights
    feature_sets.write_settings(
        output_dir,
        settings.features,
        musicnn.weights_digest(weights) if weights else None,
        extraction_code_fingerprint(),
    )
    return {
        "clips": len(tables[CLIP_TABLE]),
        "segments": len(tables[SEGMENT_TABLE]),
        "failed": len(tables[FAILURES_TABLE]),
        "from_cache": sum(result.from_cache for result in results),
        "excluded_by_manifest": skipped_in_manifest,
    }


@contextlib.contextmanager
def _engine(
    jobs: list[ClipJob], extraction: ExtractionSettings, settings: Settings
) -> Iterator[Iterable[ClipResult]]:
    """The clips' results, from the engine of `resources.engine`. On Ray, the session starts
    (and a cluster it cannot use is refused) before any clip or progress bar; `workers` clips
    are in flight at a time (0: one per CPU of the cluster) and a local Ray gets `workers` CPUs
    (0: all)."""
    resources = settings.resources
    workers = resources.features.workers
    if resources.engine == "local":
        pool = extract_all(
            jobs, extraction, workers or os.cpu_count() or 1, resources.features.chunksize
        )
        with contextlib.closing(pool):  # the pool stops with the stage, however it ends
            yield pool
        return
    with ray_session(
        resources.ray.address, purpose="features stage", num_cpus=workers or None
    ) as session:
        on_ray = RayExtraction(jobs, extraction, in_flight=workers or session.cpus)
        yield on_ray
        if on_ray.workers:
            log.info(
                "Ray: %d worker processes on %d nodes of %s extracted clips; musicnn models "
                "built: %d",
                len(on_ray.workers),
                len({worker.split(":")[0] for worker in on_ray.workers}),
                session.address,
                sum(on_ray.workers.values()),
            )


def main(argv: list[str] | None = None) -> int:
    return stage_main("features", __doc__, run, argv, errors=(WorkerCrashError, RayExtractionError))
