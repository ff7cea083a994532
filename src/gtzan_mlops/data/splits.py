"""The data of a split: which feature rows train, validate and test, and the hashes that say
which version of the tables and the split they are.

Train reads every subset, evaluate and promote the test subset, through the same
`split_rows`: the feature tables of a feature set at a level, joined to the split's assignments.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from gtzan_mlops import tracking
from gtzan_mlops.settings.loading import ConfigError, resolve_path
from gtzan_mlops.settings.schema import Settings

SUBSETS = ("train", "valid", "test")
TEST_SUBSET = "test"  # the held-out subset: it chooses nothing, it is only scored
SPLIT_FILE = "split.csv"  # in the split stage's folder: track (and segment) -> subset, unit
UNIT_COLUMN = "unit"  # of SPLIT_FILE: what the split keeps on one side (track, group, artist)
SUMMARY_FILE = "summary.json"  # beside it: strategy, label, leaky, sizes, leakage check
GROUP_COLUMN = "duplicate_group"  # of the duplicates stage's clip table


def load_split(folder: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The assignments and summary the split stage wrote to `folder`."""
    try:
        # Ids are names: an all-digit one must not turn into a number.
        assignments = pd.read_csv(folder / SPLIT_FILE, dtype={"track_id": str, UNIT_COLUMN: str})
        summary = json.loads((folder / SUMMARY_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{error.filename}: no such file (run the split stage)") from error
    return assignments, summary


def attach_subsets(table: pd.DataFrame, assignments: pd.DataFrame) -> pd.DataFrame:
    """`table` with a `subset` column: by song, or by (song, segment) for a segment split.

    Rows the split does not assign (a clip table under a segment split, clips outside the
    artist-filtered lists) get an empty subset and are used nowhere.
    """
    keys = ["track_id", "segment"] if "segment" in assignments.columns else ["track_id"]
    if not set(keys) <= set(table.columns):
        return table.assign(subset=pd.Series(pd.NA, index=table.index, dtype=object))
    merged = table.merge(assignments[[*keys, "subset"]], on=keys, how="left", validate="m:1")
    return merged


def unit_of_track(assignments: pd.DataFrame) -> dict[str, str]:
    """Each assigned track's unit: the cluster that bootstrap intervals resample and selection
    folds keep together. A split written before the unit column existed: every track its own."""
    tracks = assignments["track_id"].astype(str)
    if UNIT_COLUMN not in assignments.columns:
        return {track: track for track in tracks}
    return dict(zip(tracks, assignments[UNIT_COLUMN].astype(str), strict=True))


def read_groups(path: Path) -> pd.DataFrame:
    """track_id, duplicate_group of the clips that have duplicates (the split stage's input)."""
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file (run the duplicates stage)") from None
    if not {"track_id", GROUP_COLUMN} <= set(table.columns):
        raise ConfigError(f"{path}: needs the columns track_id and {GROUP_COLUMN}")
    return table.loc[table[GROUP_COLUMN] != "", ["track_id", GROUP_COLUMN]]


def split_label(summary: dict[str, Any]) -> str:
    """The split's label as reported next to every number; a leaky split always says so."""
    label = str(summary.get("label") or summary.get("strategy") or "unnamed-split")
    if summary.get("leaky") and "leaky" not in label.lower():
        label = f"{label}-leaky"
    return label


def feature_dir(settings: Settings, root: Path) -> Path:
    """The folder of the features stage's tables (paths.features)."""
    return resolve_path(settings.paths.features, root)


def split_dir(settings: Settings, root: Path) -> Path:
    """The folder of the split stage's assignments and summary (paths.split)."""
    return resolve_path(settings.paths.split, root)


def split_fingerprint(folder: Path) -> str:
    """sha256 of the split assignment file (the same file the training records hash)."""
    return tracking.file_digest(folder / SPLIT_FILE)


def connected_components(items: Iterable[str], links: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Each item (and each end of a link) mapped to its component, named by its smallest member:
    what keeps linked tracks (copies, an artist's songs) on one side of a split."""
    parent = {item: item for item in items}

    def root(item: str) -> str:
        parent.setdefault(item, item)
        while parent[item] != item:
            parent[item] = parent[parent[item]]
            item = parent[item]
        return item

    for first, second in links:
        a, b = root(first), root(second)
        if a != b:
            parent[max(a, b)] = min(a, b)
    return {item: root(item) for item in list(parent)}
