"""Duplicate groups: copies of a real clip, however made, are found and kept on one side."""

from __future__ import annotations

import shutil
from pathlib import Path

import librosa
import numpy as np
import pandas as pd
import pytest
import soundfile

from gtzan_mlops.data import duplicates, split_strategies, splits
from gtzan_mlops.data.manifest import ManifestGates, build_manifest
from gtzan_mlops.settings.loading import load_settings
from gtzan_mlops.stages import duplicates as duplicates_stage

PATHS = load_settings(Path(__file__).resolve().parents[2] / "params.yaml").paths
ORIGINAL = "blues.00000"
COPIES = {
    "blues.90000": "FLAC copy under another name",
    "blues.90001": "re-encoded at 16 kHz, gain -6 dB",
    "blues.90002": "the same recording starting 2 s later",
}
SAME_ARTIST = "blues.00001"  # another John Lee Hooker song (GTZAN blues 00000-00011)


@pytest.fixture(scope="module")
def params(repo_root):
    return load_settings(repo_root / "params.yaml")


@pytest.fixture(scope="module")
def copies_project(tmp_path_factory, gtzan_mini, params):
    """A project whose data/raw holds the real clip, three copies of it and another song of the
    same artist, with its manifest; the duplicates stage run on it."""
    root = tmp_path_factory.mktemp("copies")
    folder = root / "data/raw/genres/blues"
    folder.mkdir(parents=True)
    source = gtzan_mini / "genres/blues"
    shutil.copyfile(source / f"{ORIGINAL}.wav", folder / f"{ORIGINAL}.wav")
    shutil.copyfile(source / f"{SAME_ARTIST}.wav", folder / f"{SAME_ARTIST}.wav")
    samples, rate = soundfile.read(source / f"{ORIGINAL}.wav", dtype="float32")
    soundfile.write(folder / "blues.90000.flac", samples, rate)
    quieter = librosa.resample(samples, orig_sr=rate, target_sr=16000) * 10 ** (-6 / 20)
    soundfile.write(folder / "blues.90001.wav", quieter, 16000)
    soundfile.write(folder / "blues.90002.wav", samples[2 * rate :], rate)
    gates = ManifestGates.of(params)  # as the fetch stage reads them
    manifest = build_manifest(root / "data/raw", root, "test", gates, 2, False)
    manifest.to_csv(root / "data/manifest.csv", index=False)
    summary = duplicates_stage.run(params, root)
    return root, summary


def test_copies_are_grouped_with_the_original_and_other_songs_are_not(copies_project):
    root, summary = copies_project
    clips = pd.read_csv(root / PATHS.duplicates, dtype=str, keep_default_na=False)
    group_of = dict(zip(clips["track_id"], clips[splits.GROUP_COLUMN], strict=True))
    assert group_of[ORIGINAL] == f"dup:{ORIGINAL}"
    for copy, how in COPIES.items():
        assert group_of[copy] == group_of[ORIGINAL], how
    assert group_of[SAME_ARTIST] == ""  # same genre and artist, another recording
    assert summary["duplicate_groups"] == 1 and summary["clips_in_groups"] == 4

    pairs = pd.read_csv(root / PATHS.duplicate_pairs).set_index(["track_a", "track_b"])
    with_original = {b: row for (a, b), row in pairs.iterrows() if a == ORIGINAL}
    assert with_original["blues.90000"]["match"] == "identical samples"
    assert with_original["blues.90001"]["similarity"] >= 0.95
    assert with_original["blues.90002"]["match"] == "fingerprint"
    assert with_original["blues.90002"]["offset_s"] == pytest.approx(2.0, abs=0.15)

    report = (root / PATHS.duplicates_report / duplicates_stage.REPORT_FILE).read_text()
    assert f"## dup:{ORIGINAL}" in report and "blues.90002" in report


