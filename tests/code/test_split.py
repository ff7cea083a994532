"""The split stage: sizes, stratification, no leakage, determinism, the artist-filtered lists."""

from __future__ import annotations

import json
import shutil
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest
from live_services import GENRES, synthetic_feature_tables
from project_params import project_params

from gtzan_mlops.data import split_strategies, splits
from gtzan_mlops.data.gtzan.artist_filtered import download_filtered_lists, read_filtered_lists
from gtzan_mlops.data.split_strategies import make_split
from gtzan_mlops.data.splits import split_label
from gtzan_mlops.evaluation import test_data
from gtzan_mlops.settings.loading import ConfigError
from gtzan_mlops.settings.schema import Split
from gtzan_mlops.stages import split

SONGS_PER_GENRE = 10
# The strategies' sizes as params.yaml sets them, as written (changed, then validated, by tests).
SPLIT_SETTINGS = project_params(validate=False)["split"]


def _settings(**changes) -> Split:
    """params.yaml's `split` section with `changes` (artist_filtered: a mapping of its own
    changes), validated."""
    filtered = {**SPLIT_SETTINGS["artist_filtered"], **changes.pop("artist_filtered", {})}
    return Split.model_validate({**SPLIT_SETTINGS, **changes, "artist_filtered": filtered})


@pytest.fixture(scope="module")
def tables():
    clips, segments = synthetic_feature_tables(SONGS_PER_GENRE)
    return clips[["track_id", "genre"]], segments[["track_id", "segment", "genre"]]


def _split(tables, tmp_path, **stage):
    clips, segments = tables
    return make_split(clips, segments, _settings(**{"seed": 0, **stage}), tmp_path)


@pytest.mark.parametrize("strategy", ["clip_stratified", "song_grouped"])
def test_grouped_strategies_keep_songs_whole_and_stratify(tables, tmp_path, strategy):
    assignments, summary = _split(tables, tmp_path, strategy=strategy)
    assert summary["leaky"] is False and "leaky" not in summary["label"]
    assert summary["level"] == ("clip" if strategy == "clip_stratified" else "segment")
    assert summary["leakage"] == {"tracks_on_several_sides": 0}
    # 10 songs per genre: 3 test (30 %), then 20 % of the other 7 (1) valid, 6 train.
    counts = assignments.groupby(["genre", "subset"]).size().unstack()
    assert (counts["test"] == 3).all() and (counts["valid"] == 1).all()
    assert (counts["train"] == 6).all()
    assert assignments["track_id"].is_unique
    segments = splits.attach_subsets(tables[1], assignments)
    assert segments.groupby("track_id")["subset"].nunique().max() == 1


@pytest.mark.parametrize(
    ("test_size", "valid_size", "sides"),
    [
        (0.9, 0.2, {"test", "valid", "train"}),  # a large test share still leaves train and valid
        (0.9, 0.0, {"test", "train"}),
        (0.05, 0.2, {"test", "valid", "train"}),  # a tiny one still tests every genre
    ],
)
def test_every_genre_of_three_songs_is_on_every_side(test_size, valid_size, sides):
    units = pd.DataFrame(
        {"unit": [f"{genre}.{n}" for genre in "ab" for n in range(3)], "genre": list("aaabbb")}
    )
    subsets = split_strategies.stratified_assignment(units, valid_size, test_size, seed=0)
    for genre, rows in units.groupby("genre"):
        assert set(subsets[rows.index]) == sides, genre


def test_split_is_deterministic_and_follows_the_seed(tables, tmp_path):
    first, _ = _split(tables, tmp_path, strategy="song_grouped")
    again, _ = _split(tables, tmp_path, strategy="song_grouped")
    pd.testing.assert_frame_equal(first, again)
    other, _ = _split(tables, tmp_path, strategy="song_grouped", seed=1)
    assert not first["subset"].equals(other["subset"])


def test_random_segments_is_labelled_leaky_and_its_leak_is_measured(tables, tmp_path):
    assignments, summary = _split(tables, tmp_path, strategy="random_segments")
    assert summary["leaky"] is True
    assert split_label(summary) == "random-segments-leaky"
    assert list(assignments.columns) == ["track_id", "segment", "genre", "subset", "unit"]
    # Segments are assigned one by one, but a song's segments are still one unit of evidence.
    assert (assignments["unit"] == assignments["track_id"]).all()
    # Segments of most songs land on several sides: the reason this split is leaky.
    assert summary["leakage"]["tracks_on_several_sides"] > len(GENRES) * SONGS_PER_GENRE / 2
    with_subsets = splits.attach_subsets(tables[1], assignments)
    assert with_subsets["subset"].notna().all()
    # A clip table cannot be split by segment: no clip gets a subset.
    assert splits.attach_subsets(tables[0], assignments)["subset"].isna().all()


