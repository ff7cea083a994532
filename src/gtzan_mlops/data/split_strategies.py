"""How a split assigns clips (or segments) to train, valid and test, and how leakage is found:
the strategies of the split stage, also used by the reproduction report's protocols
(protocols.py).

Each strategy has a label that says what it is (`random-segments-leaky` for the one that leaks);
the stratified ones keep a song, its artist's songs and its duplicates on one side.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gtzan_mlops.data.splits import GROUP_COLUMN, SUBSETS, connected_components
from gtzan_mlops.settings.loading import ConfigError

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


def download_filtered_lists(
    base_url: str, folder: Path, timeout_s: float, sha256: dict[str, str] | None
) -> Path:
    """Fetch the three list files from `base_url` into `folder` (once); returns `folder`. With
    `sha256` (file name -> digest), a download or an earlier one whose content differs is
    refused: the lists decide which clips are test clips."""
    import requests

    folder.mkdir(parents=True, exist_ok=True)
    for name in LIST_FILES.values():
        target = folder / name
        url = f"{base_url.rstrip('/')}/{name}"
        if target.is_file():
            _check_digest(target.read_bytes(), sha256, name, str(target))
            continue
        try:
            response = requests.get(url, timeout=timeout_s)
            response.raise_for_status()
        except requests.RequestException as error:
            raise ConfigError(
                f"{url}: could not download the artist-filtered list ({error}); download "
                f"train/valid/test_filtered.txt by hand and set split.artist_filtered.lists_dir"
            ) from error
        _check_digest(response.content, sha256, name, url)
        partial = target.with_suffix(".part")
        partial.write_bytes(response.content)
        partial.replace(target)
    return folder


def _check_digest(content: bytes, sha256: dict[str, str] | None, name: str, where: str) -> None:
    if sha256 is None:
        return
    found = hashlib.sha256(content).hexdigest()
    if found != sha256[name]:
        raise ConfigError(
            f"{where}: sha256 {found} is not the published list's {sha256[name]} "
            "(split.artist_filtered.sha256); delete it to download it again, or set sha256 to "
            "null to use lists of your own"
        )


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
