"""The evaluation protocols of the reproduction report (`gtzan-mlops report`, whose models
models/reproduction.py trains and scores): the feature tables read and normalised, and each
protocol's train/test folds with the names and notes the report prints.

A protocol is a way to split the same rows: `clip_stratified` (whole clips, stratified by genre),
`artist_filtered` (the fixed lists of Kereliuk, Sturm and Larsen), `random_segments` (LEAKY: 3 s
segments at random, so one song sits on both sides) and `song_grouped` (3 s segments, whole songs
on one side). The splitting itself is split_strategies', the same code as the split stage's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from gtzan_mlops.data import split_strategies, splits
from gtzan_mlops.data.gtzan import artist_filtered as filtered_lists
from gtzan_mlops.data.gtzan.names import track_id_of_list_entry
from gtzan_mlops.features.handcrafted import feature_names
from gtzan_mlops.settings.loading import ConfigError, resolve_path
from gtzan_mlops.settings.schema import ArtistFiltered, Settings

PROTOCOLS = ("clip_stratified", "artist_filtered", "random_segments", "song_grouped")


@dataclass(frozen=True)
class ProtocolInputs:
    """What the protocols read and how they split, from the validated settings: the report's
    tables and lists with their paths resolved, its seeds (each once), the genres and the
    number of MFCCs of the tables."""

    reference_table: Path
    segments_table: Path
    lists_dir: Path | None  # report.lists_dir; None: those of split.artist_filtered
    artist_filtered: ArtistFiltered  # its lists_dir, or where its lists download from
    root: Path  # what the paths of artist_filtered are relative to
    seeds: tuple[int, ...]
    test_size: float
    classes: tuple[str, ...]
    n_mfcc: int

    @classmethod
    def of(cls, settings: Settings, root: Path) -> ProtocolInputs:
        """The `report` section's (null tables: the features stage's, paths.features; null
        lists: split.artist_filtered's). Paths relative to `root` unless absolute."""
        report, features = settings.report, settings.paths.features
        return cls(
            reference_table=resolve_path(
                report.reference_table or f"{features}/features_30_sec.csv", root
            ),
            segments_table=resolve_path(
                report.segments_table or f"{features}/features_3_sec.csv", root
            ),
            lists_dir=resolve_path(report.lists_dir, root) if report.lists_dir else None,
            artist_filtered=settings.split.artist_filtered,
            root=root,
            seeds=tuple(dict.fromkeys(report.seeds)),
            test_size=report.test_size,
            classes=tuple(settings.genres),
            n_mfcc=settings.features.n_mfcc,
        )


def normalise_table(
    table: pd.DataFrame, path: Path, level: str, classes: Sequence[str], n_mfcc: int
) -> pd.DataFrame:
    """`table` as track_id[, segment], genre and the features, sorted (so row order in the file
    does not matter). Takes this project's tables (track_id, [segment,] genre) and the public
    reference tables (`filename` like blues.00000.au or blues.00000.3.wav, `label`)."""
    table = table.copy()
    if "genre" not in table.columns and "label" in table.columns:
        table = table.rename(columns={"label": "genre"})
    if "track_id" not in table.columns and "filename" in table.columns:
        stems = table["filename"].astype(str).map(track_id_of_list_entry)
        if level == "segment" and "segment" not in table.columns:
            parts = stems.str.rsplit(".", n=1, expand=True)
            if parts.shape[1] != 2 or not parts[1].str.isdigit().all():
                raise ConfigError(f"{path}: segment filenames must look like blues.00000.3.wav")
            table["track_id"], table["segment"] = parts[0], parts[1].astype(int)
        else:
            table["track_id"] = stems
    keys = ["track_id", "segment"] if level == "segment" else ["track_id"]
    columns = list(feature_names(n_mfcc))
    absent = [name for name in [*keys, "genre", *columns] if name not in table.columns]
    if absent:
        raise ConfigError(f"{path}: lacks the columns {absent[:4]}")
    table["track_id"] = table["track_id"].astype(str)
    table["genre"] = table["genre"].astype(str)
    unknown = sorted(set(table["genre"]) - set(classes))
    if unknown:
        raise ConfigError(f"{path}: genres {unknown} are not in params genres")
    if table.duplicated(keys).any():
        raise ConfigError(f"{path}: repeated {'/'.join(keys)} values")
    return table[[*keys, "genre", *columns]].sort_values(keys).reset_index(drop=True)