@pytest.mark.parametrize("strategy", ["clip_stratified", "song_grouped"])
def test_units_are_tracks_or_their_duplicate_group(tables, tmp_path, strategy):
    groups = pd.DataFrame(
        {"track_id": ["blues.00000", "blues.00001"], "duplicate_group": ["blues.00000"] * 2}
    )
    groups.to_csv(tmp_path / "duplicates.csv", index=False)
    clips, segments = tables
    assignments, _ = make_split(
        clips, segments, _settings(strategy=strategy), tmp_path, tmp_path / "duplicates.csv"
    )
    assert list(assignments.columns) == ["track_id", "genre", "subset", "unit"]
    unit = assignments.set_index("track_id")["unit"]
    assert unit["blues.00000"] == unit["blues.00001"] == "blues.00000"
    alone = assignments[~assignments["track_id"].isin(groups["track_id"])]
    assert (alone["unit"] == alone["track_id"]).all()
    assert assignments["unit"].nunique() == len(assignments) - 1


def test_unit_of_track_without_the_column_is_the_track(tables, tmp_path):
    assignments, _ = _split(tables, tmp_path, strategy="song_grouped")
    units = splits.unit_of_track(assignments.drop(columns="unit"))
    assert units == {track: track for track in assignments["track_id"]}
    # An older split file, without the column: the test data's units are its tracks.
    held_out = test_data.TestData({}, "", assignments=assignments.drop(columns="unit"))
    assert held_out.units == units
    assert test_data.TestData({}, "").units == {}


def test_artist_filtered_units_follow_artists_and_duplicates(tables, tmp_path):
    clips, _ = tables
    lists_dir = tmp_path / "lists"
    lists_dir.mkdir()
    tracks = clips["track_id"].tolist()
    for number, subset in enumerate(splits.SUBSETS):
        entries = [f"{track.split('.')[0]}/{track}.wav" for track in tracks[number::3]]
        (lists_dir / f"{subset}_filtered.txt").write_text("\n".join(entries) + "\n")
    # blues.00000 and blues.00003 share an artist (both in train); 00001 duplicates 00004 (valid).
    pd.DataFrame(
        {"track_id": ["blues.00000", "blues.00003"], "artist": ["Someone", "Someone"]}
    ).to_csv(tmp_path / "artists.csv", index=False)
    pd.DataFrame(
        {"track_id": ["blues.00001", "blues.00004"], "duplicate_group": ["g1", "g1"]}
    ).to_csv(tmp_path / "duplicates.csv", index=False)
    stage = _settings(
        strategy="artist_filtered",
        artists_file=str(tmp_path / "artists.csv"),
        artist_filtered={"lists_dir": str(lists_dir)},
    )
    assignments, _ = make_split(clips, pd.DataFrame(), stage, tmp_path, tmp_path / "duplicates.csv")
    unit = assignments.set_index("track_id")["unit"]
    assert unit["blues.00000"] == unit["blues.00003"] == "artist:Someone"
    assert unit["blues.00001"] == unit["blues.00004"] == "g1"
    assert unit["blues.00002"] == "blues.00002"


def test_leakage_check_fails_a_non_leaky_split_with_the_ids(tables, tmp_path):
    assignments, _ = _split(tables, tmp_path, strategy="song_grouped")
    leaked = pd.concat([assignments, assignments.head(2).assign(subset="test")])
    leaked = leaked.drop_duplicates()
    strategy = split_strategies.STRATEGIES["song_grouped"]
    with pytest.raises(split_strategies.LeakageError, match=r"tracks: blues\.00000"):
        split_strategies.check_leakage(leaked, strategy, None)
    # The same duplication is only counted for the leaky protocol.
    counted = split_strategies.check_leakage(
        leaked, split_strategies.STRATEGIES["random_segments"], None
    )
    assert counted["tracks_on_several_sides"] >= 1


