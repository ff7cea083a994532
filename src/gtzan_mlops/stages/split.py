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
  `split.artist_filtered.url` (github.com/coreyker/dnn-mgr, folder gtzan/, at a pinned
  commit; data/gtzan/artist_filtered.py).

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
from pathlib import Path
from typing import Any

import pandas as pd

from gtzan_mlops.cli import stage_main
from gtzan_mlops.data.split_strategies import LeakageError, make_split
from gtzan_mlops.data.splits import SPLIT_FILE, SUBSETS, SUMMARY_FILE, feature_dir, split_dir
from gtzan_mlops.settings.loading import ConfigError, resolve_path
from gtzan_mlops.settings.schema import Settings


def write_split(assignments: pd.DataFrame, summary: dict[str, Any], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    assignments.to_csv(folder / SPLIT_FILE, index=False)
    (folder / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


def run(settings: Settings, root: Path) -> dict[str, Any]:
    features = feature_dir(settings, root)
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
    duplicates = resolve_path(settings.paths.duplicates, root)
    assignments, summary = make_split(
        clips,
        segments,
        settings.split,
        root,
        duplicates if settings.split.group_duplicates else None,
    )
    write_split(assignments, summary, split_dir(settings, root))
    return summary


def describe(summary: dict[str, Any]) -> str:
    sizes = ", ".join(f"{subset} {summary['sizes'][subset]['tracks']}" for subset in SUBSETS)
    return f"{summary['label']} split ({summary['level']} level): songs {sizes}"


def main(argv: list[str] | None = None) -> int:
    return stage_main("split", __doc__, run, argv, errors=(LeakageError,), describe=describe)