def test_every_seed_keeps_a_group_on_one_side(copies_project, reference_table):
    root, _ = copies_project
    groups = splits.read_groups(root / PATHS.duplicates)
    # The copies among all 1000 GTZAN track ids, so that the split has songs to spread.
    tracks = pd.read_csv(reference_table, usecols=["filename", "label"])
    tracks = pd.DataFrame(
        {"track_id": tracks["filename"].str.removesuffix(".au"), "genre": tracks["label"]}
    )
    tracks = pd.concat(
        [tracks, pd.DataFrame({"track_id": list(COPIES), "genre": "blues"})], ignore_index=True
    )
    members = [ORIGINAL, *COPIES]
    separated_without_groups = 0
    for seed in range(20):
        kept = split_strategies.assign_groups(tracks, 0.2, 0.3, seed, None, groups).set_index(
            "track_id"
        )
        assert kept.loc[members, "subset"].nunique() == 1, seed
        naive = split_strategies.assign_groups(tracks, 0.2, 0.3, seed, None).set_index("track_id")
        separated_without_groups += naive.loc[members, "subset"].nunique() > 1
    assert separated_without_groups > 0  # what the groups prevent does happen without them


def test_the_leakage_check_fails_on_a_split_that_separates_a_group(copies_project):
    root, _ = copies_project
    groups = splits.read_groups(root / PATHS.duplicates)
    assignments = pd.DataFrame(
        {
            "track_id": [ORIGINAL, *COPIES, SAME_ARTIST],
            "genre": "blues",
            "subset": ["train", "train", "test", "train", "valid"],
        }
    )
    with pytest.raises(
        split_strategies.LeakageError, match=r"duplicate_groups: dup:blues.00000 \("
    ) as caught:
        split_strategies.check_leakage(
            assignments, split_strategies.STRATEGIES["song_grouped"], None, groups
        )
    assert "blues.90001 in test" in str(caught.value)
    counted = split_strategies.check_leakage(
        assignments, split_strategies.STRATEGIES["random_segments"], None, groups
    )
    assert counted["duplicate_groups_on_several_sides"] == 1  # the leaky protocol: reported


def test_the_70_real_clips_hold_no_duplicates(tmp_path, gtzan_mini, params):
    """What the stage finds on ../shared: no group, and unrelated songs far below the bar."""
    root = tmp_path
    shutil.copytree(gtzan_mini / "genres", root / "data/raw/genres", copy_function=_link)
    gates = ManifestGates.of(params)
    manifest = build_manifest(root / "data/raw", root, "test", gates, 2, False)
    manifest.to_csv(root / "data/manifest.csv", index=False)
    summary = duplicates_stage.run(params, root)
    assert summary == {
        "clips": 70, "duplicate_groups": 0, "clips_in_groups": 0, "pairs": 0,
        "not_fingerprinted": 0,
    }  # fmt: skip
    settings = params.duplicates
    prints = [
        duplicates.fingerprint(root / path, settings.fingerprint_seconds)
        for path in manifest["path"]
    ]
    similarity, _ = duplicates.fingerprint_matches(
        prints, duplicates.window_items(settings), duplicates.max_offset_items(settings)
    )
    np.fill_diagonal(similarity, 0)
    assert similarity.max() < settings.min_similarity - 0.15


def _link(source, target):
    import os

    os.symlink(source, target)


def test_a_missing_fingerprinter_and_an_unreadable_clip_are_clear(tmp_path, monkeypatch):
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("not audio\n")
    with pytest.raises(Exception, match=r"notes.wav: fpcalc could not fingerprint it"):
        duplicates.fingerprint(not_audio, 30)
    monkeypatch.setattr(duplicates.shutil, "which", lambda name: None)
    with pytest.raises(duplicates.DuplicatesError, match="libchromaprint-tools"):
        duplicates.fpcalc_path()


def test_groups_are_connected_components_of_the_pairs():
    pairs = pd.DataFrame(
        {"track_a": ["a", "c", "b"], "track_b": ["b", "d", "e"], "match": "x", "similarity": 1.0}
    )
    assert duplicates.group_ids(list("abcdef"), pairs) == {
        "a": "dup:a", "b": "dup:a", "e": "dup:a", "c": "dup:c", "d": "dup:c"
    }  # fmt: skip