@dataclass(frozen=True)
class Fold:
    """One train/test division of a protocol; `seed` seeds the model (and drew the split)."""

    seed: int
    train: pd.DataFrame
    test: pd.DataFrame


@dataclass
class ProtocolData:
    """The folds of one protocol and how to name it in the report."""

    protocol: str
    level: str  # clip or segment: what the models train on
    data: str  # the table, e.g. "30 s, 1000 clips"
    header: str  # the markdown column header
    folds: list[Fold]
    notes: list[str] = field(default_factory=list)


def _subset_rows(table: pd.DataFrame, assignments: pd.DataFrame, seed: int, train: set) -> Fold:
    rows = splits.attach_subsets(table, assignments)
    chosen = rows["subset"].isin(train)
    tested = rows["subset"] == "test"
    columns = list(table.columns)
    return Fold(
        seed,
        rows.loc[chosen, columns].reset_index(drop=True),
        rows.loc[tested, columns].reset_index(drop=True),
    )


def ratio(test_size: float) -> str:
    """0.3 -> "70/30"."""
    test = round(100 * test_size)
    return f"{100 - test}/{test}"


def clip_stratified(clips: pd.DataFrame, settings: ProtocolInputs) -> ProtocolData:
    folds = []
    for seed in settings.seeds:
        assignments = split_strategies.assign_groups(clips, 0.0, settings.test_size, seed, None)
        folds.append(_subset_rows(clips, assignments, seed, {"train"}))
    return ProtocolData(
        "clip_stratified",
        "clip",
        f"30 s, {len(clips)} clips",
        f"clip-stratified {ratio(settings.test_size)}, 30 s, {len(clips)} clips",
        folds,
    )


def artist_lists(settings: ProtocolInputs) -> tuple[dict[str, list[str]], str]:
    """The artist-filtered lists (track ids per subset) and where they came from: report's
    lists_dir, else split.artist_filtered's (its lists_dir, or its download)."""
    folder = settings.lists_dir
    if folder is None:
        lists = settings.artist_filtered
        if not lists.lists_dir and not lists.url:
            raise ConfigError("no artist-filtered lists: set report.lists_dir")
        folder = filtered_lists.lists_folder(lists, settings.root)
    return filtered_lists.read_filtered_lists(folder), str(folder)


def artist_filtered(
    clips: pd.DataFrame, lists: dict[str, list[str]], settings: ProtocolInputs
) -> ProtocolData:
    """Train on the train + valid lists, test on the test list; the clips the table lacks, and
    the table's clips no list names, are counted in the notes."""
    assignments, missing, unlisted = split_strategies.assign_filtered(clips, lists)
    if assignments.empty:
        raise ConfigError(
            f"none of the {len(clips)} clips of the reference table is named in the "
            "artist-filtered lists (is the table GTZAN?)"
        )
    listed = {subset: len(ids) for subset, ids in lists.items()}
    found = {subset: int((assignments["subset"] == subset).sum()) for subset in splits.SUBSETS}
    folds = [_subset_rows(clips, assignments, seed, {"train", "valid"}) for seed in settings.seeds]
    n_found = sum(found.values())
    notes = [
        "artist-filtered lists: "
        + ", ".join(f"{subset} {found[subset]} of {listed[subset]}" for subset in splits.SUBSETS)
        + f" listed clips found in the reference table ({n_found} of {sum(listed.values())});"
        + f" {unlisted} clips of the table are in no list and left out"
    ]
    n_missing = sum(map(len, missing.values()))
    if n_missing:
        shown = [track for subset in splits.SUBSETS for track in missing[subset]][:10]
        notes.append(
            f"{n_missing} listed clips are not in the reference table: {', '.join(shown)}"
            + (" ..." if n_missing > len(shown) else "")
        )
    n_train = found["train"] + found["valid"]
    return ProtocolData(
        "artist_filtered",
        "clip",
        f"30 s, {n_found} listed clips of {len(clips)}",
        f"artist-filtered (train+valid {n_train} / test {found['test']}), 30 s, "
        f"{n_found} listed clips",
        folds,
        notes,
    )


def segment_description(segments: pd.DataFrame) -> str:
    return f"3 s, {segments['track_id'].nunique()} clips ({len(segments)} segments)"


