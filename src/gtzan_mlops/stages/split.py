"""The `split` stage: which clips (or segments) train, validate and test, checked for leakage.

Strategies (`split.strategy` in params.yaml):

- `clip_stratified`: the 30 s protocol of the source study: whole clips, stratified by genre
  (test `split.test_size` = 30 %), models train on the clip table.
- `song_grouped`: 3 s segments, every segment of a song on the same side (the songs are split,
  stratified by genre), models train on the segment table and vote per song.
- `random_segments`: 3 s segments assigned at random, ignoring songs. LEAKY: segments of one song
  end up on both sides, so test accuracy measures memory of songs, not genre. It exists only to
  reproduce published numbers; its label, every run name and every metrics file say `leaky`.
- `artist_filtered`: the artist-filtered ("fault-filtered") split of Kereliuk, Sturm and Larsen
  (2015): fixed lists of 443 / 197 / 290 clips with no artist on two sides and known-faulty
  clips removed. Listed clips missing from the available audio are reported, not dropped
  silently. The lists come from `split.artist_filtered.lists_dir`, or are downloaded from
  `split.artist_filtered.url` (github.com/coreyker/dnn-mgr, folder gtzan/).

With `split.artists_file` (a CSV of track_id, artist) the stratified strategies keep each
artist on one side, and the leakage check covers artists as well as songs.

Output: `data/split/split.csv` (track_id[, segment], genre, subset, unit) and `summary.json`
(the strategy, its label, whether it is leaky, the level models train at, sizes and the leakage
check). `unit` is what the split keeps on one side: the track, or its duplicate group or artist
(the track for `random_segments`); bootstrap intervals resample units and selection folds keep
them whole. A non-leaky split with a song (or artist) on two sides fails the stage, naming them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd

from gtzan_mlops.cli import stage_main
from gtzan_mlops.data.split_strategies import (
    STRATEGIES,
    LeakageError,
    Strategy,
    assign_filtered,
    assign_groups,
    assign_segments,
    check_leakage,
    download_filtered_lists,
    group_of_tracks,
    read_filtered_lists,
)
from gtzan_mlops.data.splits import (
    GROUP_COLUMN,
    SPLIT_FILE,
    SUBSETS,
    SUMMARY_FILE,
    feature_dir,
    read_groups,
    split_dir,
)
from gtzan_mlops.settings.loading import ConfigError, resolve_path

log = logging.getLogger(__name__)


def summarise(
    assignments: pd.DataFrame, strategy: Strategy, level: str, seed: int
) -> dict[str, Any]:
    """What the split is and how big each side is (songs per genre; segments when split by
    segment)."""
    sizes = {}
    for subset in SUBSETS:
        chosen = assignments[assignments["subset"] == subset]
        per_genre = chosen.groupby("genre")["track_id"].nunique()
        sizes[subset] = {
            "tracks": int(chosen["track_id"].nunique()),
            "genres": {str(genre): int(count) for genre, count in per_genre.items()},
        }
        if "segment" in chosen.columns:
            sizes[subset]["segments"] = len(chosen)
    return {
        "strategy": strategy.name,
        "label": strategy.label,
        "leaky": strategy.leaky,
        "level": level,
        "seed": seed,
        "sizes": sizes,
    }


def make_split(
    clips: pd.DataFrame,
    segments: pd.DataFrame,
    stage: dict[str, Any],
    root: Path,
    duplicates_table: Path | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The assignments and summary for `stage` (params' `split` section), keeping the groups
    of `duplicates_table` (the duplicates stage's output) on one side when given."""
    name = str(stage["strategy"])
    if name not in STRATEGIES:
        raise ConfigError(f"split.strategy must be one of {sorted(STRATEGIES)}, got {name!r}")
    strategy = STRATEGIES[name]
    seed, valid_size, test_size = (stage[key] for key in ("seed", "valid_size", "test_size"))
    artists = read_artists(stage["artists_file"], root)
    duplicates = read_groups(duplicates_table) if duplicates_table else None
    extra: dict[str, Any] = {
        "duplicate_groups": (
            int(duplicates[GROUP_COLUMN].nunique()) if duplicates is not None else "not checked"
        )
    }

    if name == "clip_stratified":
        level = "clip"
        assignments = assign_groups(clips, valid_size, test_size, seed, artists, duplicates)
    elif name == "song_grouped":
        level = "segment"
        assignments = assign_groups(clips, valid_size, test_size, seed, artists, duplicates)
    elif name == "random_segments":
        level = "segment"
        assignments = assign_segments(segments, valid_size, test_size, seed)
    else:
        filtered = stage["artist_filtered"]
        level = str(filtered["level"])
        lists_dir = filtered["lists_dir"]
        if lists_dir:
            folder = resolve_path(lists_dir, root)
        else:
            folder = download_filtered_lists(
                str(filtered["url"]),
                resolve_path(filtered["download_dir"], root),
                float(filtered["timeout_s"]),
                filtered["sha256"],
            )
        assignments, missing, unlisted = assign_filtered(clips, read_filtered_lists(folder))
        n_missing = sum(map(len, missing.values()))
        if n_missing:
            log.warning(
                "artist-filtered lists name %d clips that are not in the features table "
                "(absent from the audio or failed extraction): %s",
                n_missing,
                ", ".join(f"{subset} {len(ids)}" for subset, ids in missing.items()),
            )
        if assignments.empty:
            raise ConfigError(
                "no available clip is named in the artist-filtered lists (is the data GTZAN?)"
            )
        # The lists keep artists apart; the units say which clips to resample together.
        unit = group_of_tracks(clips, artists, duplicates)
        unit_of = dict(zip(clips["track_id"].astype(str), unit, strict=True))
        assignments["unit"] = assignments["track_id"].astype(str).map(unit_of)
        extra.update(missing_from_audio=missing, available_but_unlisted=unlisted)
    if level not in ("clip", "segment"):
        raise ConfigError(f"split.artist_filtered.level must be clip or segment, got {level!r}")

    summary = summarise(assignments, strategy, level, seed)
    summary["leakage"] = check_leakage(assignments, strategy, artists, duplicates)
    summary.update(extra)
    return assignments, summary


