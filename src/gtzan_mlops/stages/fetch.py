"""The `fetch` stage: the audio under data/raw/genres/<genre>/ and the manifest describing it.

`data.source` in params.yaml picks where the audio comes from:

- `demo`: a small synthetic set generated from a seed (data/synthetic_demo.py), so `dvc repro`
  runs offline on a fresh clone. It is not music and says nothing about real accuracy.
- `local`: an existing GTZAN-style folder (`genres/<genre>/<genre>.000NN.{au,wav}`), copied.
- `gtzan`: the full collection, from an extracted folder, an existing `genres.tar.gz`, or a
  download from the mirrors (data/gtzan/archive.py: resumed after a broken transfer, md5
  checked, extracted safely).

Every audio file copied into data/raw is listed in data/manifest.csv. One that cannot be used
(undecodable, empty, truncated, too short, silent, or in a genre folder not in params `genres`)
is listed with the reason instead of failing the stage; the features stage skips it.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from gtzan_mlops.cli import stage_main
from gtzan_mlops.data.gtzan.archive import FetchError
from gtzan_mlops.data.manifest import (
    OK,
    ManifestGates,
    build_manifest,
    status_counts,
    write_manifest,
)
from gtzan_mlops.data.sources import plan_source
from gtzan_mlops.settings.loading import resolve_path
from gtzan_mlops.settings.schema import Settings

log = logging.getLogger(__name__)


def run(settings: Settings, root: Path, show_progress: bool = True) -> dict[str, Any]:
    """Write the audio (paths.raw) and the manifest (paths.manifest) from `data.source`;
    returns the summary counts.

    Raises ConfigError or FetchError when the stage as a whole cannot run; bad clips are only
    reported in the manifest.
    """
    raw_dir = resolve_path(settings.paths.raw, root)
    manifest_path = resolve_path(settings.paths.manifest, root)
    workers = settings.resources.fetch.workers or os.cpu_count() or 1
    source, write_audio = plan_source(settings, root, raw_dir, show_progress)

    # A fresh output every run: a changed source leaves no stale clips or manifest behind.
    shutil.rmtree(raw_dir, ignore_errors=True)
    manifest_path.unlink(missing_ok=True)
    raw_dir.mkdir(parents=True)
    write_audio()

    gates = ManifestGates.of(settings)
    manifest = build_manifest(raw_dir, root, source, gates, workers, show_progress)
    write_manifest(manifest, manifest_path)
    counts = status_counts(manifest)
    log.info(
        "manifest: %d clips from %s (%s) -> %s",
        len(manifest),
        source,
        ", ".join(f"{kind} {count}" for kind, count in counts.items()) or "none",
        manifest_path,
    )
    ok = counts.get(OK, 0)
    return {
        "source": settings.data.source,
        "clips": len(manifest),
        "ok": ok,
        "unusable": len(manifest) - ok,
    }


def main(argv: list[str] | None = None) -> int:
    return stage_main("fetch", __doc__, run, argv, errors=(FetchError,))
