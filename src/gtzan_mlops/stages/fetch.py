"""The `fetch` stage: the audio under data/raw/genres/<genre>/ and the manifest describing it.

`data.source` in params.yaml picks where the audio comes from:

- `demo`: a small synthetic set generated from a seed (synthetic_demo.py), so `dvc repro` runs
  offline on a fresh clone. It is not music and says nothing about real accuracy.
- `local`: an existing GTZAN-style folder (`genres/<genre>/<genre>.000NN.{au,wav}`), copied.
- `gtzan`: the full collection, from an extracted folder, an existing `genres.tar.gz`, or a
  download from the mirrors (gtzan_archive.py: resumed after a broken transfer, md5 checked,
  extracted safely).

Every audio file copied into data/raw is listed in data/manifest.csv. One that cannot be used
(undecodable, empty, truncated, too short, silent, or in a genre folder not in params `genres`)
is listed with the reason instead of failing the stage; the features stage skips it.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm import tqdm

from gtzan_mlops.cli import stage_main
from gtzan_mlops.console import progress_off
from gtzan_mlops.data.audio import (
    AUDIO_EXTENSIONS,
    AudioError,
    AudioInfo,
    QualityGates,
    find_truncation,
    inspect_audio,
    quality_problems,
)
from gtzan_mlops.data.gtzan import (
    ARCHIVE_NAME,
    FetchError,
    GtzanSettings,
    download_archive,
    extract_genres_archive,
    verify_md5,
)
from gtzan_mlops.data.synthetic_demo import generate_synthetic_demo
from gtzan_mlops.settings.loading import ConfigError, number_setting, resolve_path, section
from gtzan_mlops.tracking import file_digest

log = logging.getLogger(__name__)

SOURCES = ("demo", "local", "gtzan")
SYNTHETIC_SOURCE = "synthetic-demo"  # the manifest's `source` for generated clips
MANIFEST_COLUMNS = (
    "path",
    "genre",
    "track_id",
    "duration_s",
    "sample_rate",
    "channels",
    "sha256",
    "status",
    "source",
)
OK = "ok"


# --------------------------------------------------------------------------------------------
# local and gtzan folders


def _is_audio_file(path: Path) -> bool:
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
        if _is_audio_file(path)
    )


def find_genres_folder(folder: Path, setting: str) -> Path:
    """The `genres/` folder of a GTZAN-style collection: `folder/genres`, or `folder` itself.

    `setting` names the params key the folder came from, for the error message.
    """
    if not folder.is_dir():
        raise ConfigError(f"params.yaml: {setting}: {folder}: no such folder")
    for candidate in (folder / "genres", folder):
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
        target = raw_dir / "genres" / source.parent.name / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
        copied.append(target)
    log.info("copied %d audio files from %s", len(copied), genres_dir)
    return copied


# --------------------------------------------------------------------------------------------
# the manifest


@dataclass(frozen=True)
class ManifestGates:
    """What a clip must pass to be usable: its folder among params `genres`, and the quality
    gates the served model applies too (`data.min_duration_s`, `data.silence_peak`,
    `data.max_peak`)."""

    genres: tuple[str, ...]
    min_duration_s: float
    silence_peak: float
    max_peak: float

    @property
    def quality(self) -> QualityGates:
        return QualityGates(self.min_duration_s, self.silence_peak, self.max_peak)


def clip_status(path: Path, genre: str, gates: ManifestGates) -> tuple[AudioInfo | None, str]:
    """(AudioInfo or None when undecodable, `ok` or `<problem>: <detail>`) for one file."""
    if path.stat().st_size == 0:
        return None, "empty: 0 bytes"
    truncation = find_truncation(path)
    try:
        info = inspect_audio(path)
    except AudioError as error:
        if truncation is not None:
            return None, quality_problems(math.inf, math.inf, truncation, gates.quality)[0].message
        reason = str(error).removeprefix(f"{path}: ")
        return None, f"undecodable: {reason}"
    problems = quality_problems(info.duration_s, info.peak, truncation, gates.quality)
    if problems:
        return info, problems[0].message
    if genre not in gates.genres:
        return info, f"unknown genre: folder '{genre}' is not in params genres"
    return info, OK


def inspect_file(path: Path, gates: ManifestGates) -> dict[str, Any]:
    """The manifest row of one file (path absolute); sha256 is filled whenever it is readable."""
    genre = path.parent.name
    try:
        info, status = clip_status(path, genre, gates)
        sha256 = file_digest(path, "sha256")
    except OSError as error:
        info, status, sha256 = None, f"unreadable: {error.strerror or error}", ""
    return {
        "path": path,
        "genre": genre,
        "track_id": path.stem,
        "duration_s": round(info.duration_s, 6) if info else math.nan,
        "sample_rate": info.sample_rate if info else None,
        "channels": info.channels if info else None,
        "sha256": sha256,
        "status": status,
    }


def build_manifest(
    raw_dir: Path,
    root: Path,
    source: str,
    gates: ManifestGates,
    workers: int = 1,
    show_progress: bool = True,
) -> pd.DataFrame:
    """One row per audio file under `raw_dir/genres/<genre>/`, sorted by genre then track id.

    A bad file gets its reason in `status`, never an exception. Files are inspected by `workers`
    threads: reading, decoding (libsndfile), hashing and numpy release the GIL, so threads
    overlap them without a process pool's start-up, which costs more than it saves at GTZAN's
    size (a 30 s clip takes about 5 ms to inspect).
    """
    paths = genre_audio_files(raw_dir / "genres")
    inspect = partial(inspect_file, gates=gates)
    rows = []
    with (
        ThreadPoolExecutor(max(1, workers)) as pool,
        tqdm(
            total=len(paths), desc="manifest", unit="clip", disable=progress_off(show_progress)
        ) as bar,
    ):
        for row in pool.map(inspect, paths):
            rows.append(row)
            bar.update()
    for row in rows:
        path = row["path"]
        row["path"] = (
            path.relative_to(root).as_posix() if path.is_relative_to(root) else path.as_posix()
        )
        row["source"] = source
        if row["status"] != OK:
            log.warning("unusable clip %s: %s", path, row["status"])
    manifest = pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))
    manifest = manifest.sort_values(["genre", "track_id"], kind="stable", ignore_index=True)
    for column in ("sample_rate", "channels"):
        manifest[column] = manifest[column].astype("Int64")
    manifest["duration_s"] = manifest["duration_s"].astype(float)
    return manifest


def status_counts(manifest: pd.DataFrame) -> dict[str, int]:
    """Clips per status kind (`ok`, `truncated`, `silent`, ...: the status before its colon)."""
    kinds = manifest["status"].astype(str).str.split(":", n=1).str[0]
    return dict(sorted(Counter(kinds).items(), key=lambda item: (item[0] != OK, item[0])))


# --------------------------------------------------------------------------------------------
# the stage


def _genres(params: dict[str, Any]) -> tuple[str, ...]:
    genres = section(params, "genres")
    if (
        not isinstance(genres, list)
        or not genres
        or not all(isinstance(genre, str) and genre for genre in genres)
        or len(set(genres)) != len(genres)
    ):
        raise ConfigError(f"params.yaml: genres must be a list of distinct names, got {genres!r}")
    return tuple(genres)


def _outside(path: Path, raw_dir: Path, setting: str) -> Path:
    """`path`, unless wiping `raw_dir` at the start of the stage would delete it."""
    resolved, raw = path.resolve(), raw_dir.resolve()
    if resolved.is_relative_to(raw) or raw.is_relative_to(resolved):
        raise ConfigError(
            f"params.yaml: {setting}: {path} overlaps the stage's output folder {raw_dir}, "
            f"which is emptied at every run"
        )
    return path


def _plan_source(
    params: dict[str, Any], root: Path, raw_dir: Path, show_progress: bool
) -> tuple[str, Callable[[], object]]:
    """(manifest source label, the step writing the audio into raw_dir), config checked first."""
    data = section(params, "data")
    source = data["source"]
    if source not in SOURCES:
        raise ConfigError(
            f"params.yaml: data.source is {source!r}; expected one of: {', '.join(SOURCES)}"
        )
    genres = _genres(params)
    if source == "demo":
        demo = section(params, "data.demo")
        clips = number_setting(demo, "clips_per_genre", "data.demo", int, minimum=1)
        duration_s = number_setting(demo, "duration_s", "data.demo", float, minimum=0.01)
        sample_rate = number_setting(demo, "sample_rate", "data.demo", int, minimum=1000)
        seed = number_setting(demo, "seed", "data.demo", int, minimum=0)
        return SYNTHETIC_SOURCE, partial(
            generate_synthetic_demo, genres, raw_dir, clips, duration_s, sample_rate, seed
        )
    if source == "local":
        local_dir = data["local_dir"]
        if not local_dir:
            raise ConfigError("params.yaml: data.local_dir must be set when data.source is local")
        folder = find_genres_folder(resolve_path(local_dir, root), "data.local_dir")
        _outside(folder, raw_dir, "data.local_dir")
        return "local", partial(copy_genre_folder, folder, raw_dir)
    gtzan = GtzanSettings.from_params(params, root)
    if gtzan.folder is not None:
        folder = _outside(
            find_genres_folder(gtzan.folder, "data.gtzan.folder"), raw_dir, "data.gtzan.folder"
        )
        return "gtzan", partial(copy_genre_folder, folder, raw_dir)
    if gtzan.archive is not None:
        archive = _outside(gtzan.archive, raw_dir, "data.gtzan.archive")
        if not archive.is_file():
            raise ConfigError(f"params.yaml: data.gtzan.archive: {archive}: no such file")

        def from_archive() -> None:
            verify_md5(archive, gtzan.md5)
            extract_genres_archive(archive, raw_dir)

        return "gtzan", from_archive
    if gtzan.download_dir.resolve().is_relative_to(raw_dir.resolve()):
        raise ConfigError(
            f"params.yaml: data.gtzan.download_dir: {gtzan.download_dir} is inside the stage's "
            f"output folder {raw_dir}, which is emptied at every run"
        )
    if not gtzan.mirrors and not (gtzan.download_dir / ARCHIVE_NAME).is_file():
        raise ConfigError(
            "params.yaml: data.gtzan sets no folder, no archive and no mirrors, and "
            f"{gtzan.download_dir / ARCHIVE_NAME} does not exist: nowhere to get GTZAN from"
        )

    def from_mirrors() -> None:
        extract_genres_archive(download_archive(gtzan, show_progress), raw_dir)

    return "gtzan", from_mirrors


def run(params: dict[str, Any], root: Path, show_progress: bool = True) -> dict[str, Any]:
    """Write the audio (paths.raw) and the manifest (paths.manifest) from `data.source`;
    returns the summary counts.

    Raises ConfigError or FetchError when the stage as a whole cannot run; bad clips are only
    reported in the manifest.
    """
    raw_dir = resolve_path(params["paths"]["raw"], root)
    manifest_path = resolve_path(params["paths"]["manifest"], root)
    data = section(params, "data")
    gates = ManifestGates(
        genres=_genres(params),
        min_duration_s=number_setting(data, "min_duration_s", "data", float, minimum=0),
        silence_peak=number_setting(data, "silence_peak", "data", float, minimum=0),
        max_peak=float(data["max_peak"]),
    )
    workers = params["resources"]["fetch"]["workers"] or os.cpu_count() or 1
    source, write_audio = _plan_source(params, root, raw_dir, show_progress)

    # A fresh output every run: a changed source leaves no stale clips or manifest behind.
    shutil.rmtree(raw_dir, ignore_errors=True)
    manifest_path.unlink(missing_ok=True)
    raw_dir.mkdir(parents=True)
    write_audio()

    manifest = build_manifest(raw_dir, root, source, gates, workers, show_progress)
    staged = manifest_path.with_name(f".{manifest_path.name}.tmp")
    manifest.to_csv(staged, index=False)
    staged.replace(manifest_path)  # a manifest is either complete or absent
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
        "source": data["source"],
        "clips": len(manifest),
        "ok": ok,
        "unusable": len(manifest) - ok,
    }


def main(argv: list[str] | None = None) -> int:
    return stage_main("fetch", __doc__, run, argv, errors=(FetchError,))
