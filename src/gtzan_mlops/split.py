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

Output: `data/split/split.csv` (track_id[, segment], genre, subset) and `summary.json` (the
strategy, its label, whether it is leaky, the level models train at, sizes and the leakage
check). A non-leaky split with a song (or artist) on two sides fails the stage, naming them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gtzan_mlops.cli import stage_main
from gtzan_mlops.config import ConfigError, resolve_path
from gtzan_mlops.split_data import (
    GROUP_COLUMN,
    SPLIT_FILE,
    SUBSETS,
    SUMMARY_FILE,
    connected_components,
    read_groups,
)

log = logging.getLogger(__name__)

LIST_FILES = {subset: f"{subset}_filtered.txt" for subset in SUBSETS}


@dataclass(frozen=True)
class Strategy:
    name: str
    label: str
    leaky: bool
    unit: str  # what is assigned to a subset: "group" (a song, or an artist) or "segment"


STRATEGIES = {
    "clip_stratified": Strategy("clip_stratified", "clip-stratified", False, "group"),
    "song_grouped": Strategy("song_grouped", "song-grouped", False, "group"),
    "random_segments": Strategy("random_segments", "random-segments-leaky", True, "segment"),
    "artist_filtered": Strategy("artist_filtered", "artist-filtered", False, "group"),
}


class LeakageError(ValueError):
    """A song or an artist is on two sides of a split that must not leak."""


def stratified_assignment(
    units: pd.DataFrame, valid_size: float, test_size: float, seed: int
) -> pd.Series:
    """A subset for each row of `units` (columns `unit`, `genre`), stratified by genre.

    Per genre, the units are shuffled (from a sorted order, so the result depends only on the
    seed and the data) and cut into test, valid and train. A genre with three or more units has
    at least one in test, one in train and (when valid_size > 0) one in valid, whatever the
    sizes, so tiny data sets still train, validate and test every genre.
    """
    if not 0 < test_size < 1 or not 0 <= valid_size < 1:
        raise ConfigError("split.test_size must be in (0, 1) and split.valid_size in [0, 1)")
    rng = np.random.default_rng(seed)
    subset = pd.Series("", index=units.index, dtype=object)
    for _, group in units.sort_values(["genre", "unit"]).groupby("genre", sort=True):
        order = group.index.to_numpy()[rng.permutation(len(group))]
        total = len(order)
        if total >= 3:
            n_test = min(max(1, round(total * test_size)), total - (2 if valid_size else 1))
        else:
            n_test = min(total - 1, 1)
        rest = total - n_test
        n_valid = round(rest * valid_size) if valid_size else 0
        if valid_size and rest >= 2:
            n_valid = max(1, min(n_valid, rest - 1))
        subset[order[:n_test]] = "test"
        subset[order[n_test : n_test + n_valid]] = "valid"
        subset[order[n_test + n_valid :]] = "train"
    return subset


def group_of_tracks(
    tracks: pd.DataFrame, artists: pd.DataFrame | None, duplicates: pd.DataFrame | None = None
) -> pd.Series:
    """The unit kept on one side for each track: the tracks linked by a shared artist or a
    duplicate group (duplicates.py), transitively. A unit is named after its artist when it
    has one (`artist:<name>`, the first by name), else its duplicate group, else the track."""
    ids = tracks["track_id"].astype(str).tolist()
    known = set(ids)
    labels: dict[str, list[str]] = {}  # track -> artist and group labels linking it
    for table, column, prefix in ((artists, "artist", "artist:"), (duplicates, GROUP_COLUMN, "")):
        if table is None:
            continue
        for track, value in zip(table["track_id"], table[column], strict=True):
            if track in known:
                labels.setdefault(track, []).append(f"{prefix}{value}")
    # Tracks and labels as one graph: tracks sharing a label are in one component.
    links = [(track, label) for track, linked in labels.items() for label in linked]
    component = connected_components(ids, links)
    names: dict[str, str] = {}
    for track, linked in labels.items():
        key = component[track]
        names[key] = min([names.get(key, "~"), *linked], key=_unit_order)
    return pd.Series(
        [names.get(component[track], track) for track in ids], index=tracks.index, name="unit"
    )