def test_artists_stay_on_one_side_and_are_checked(tables, tmp_path):
    clips = tables[0]
    # Synthetic artists: three consecutive songs of a genre share one.
    artists = clips.assign(artist=clips["genre"] + "-artist-" + (clips.index % 10 // 3).astype(str))
    artists[["track_id", "artist"]].to_csv(tmp_path / "artists.csv", index=False)
    assignments, summary = _split(
        tables, tmp_path, strategy="song_grouped", artists_file=str(tmp_path / "artists.csv")
    )
    merged = assignments.merge(artists[["track_id", "artist"]], on="track_id")
    assert merged.groupby("artist")["subset"].nunique().max() == 1
    # An artist's songs are one unit, named after the artist.
    assert (merged.groupby("artist")["unit"].nunique() == 1).all()
    assert (merged["unit"] == "artist:" + merged["artist"]).all()
    assert summary["leakage"] == {"tracks_on_several_sides": 0, "artists_on_several_sides": 0}

    moved = assignments.copy()
    first_artist_tracks = merged.loc[merged["artist"] == "blues-artist-0", "track_id"]
    moved.loc[moved["track_id"] == first_artist_tracks.iloc[0], "subset"] = "test"
    moved.loc[moved["track_id"] == first_artist_tracks.iloc[1], "subset"] = "train"
    with pytest.raises(split_strategies.LeakageError, match="artists: blues-artist-0"):
        split_strategies.check_leakage(
            moved, split_strategies.STRATEGIES["song_grouped"], artists[["track_id", "artist"]]
        )


def test_artist_filtered_lists_on_the_real_clips(gtzan_mini, shared_dir, tmp_path):
    """The 70 real clips against the 443/197/290 lists: found clips keep their list's subset, the
    listed clips without audio are reported per subset."""
    tracks = pd.DataFrame(
        [(path.stem, path.parent.name) for path in sorted(gtzan_mini.glob("genres/*/*.wav"))],
        columns=["track_id", "genre"],
    )
    lists_dir = shared_dir / "data" / "gtzan_splits"
    lists = read_filtered_lists(lists_dir)
    assert [len(lists[subset]) for subset in splits.SUBSETS] == [443, 197, 290]

    assignments, summary = make_split(
        tracks,
        pd.DataFrame(columns=["track_id", "segment", "genre"]),
        _settings(strategy="artist_filtered", artist_filtered={"lists_dir": str(lists_dir)}),
        tmp_path,
    )
    assert summary["label"] == "artist-filtered" and summary["leaky"] is False
    listed = {track: subset for subset, ids in lists.items() for track in ids}
    assert all(
        listed[t] == s for t, s in zip(assignments.track_id, assignments.subset, strict=True)
    )
    found = len(assignments)
    missing = summary["missing_from_audio"]
    assert sum(map(len, missing.values())) == 930 - found
    assert summary["available_but_unlisted"] == 70 - found
    assert set(missing["test"]).isdisjoint(tracks["track_id"])


def _serve_folder(folder: Path) -> tuple[ThreadingHTTPServer, str]:
    handler = partial(SimpleHTTPRequestHandler, directory=str(folder))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def test_artist_filtered_lists_are_downloaded_when_no_folder_is_given(shared_dir, tmp_path):
    lists_dir = shared_dir / "data" / "gtzan_splits"
    published = SPLIT_SETTINGS["artist_filtered"]["sha256"]
    server, url = _serve_folder(lists_dir)
    try:
        folder = download_filtered_lists(url, tmp_path / "lists", timeout_s=10, sha256=published)
        assert read_filtered_lists(folder) == read_filtered_lists(lists_dir)
        with pytest.raises(ConfigError, match="could not download"):
            download_filtered_lists(
                f"{url}/nowhere", tmp_path / "other", timeout_s=10, sha256=published
            )
    finally:
        server.shutdown()


def test_lists_that_differ_from_the_published_ones_are_refused(shared_dir, tmp_path):
    published = SPLIT_SETTINGS["artist_filtered"]["sha256"]
    altered = tmp_path / "served"
    shutil.copytree(shared_dir / "data" / "gtzan_splits", altered)
    with (altered / "test_filtered.txt").open("a") as listing:
        listing.write("blues/blues.00000.wav\n")  # one more test clip than published
    server, url = _serve_folder(altered)
    try:
        with pytest.raises(ConfigError, match=r"test_filtered.txt: sha256 [0-9a-f]{64} is not"):
            download_filtered_lists(url, tmp_path / "lists", timeout_s=10, sha256=published)
        assert not (tmp_path / "lists" / "test_filtered.txt").exists()  # nothing kept
        # Lists of one's own: no check.
        download_filtered_lists(url, tmp_path / "own", timeout_s=10, sha256=None)
    finally:
        server.shutdown()
    # An earlier download changed on disk is refused too, before it is used.
    with pytest.raises(ConfigError, match="delete it to download it again"):
        download_filtered_lists(
            "http://127.0.0.1:9", tmp_path / "own", timeout_s=10, sha256=published
        )


def test_stage_writes_files_and_rejects_unknown_strategy(tables, tmp_path):
    clips, segments = synthetic_feature_tables(4)
    features = tmp_path / "data" / "features"
    features.mkdir(parents=True)
    clips.to_csv(features / "features_30_sec.csv", index=False)
    segments.to_csv(features / "features_3_sec.csv", index=False)
    summary = split.run(
        project_params({"split.strategy": "song_grouped", "split.group_duplicates": False}),
        tmp_path,
    )
    assignments, written = splits.load_split(tmp_path / "data" / "split")
    assert written == json.loads(json.dumps(summary))
    assert len(assignments) == len(clips)
    assert list(assignments.columns) == ["track_id", "genre", "subset", "unit"]
    assert splits.unit_of_track(assignments) == {t: t for t in clips["track_id"]}
    # Four songs per genre: every subset still gets one of each genre.
    assert all(len(summary["sizes"][subset]["genres"]) == len(GENRES) for subset in splits.SUBSETS)
    # An unknown strategy is refused by the settings' schema, before the stage runs.
    with pytest.raises(ConfigError, match=r"split\.strategy: Input should be 'clip_stratified'"):
        project_params({"split.strategy": "by_mood"})
