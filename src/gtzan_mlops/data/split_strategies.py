"""How a split assigns clips (or segments) to train, valid and test, and how leakage is found:
the strategies of the split stage (`make_split`), also used by the reproduction report's
protocols (protocols.py).

Each strategy has a label that says what it is (`random-segments-leaky` for the one that leaks);
the stratified ones keep a song, its artist's songs and its duplicates on one side.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gtzan_mlops.data.gtzan.artist_filtered import filtered_lists
from gtzan_mlops.data.splits import GROUP_COLUMN, SUBSETS, connected_components, read_groups
from gtzan_mlops.settings.loading import ConfigError, resolve_path
from gtzan_mlops.settings.schema import Split

log = logging.getLogger(__name__)


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
    """track_id, genre, subset, unit: whole songs (with their artist's songs and their
    duplicates) per subset, stratified by genre; `unit` names what was kept together (the
    clusters of the bootstrap intervals and of the selection folds)."""
    units = tracks[["track_id", "genre"]].copy()
    units["unit"] = group_of_tracks(tracks, artists, duplicates).to_numpy()
    # A group spanning several genres is stratified under its most frequent one.
    per_unit = units.groupby("unit")["genre"].agg(lambda genres: genres.mode().iloc[0])
    unit_table = per_unit.reset_index()
    unit_table["subset"] = stratified_assignment(unit_table, valid_size, test_size, seed)
    units["subset"] = units["unit"].map(unit_table.set_index("unit")["subset"])
    columns = ["track_id", "genre", "subset", "unit"]
    return units[columns].sort_values("track_id").reset_index(drop=True)


def assign_segments(
    segments: pd.DataFrame, valid_size: float, test_size: float, seed: int
) -> pd.DataFrame:
    """track_id, segment, genre, subset, unit: every segment on its own (the leaky protocol).
    The unit is still the track: its segments are not independent, whatever side they land on."""
    units = segments[["track_id", "segment", "genre"]].copy()
    units["unit"] = units["track_id"] + "#" + units["segment"].astype(str)
    units["subset"] = stratified_assignment(units, valid_size, test_size, seed)
    units["unit"] = units["track_id"].astype(str)
    columns = ["track_id", "segment", "genre", "subset", "unit"]
    return units[columns].sort_values(["track_id", "segment"]).reset_index(drop=True)


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


def read_artists(path: str | None, root: Path) -> pd.DataFrame | None:
    """track_id, artist of `split.artists_file` (None when it is not set)."""
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
    settings: Split,
    root: Path,
    duplicates_table: Path | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The assignments and summary of the strategy `settings` (params `split`) names, keeping
    the groups of `duplicates_table` (the duplicates stage's output) on one side when given;
    LeakageError if a strategy that must not leak does."""
    strategy = STRATEGIES[settings.strategy]
    seed, valid_size, test_size = settings.seed, settings.valid_size, settings.test_size
    artists = read_artists(settings.artists_file, root)
    duplicates = read_groups(duplicates_table) if duplicates_table else None
    extra: dict[str, Any] = {
        "duplicate_groups": (
            int(duplicates[GROUP_COLUMN].nunique()) if duplicates is not None else "not checked"
        )
    }

    if strategy.name == "clip_stratified":
        level = "clip"
        assignments = assign_groups(clips, valid_size, test_size, seed, artists, duplicates)
    elif strategy.name == "song_grouped":
        level = "segment"
        assignments = assign_groups(clips, valid_size, test_size, seed, artists, duplicates)
    elif strategy.name == "random_segments":
        level = "segment"
        assignments = assign_segments(segments, valid_size, test_size, seed)
    else:
        level = settings.artist_filtered.level
        lists = filtered_lists(settings.artist_filtered, root)
        assignments, missing, unlisted = assign_filtered(clips, lists)
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

    summary = summarise(assignments, strategy, level, seed)
    summary["leakage"] = check_leakage(assignments, strategy, artists, duplicates)
    summary.update(extra)
    return assignments, summary
