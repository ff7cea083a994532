"""Where the fetch stage's audio comes from (`data.source`), checked before anything is written:

- `demo`: the synthetic set generated from a seed (synthetic_demo.py);
- `local`: an existing GTZAN-style folder (`genres/<genre>/<genre>.000NN.{au,wav}`), copied;
- `gtzan`: the full collection, from an extracted folder, an existing `genres.tar.gz`, or a
  download from the mirrors (gtzan/archive.py).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

from gtzan_mlops.data.gtzan.archive import (
    ARCHIVE_NAME,
    download_archive,
    extract_genres_archive,
    verify_md5,
)
from gtzan_mlops.data.gtzan.layout import copy_genre_folder, find_genres_folder
from gtzan_mlops.data.synthetic_demo import generate_synthetic_demo
from gtzan_mlops.settings.loading import ConfigError, resolve_path
from gtzan_mlops.settings.schema import GtzanSource, Settings

SYNTHETIC_SOURCE = "synthetic-demo"  # the manifest's `source` for generated clips

WriteAudio = Callable[[], object]  # writes the audio into the stage's raw folder


def _outside(path: Path, raw_dir: Path, setting: str) -> Path:
    """`path`, unless wiping `raw_dir` at the start of the stage would delete it."""
    resolved, raw = path.resolve(), raw_dir.resolve()
    if resolved.is_relative_to(raw) or raw.is_relative_to(resolved):
        raise ConfigError(
            f"params.yaml: {setting}: {path} overlaps the stage's output folder {raw_dir}, "
            f"which is emptied at every run"
        )
    return path


def plan_source(
    settings: Settings, root: Path, raw_dir: Path, show_progress: bool
) -> tuple[str, WriteAudio]:
    """(the manifest's source label, the step writing the audio into `raw_dir`); raises
    ConfigError before anything is written when the source cannot be used."""
    data = settings.data
    if data.source == "demo":
        demo = data.demo
        return SYNTHETIC_SOURCE, partial(
            generate_synthetic_demo,
            tuple(settings.genres),
            raw_dir,
            demo.clips_per_genre,
            demo.duration_s,
            demo.sample_rate,
            demo.seed,
        )
    if data.source == "local":
        assert data.local_dir  # the schema requires it for this source
        folder = find_genres_folder(resolve_path(data.local_dir, root), "data.local_dir")
        _outside(folder, raw_dir, "data.local_dir")
        return "local", partial(copy_genre_folder, folder, raw_dir)
    return "gtzan", plan_gtzan(data.gtzan, root, raw_dir, show_progress)


def plan_gtzan(gtzan: GtzanSource, root: Path, raw_dir: Path, show_progress: bool) -> WriteAudio:
    """The step writing GTZAN's audio into `raw_dir`: copied from `data.gtzan.folder`,
    extracted from `data.gtzan.archive` (md5 checked), or downloaded from the mirrors into
    `data.gtzan.download_dir` (kept there, reused while its md5 matches) and extracted."""
    if gtzan.folder:
        folder = find_genres_folder(resolve_path(gtzan.folder, root), "data.gtzan.folder")
        return partial(copy_genre_folder, _outside(folder, raw_dir, "data.gtzan.folder"), raw_dir)
    if gtzan.archive:
        archive = _outside(resolve_path(gtzan.archive, root), raw_dir, "data.gtzan.archive")
        if not archive.is_file():
            raise ConfigError(f"params.yaml: data.gtzan.archive: {archive}: no such file")

        def from_archive() -> None:
            verify_md5(archive, gtzan.md5)
            extract_genres_archive(archive, raw_dir)

        return from_archive
    download_dir = resolve_path(gtzan.download_dir, root)
    if download_dir.resolve().is_relative_to(raw_dir.resolve()):
        raise ConfigError(
            f"params.yaml: data.gtzan.download_dir: {download_dir} is inside the stage's "
            f"output folder {raw_dir}, which is emptied at every run"
        )
    if not gtzan.mirrors and not (download_dir / ARCHIVE_NAME).is_file():
        raise ConfigError(
            "params.yaml: data.gtzan sets no folder, no archive and no mirrors, and "
            f"{download_dir / ARCHIVE_NAME} does not exist: nowhere to get GTZAN from"
        )

    def from_mirrors() -> None:
        extract_genres_archive(download_archive(gtzan, root, show_progress), raw_dir)

    return from_mirrors