def random_segments(segments: pd.DataFrame, settings: ProtocolInputs) -> ProtocolData:
    folds = []
    for seed in settings.seeds:
        assignments = split_strategies.assign_segments(segments, 0.0, settings.test_size, seed)
        folds.append(_subset_rows(segments, assignments, seed, {"train"}))
    clips = segments["track_id"].nunique()
    shared = [len(set(fold.test["track_id"]) & set(fold.train["track_id"])) for fold in folds]
    tested = [fold.test["track_id"].nunique() for fold in folds]
    return ProtocolData(
        "random_segments",
        "segment",
        segment_description(segments),
        f"random segments {ratio(settings.test_size)} (LEAKY), 3 s, {clips} clips",
        folds,
        [
            "random segments (LEAKY): songs with test segments that also have segments in "
            "training, per seed: "
            + ", ".join(
                f"seed {fold.seed}: {common} of {total}"
                for fold, common, total in zip(folds, shared, tested, strict=True)
            )
        ],
    )


def _spread(values: list[int]) -> str:
    """[20, 20] -> "20"; [19, 21] -> "19-21"."""
    return str(min(values)) if min(values) == max(values) else f"{min(values)}-{max(values)}"


def song_grouped(segments: pd.DataFrame, settings: ProtocolInputs) -> ProtocolData:
    tracks = segments.groupby("track_id", sort=True)["genre"].first().reset_index()
    folds = []
    for seed in settings.seeds:
        assignments = split_strategies.assign_groups(tracks, 0.0, settings.test_size, seed, None)
        folds.append(_subset_rows(segments, assignments, seed, {"train"}))
    songs = [fold.test["track_id"].nunique() for fold in folds]
    rows = [len(fold.test) for fold in folds]
    return ProtocolData(
        "song_grouped",
        "segment",
        segment_description(segments),
        f"song-grouped {ratio(settings.test_size)}, 3 s, {len(tracks)} clips",
        folds,
        [
            f"song-grouped: {_spread(songs)} test songs ({_spread(rows)} segments) per seed, "
            "none of them in training; the song vote is scored on these songs"
        ],
    )


def prepare(settings: ProtocolInputs) -> tuple[list[ProtocolData], dict[str, str], dict]:
    """The protocols that can run, the reasons the others cannot, and the tables' sizes."""
    prepared: list[ProtocolData] = []
    skipped: dict[str, str] = {}
    sizes: dict[str, Any] = {}

    if settings.reference_table.is_file():
        clips = normalise_table(
            pd.read_csv(settings.reference_table),
            settings.reference_table,
            "clip",
            settings.classes,
            settings.n_mfcc,
        )
        sizes["clips"] = len(clips)
        prepared.append(clip_stratified(clips, settings))
        try:
            lists, source = artist_lists(settings)
            sizes["lists_source"] = source
            prepared.append(artist_filtered(clips, lists, settings))
        except ConfigError as error:
            skipped["artist_filtered"] = str(error)
    else:
        reason = f"no reference table at {settings.reference_table} (set report.reference_table)"
        skipped["clip_stratified"] = skipped["artist_filtered"] = reason

    if settings.segments_table.is_file():
        segments = normalise_table(
            pd.read_csv(settings.segments_table),
            settings.segments_table,
            "segment",
            settings.classes,
            settings.n_mfcc,
        )
        sizes["segment_clips"] = int(segments["track_id"].nunique())
        sizes["segments"] = len(segments)
        prepared += [random_segments(segments, settings), song_grouped(segments, settings)]
    else:
        reason = (
            f"no segment table at {settings.segments_table} (run the features stage or set "
            "report.segments_table)"
        )
        skipped["random_segments"] = skipped["song_grouped"] = reason

    # A protocol whose training rows lack a genre cannot train any family.
    usable = []
    for protocol in prepared:
        lacking = sorted(
            {
                genre
                for fold in protocol.folds
                for genre in set(settings.classes) - set(fold.train["genre"])
            }
        )
        if lacking:
            skipped[protocol.protocol] = f"its training rows lack the genres {lacking}"
        elif any(fold.test.empty for fold in protocol.folds):
            skipped[protocol.protocol] = "its test set is empty"
        else:
            usable.append(protocol)
    return usable, {name: skipped[name] for name in PROTOCOLS if name in skipped}, sizes
