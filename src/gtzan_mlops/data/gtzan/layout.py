"""GTZAN's layout: the audio at `genres/<genre>/<genre>.000NN.<ext>` (the archive's layout,
which a folder of one's own follows too); how its clips are named is names.py's."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from gtzan_mlops.data.audio import AUDIO_EXTENSIONS
from gtzan_mlops.data.gtzan.names import genre_of
from gtzan_mlops.settings.loading import ConfigError

log = logging.getLogger(__name__)

GENRES_FOLDER = "genres"


def is_audio_file(path: Path) -> bool:
    # Hidden files are skipped: macOS leaves `._name.au` resource forks beside real clips.
    return (
        path.suffix.lower() in AUDIO_EXTENSIONS and not path.name.startswith(".") and path.is_file()
    )


def genre_audio_files(genres_dir: Path) -> list[Path]:
    """Audio files at `genres_dir/<genre>/<file>`, sorted by genre then name."""
    if not genres_dir.is_dir():
        return []
    return sorted(
        path
        for folder in genres_dir.iterdir()
        if folder.is_dir() and not folder.name.startswith(".")
        for path in folder.iterdir()
        if is_audio_file(path)
    )


def find_genres_folder(folder: Path, setting: str) -> Path:
    """The `genres/` folder of a GTZAN-style collection: `folder/genres`, or `folder` itself.

    `setting` names the params key the folder came from, for the error message.
    """
    if not folder.is_dir():
        raise ConfigError(f"params.yaml: {setting}: {folder}: no such folder")
    for candidate in (folder / GENRES_FOLDER, folder):
        if genre_audio_files(candidate):
            return candidate
    raise ConfigError(
        f"params.yaml: {setting}: {folder}: no audio files at genres/<genre>/<file> in it, "
        f"nor at <genre>/<file>"
    )


def copy_genre_folder(genres_dir: Path, raw_dir: Path) -> list[Path]:
    """Copy each audio file of `genres_dir/<genre>/` to `raw_dir/genres/<genre>/`, same name.

    Files in genre folders missing from params `genres` are copied too: the manifest lists them
    as unusable, so a misnamed folder is reported rather than silently dropped.
    """
    sources = genre_audio_files(genres_dir)
    copied = []
    for source in sources:
        target = raw_dir / GENRES_FOLDER / genre_of(source) / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
        copied.append(target)
    log.info("copied %d audio files from %s", len(copied), genres_dir)
    return copied