def _unit_order(label: str) -> tuple[int, str]:
    """Artists name a unit before duplicate groups ("~" marks no name yet)."""
    return (0 if label.startswith("artist:") else 1 if label != "~" else 2, label)


def assign_groups(
    tracks: pd.DataFrame,
    valid_size: float,
    test_size: float,
    seed: int,
    artists: pd.DataFrame | None,
    duplicates: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """track_id, genre, subset: whole songs (with their artist's songs and their duplicates)
    per subset, stratified by genre."""
    units = tracks[["track_id", "genre"]].copy()
    units["unit"] = group_of_tracks(tracks, artists, duplicates).to_numpy()
    # A group spanning several genres is stratified under its most frequent one.
    per_unit = units.groupby("unit")["genre"].agg(lambda genres: genres.mode().iloc[0])
    unit_table = per_unit.reset_index()
    unit_table["subset"] = stratified_assignment(unit_table, valid_size, test_size, seed)
    units["subset"] = units["unit"].map(unit_table.set_index("unit")["subset"])
    return units[["track_id", "genre", "subset"]].sort_values("track_id").reset_index(drop=True)


def assign_segments(
    segments: pd.DataFrame, valid_size: float, test_size: float, seed: int
) -> pd.DataFrame:
    """track_id, segment, genre, subset: every segment on its own (the leaky protocol)."""
    units = segments[["track_id", "segment", "genre"]].copy()
    units["unit"] = units["track_id"] + "#" + units["segment"].astype(str)
    units["subset"] = stratified_assignment(units, valid_size, test_size, seed)
    columns = ["track_id", "segment", "genre", "subset"]
    return units[columns].sort_values(["track_id", "segment"]).reset_index(drop=True)


def track_id_of_list_entry(entry: str) -> str:
    """`blues/blues.00029.wav` (or .au) -> `blues.00029`."""
    return Path(entry.strip()).stem


def read_filtered_lists(folder: Path) -> dict[str, list[str]]:
    """The three artist-filtered lists as track ids, per subset."""
    lists = {}
    for subset, name in LIST_FILES.items():
        path = folder / name
        if not path.is_file():
            raise ConfigError(
                f"{path}: artist-filtered list not found; set split.artist_filtered.lists_dir "
                "to the folder holding train/valid/test_filtered.txt (from "
                "https://github.com/coreyker/dnn-mgr/tree/master/gtzan)"
            )
        entries = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        lists[subset] = [track_id_of_list_entry(entry) for entry in entries]
    return lists


def download_filtered_lists(base_url: str, folder: Path, timeout_s: float) -> Path:
    """Fetch the three list files from `base_url` into `folder` (once); returns `folder`."""
    import requests

    folder.mkdir(parents=True, exist_ok=True)
    for name in LIST_FILES.values():
        target = folder / name
        if target.is_file():
            continue
        url = f"{base_url.rstrip('/')}/{name}"
        try:
            response = requests.get(url, timeout=timeout_s)
            response.raise_for_status()
        except requests.RequestException as error:
            raise ConfigError(
                f"{url}: could not download the artist-filtered list ({error}); download "
                f"train/valid/test_filtered.txt by hand and set split.artist_filtered.lists_dir"
            ) from error
        partial = target.with_suffix(".part")
        partial.write_text(response.text, encoding="utf-8")
        partial.replace(target)
    return folder


def assign_filtered(
    tracks: pd.DataFrame, lists: dict[str, list[str]]
) -> tuple[pd.DataFrame, dict[str, list[str]], int]:
    """track_id, genre, subset from the lists; the listed ids absent from `tracks`, per subset;
    and how many available tracks no list names (they are left out of the split)."""
    subset_of = {track: subset for subset, ids in lists.items() for track in ids}
    listed_twice = sorted(
        {track for subset, ids in lists.items() for track in ids if subset_of[track] != subset}
    )
    if listed_twice:
        raise LeakageError(f"tracks listed in two artist-filtered lists: {listed_twice}")
    available = set(tracks["track_id"])
    missing = {subset: sorted(set(ids) - available) for subset, ids in lists.items()}
    assigned = tracks[["track_id", "genre"]].copy()
    assigned["subset"] = assigned["track_id"].map(subset_of)
    unlisted = int(assigned["subset"].isna().sum())
    assigned = assigned.dropna(subset=["subset"])
    return assigned.sort_values("track_id").reset_index(drop=True), missing, unlisted


def leakage(
    assignments: pd.DataFrame,
    artists: pd.DataFrame | None,
    duplicates: pd.DataFrame | None = None,
) -> dict[str, list[str]]:
    """Songs (and artists, where known, and duplicate groups) found in more than one subset; a
    group is listed with its clips and their subsets."""
    sides = assignments.groupby("track_id")["subset"].nunique()
    found = {"tracks": sorted(sides[sides > 1].index)}
    if artists is not None:
        with_artist = assignments.merge(artists[["track_id", "artist"]], on="track_id")
        artist_sides = with_artist.groupby("artist")["subset"].nunique()
        found["artists"] = sorted(map(str, artist_sides[artist_sides > 1].index))
    if duplicates is not None:
        grouped = assignments.merge(duplicates[["track_id", GROUP_COLUMN]], on="track_id")
        found["duplicate_groups"] = []
        for group, members in grouped.groupby(GROUP_COLUMN, sort=True):
            if members["subset"].nunique() > 1:
                where = members.drop_duplicates(["track_id", "subset"])
                clips = ", ".join(f"{row.track_id} in {row.subset}" for row in where.itertuples())
                found["duplicate_groups"].append(f"{group} ({clips})")
    return found


def check_leakage(
    assignments: pd.DataFrame,
    strategy: Strategy,
    artists: pd.DataFrame | None,
    duplicates: pd.DataFrame | None = None,
) -> dict[str, Any]:
    """The leakage found; raises LeakageError if the strategy must not leak but does."""
    found = leakage(assignments, artists, duplicates)
    if not strategy.leaky and any(found.values()):
        offending = "; ".join(f"{kind}: {', '.join(ids)}" for kind, ids in found.items() if ids)
        raise LeakageError(
            f"the {strategy.label} split puts the same ids on several sides: {offending}"
        )
    return {f"{kind}_on_several_sides": len(ids) for kind, ids in found.items()}


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
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The assignments and summary for `stage` (params' `split` section)."""
    name = str(stage.get("strategy", "song_grouped"))
    if name not in STRATEGIES:
        raise ConfigError(f"split.strategy must be one of {sorted(STRATEGIES)}, got {name!r}")
    strategy = STRATEGIES[name]
    seed = int(stage.get("seed", 0))
    valid_size = float(stage.get("valid_size", 0.2))
    test_size = float(stage.get("test_size", 0.3))
    artists = read_artists(stage.get("artists_file"), root)
    duplicates_file = stage.get("duplicates_file")
    duplicates = read_groups(resolve_path(duplicates_file, root)) if duplicates_file else None
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
        filtered = stage.get("artist_filtered", {})
        level = str(filtered.get("level", "segment"))
        lists_dir = filtered.get("lists_dir")
        if lists_dir:
            folder = resolve_path(lists_dir, root)
        else:
            folder = download_filtered_lists(
                str(filtered["url"]),
                resolve_path(filtered.get("download_dir", "data/download/gtzan_splits"), root),
                float(filtered.get("timeout_s", 30)),
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
    stage = params.get("split", {})
    features = resolve_path(params.get("features", {}).get("output_dir", "data/features"), root)
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
    assignments, summary = make_split(clips, segments, stage, root)
    write_split(assignments, summary, resolve_path(stage.get("output_dir", "data/split"), root))
    return summary


def describe(summary: dict[str, Any]) -> str:
    sizes = ", ".join(f"{subset} {summary['sizes'][subset]['tracks']}" for subset in SUBSETS)
    return f"{summary['label']} split ({summary['level']} level): songs {sizes}"


def main(argv: list[str] | None = None) -> int:
    return stage_main("split", __doc__, run, argv, errors=(LeakageError,), describe=describe)
