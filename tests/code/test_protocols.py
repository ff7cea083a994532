"""The report's protocols: tables normalised from either naming, and folds that keep (or, for
the leaky one, do not keep) songs apart, on small synthetic tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gtzan_mlops.evaluation import protocols
from gtzan_mlops.features.handcrafted import FEATURE_NAMES
from gtzan_mlops.settings.loading import ConfigError
from gtzan_mlops.settings.schema import ArtistFiltered

GENRES = ["blues", "rock"]


def _settings(tmp_path: Path, seeds: tuple[int, ...] = (0, 1)) -> protocols.ProtocolInputs:
    no_lists = ArtistFiltered(
        level="segment",
        lists_dir=None,
        url="",
        download_dir=str(tmp_path / "lists"),
        timeout_s=1.0,
        sha256=None,
    )
    return protocols.ProtocolInputs(
        reference_table=tmp_path / "features_30_sec.csv",
        segments_table=tmp_path / "features_3_sec.csv",
        lists_dir=None,
        artist_filtered=no_lists,
        root=tmp_path,
        seeds=seeds,
        test_size=0.3,
        classes=tuple(GENRES),
        n_mfcc=20,
    )


def synthetic_reference_table(songs: int = 10) -> pd.DataFrame:
    """The public table's naming: `filename` blues.00000.au and `label`."""
    rng = np.random.default_rng(0)
    rows = [
        {
            "filename": f"{genre}.{song:05d}.au",
            "label": genre,
            **dict(zip(FEATURE_NAMES, rng.normal(size=len(FEATURE_NAMES)), strict=True)),
        }
        for genre in GENRES
        for song in range(songs)
    ]
    return pd.DataFrame(rows)


def synthetic_segment_table(songs: int = 10, segments: int = 4) -> pd.DataFrame:
    """The public 3 s naming: `filename` blues.00000.3.wav."""
    table = synthetic_reference_table(songs)
    rows = []
    for _, clip in table.iterrows():
        stem = clip["filename"].removesuffix(".au")
        for segment in range(segments):
            rows.append({**clip.to_dict(), "filename": f"{stem}.{segment}.wav"})
    return pd.DataFrame(rows)


def test_reference_naming_becomes_track_ids_sorted(tmp_path):
    table = synthetic_reference_table().sample(frac=1.0, random_state=0)
    clips = protocols.normalise_table(table, Path("t.csv"), "clip", GENRES, 20)
    assert clips.columns[:2].tolist() == ["track_id", "genre"]
    assert clips["track_id"].tolist() == sorted(clips["track_id"])
    assert clips["track_id"].iloc[0] == "blues.00000"


def test_segment_naming_becomes_track_and_segment(tmp_path):
    segments = protocols.normalise_table(
        synthetic_segment_table(songs=2, segments=3), Path("s.csv"), "segment", GENRES, 20
    )
    assert segments[["track_id", "segment"]].iloc[:3].values.tolist() == [
        ["blues.00000", 0],
        ["blues.00000", 1],
        ["blues.00000", 2],
    ]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda table: table.drop(columns=["mfcc20_var"]), "lacks the columns"),
        (lambda table: table.assign(label="polka"), "are not in params genres"),
        (lambda table: pd.concat([table, table.iloc[:1]]), "repeated track_id"),
    ],
)
def test_bad_tables_are_named_with_the_problem(change, message):
    with pytest.raises(ConfigError, match=rf"bad\.csv: .*{message}"):
        protocols.normalise_table(
            change(synthetic_reference_table()), Path("bad.csv"), "clip", GENRES, 20
        )


def test_song_grouped_keeps_songs_apart_and_random_segments_does_not(tmp_path):
    settings = _settings(tmp_path)
    segments = protocols.normalise_table(
        synthetic_segment_table(), Path("s.csv"), "segment", settings.classes, settings.n_mfcc
    )
    grouped = protocols.song_grouped(segments, settings)
    leaky = protocols.random_segments(segments, settings)
    assert [fold.seed for fold in grouped.folds] == [0, 1]
    for fold in grouped.folds:
        assert not set(fold.train["track_id"]) & set(fold.test["track_id"])
        assert len(fold.train) + len(fold.test) == len(segments)
    shared = [len(set(f.train["track_id"]) & set(f.test["track_id"])) for f in leaky.folds]
    assert all(count > 0 for count in shared)
    assert "LEAKY" in leaky.header and "LEAKY" in leaky.notes[0]


def test_prepare_skips_what_is_missing_with_its_reason(tmp_path):
    settings = _settings(tmp_path)
    synthetic_segment_table().to_csv(settings.segments_table, index=False)
    usable, skipped, sizes = protocols.prepare(settings)
    assert [protocol.protocol for protocol in usable] == ["random_segments", "song_grouped"]
    assert list(skipped) == ["clip_stratified", "artist_filtered"]
    assert str(settings.reference_table) in skipped["clip_stratified"]
    assert sizes == {"segment_clips": 20, "segments": 80}