def read_artists(path: str | None, root: Path) -> pd.DataFrame | None:
    if not path:
        return None
    resolved = resolve_path(path, root)
    try:
        artists = pd.read_csv(resolved, dtype=str)
    except FileNotFoundError as error:
        raise ConfigError(f"{resolved}: split.artists_file not found") from error
    if not {"track_id", "artist"} <= set(artists.columns):
        raise ConfigError(f"{resolved}: needs the columns track_id and artist")
    return artists.dropna(subset=["artist"])


def write_split(assignments: pd.DataFrame, summary: dict[str, Any], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    assignments.to_csv(folder / SPLIT_FILE, index=False)
    (folder / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


def run(params: dict[str, Any], root: Path) -> dict[str, Any]:
    stage = params["split"]
    features = feature_dir(params, root)
    # Track ids are names (an all-digit one must not turn into a number).
    clips = pd.read_csv(
        features / "features_30_sec.csv", usecols=["track_id", "genre"], dtype={"track_id": str}
    )
    segments = pd.read_csv(
        features / "features_3_sec.csv",
        usecols=["track_id", "segment", "genre"],
        dtype={"track_id": str},
    )
    if clips.empty:
        raise ConfigError(f"{features / 'features_30_sec.csv'}: no clips to split")
    duplicates = resolve_path(params["paths"]["duplicates"], root)
    assignments, summary = make_split(
        clips, segments, stage, root, duplicates if stage["group_duplicates"] else None
    )
    write_split(assignments, summary, split_dir(params, root))
    return summary


def describe(summary: dict[str, Any]) -> str:
    sizes = ", ".join(f"{subset} {summary['sizes'][subset]['tracks']}" for subset in SUBSETS)
    return f"{summary['label']} split ({summary['level']} level): songs {sizes}"


def main(argv: list[str] | None = None) -> int:
    return stage_main("split", __doc__, run, argv, errors=(LeakageError,), describe=describe)
