"""Duplicate groups: copies of a real clip, however made, are found and kept on one side."""

from __future__ import annotations

import itertools
import shutil
import tracemalloc
from pathlib import Path

import librosa
import numpy as np
import pandas as pd
import pytest
import soundfile
from fingerprint_helpers import all_pairs_product, synthetic_fingerprints

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
    similarity, _ = all_pairs_product(
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


def _synthetic_clips(
    fingerprints: list[np.ndarray], same_samples: dict[int, int] | None = None
) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Synthetic track ids for made-up fingerprints, each with samples of its own but those
    `same_samples` maps to another's."""
    ids = [f"synthetic.{index:05d}" for index in range(len(fingerprints))]
    hashes = [f"samples-{(same_samples or {}).get(index, index)}" for index in range(len(ids))]
    clips = pd.DataFrame({"track_id": ids, "samples_sha256": hashes})
    return clips, dict(zip(ids, fingerprints, strict=True))


def test_the_pairs_are_those_of_the_all_pairs_comparison(params):
    """The index's candidates compared exactly give what comparing every pair gave: the same
    pairs, similarities and offsets, on made-up copies at 2-16 % bit errors (the bar, 0.85, is
    15 %), starting up to 5 s into each other either way, besides identical samples."""
    settings = params.duplicates
    window, max_offset = duplicates.window_items(settings), duplicates.max_offset_items(settings)
    prints, planted = [], []
    for bit_error in (0.02, 0.1, 0.14, 0.15, 0.16):
        made, copies = synthetic_fingerprints(60, 20, bit_error, window, max_offset, len(prints))
        planted += [(a + len(prints), b + len(prints)) for a, b, _ in copies]
        prints += made
    prints.append(prints[-1][: window + max_offset - 1])  # too short to compare
    # Identical samples: three clips (one too short), a copy and another clip, a copy and its
    # original (identical samples win over the fingerprint match).
    same = {len(prints) - 1: 0, 3: 0, planted[0][1]: 5, planted[1][1]: planted[1][0]}
    clips, fingerprints = _synthetic_clips(prints, same)
    found = duplicates.find_pairs(clips, fingerprints, settings)

    ids = list(clips["track_id"])
    similarity, offset = all_pairs_product(prints[:-1], window, max_offset)
    either = np.maximum(similarity, similarity.T) >= 0.85
    expected = {}
    for i, j in np.argwhere(np.triu(either, k=1)):
        forward = similarity[i, j] >= similarity[j, i]
        value = similarity[i, j] if forward else similarity[j, i]
        shift = int(offset[i, j]) if forward else -int(offset[j, i])
        expected[(ids[i], ids[j])] = (
            "fingerprint", round(float(value), 4), round(shift * duplicates.ITEM_SECONDS, 2)
        )  # fmt: skip
    for _, holders in clips.groupby("samples_sha256"):
        for pair in itertools.combinations(sorted(holders["track_id"]), 2):
            expected[pair] = ("identical samples", 1.0, 0.0)
    found_rows = {
        (row.track_a, row.track_b): (row.match, row.similarity, row.offset_s)
        for row in found.itertuples()
    }
    assert found_rows == expected
    assert len(expected) == len(found)  # no pair twice
    assert list(found.columns) == list(duplicates.PAIR_COLUMNS)
    assert found.equals(found.sort_values(["track_a", "track_b"]))
    assert found_rows[(ids[planted[1][0]], ids[planted[1][1]])][0] == "identical samples"
    matched = sum(bool(either[pair]) for pair in planted)
    assert 60 < matched < len(planted)  # copies up to 15 % bit errors match, few past it


def test_the_pair_finding_memory_grows_with_the_fingerprints_not_the_pairs(params):
    """Peak memory of find_pairs on 1,000 and 8,000 made-up fingerprints: about 8 times more
    (the n x n similarities of all pairs alone would be 64 times more: 256 MB at 8,000)."""
    settings = params.duplicates
    window, max_offset = duplicates.window_items(settings), duplicates.max_offset_items(settings)
    peaks = []
    for count in (1000, 8000):
        prints, planted = synthetic_fingerprints(count, count // 20, 0.1, window, max_offset)
        clips, fingerprints = _synthetic_clips(prints)
        tracemalloc.start()
        try:
            found = duplicates.find_pairs(clips, fingerprints, settings)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
        assert len(found) == len(planted)
    assert peaks[1] < 10 * peaks[0]
    assert peaks[1] < 8000**2 * 4 / 2  # half of one n x n float32 matrix


def test_the_report_lists_each_group_with_its_own_pairs(params):
    clips = pd.DataFrame(
        {
            "track_id": ["a", "b", "c", "d", "e"],
            "problem": "",
            splits.GROUP_COLUMN: ["dup:a", "dup:a", "dup:c", "dup:c", ""],
        }
    )
    pairs = pd.DataFrame(
        {
            "track_a": ["a", "c"],
            "track_b": ["b", "d"],
            "match": ["identical samples", "fingerprint"],
            "similarity": [1.0, 0.93],
            "offset_s": [0.0, -1.24],
        }
    )
    report = duplicates.report_markdown(clips, pairs, params.duplicates)
    first, second = report.split("## dup:a")[1].split("## dup:c")
    assert "| a | b | identical samples | 1.000 | +0.00 |" in first and "| c |" not in first
    assert "| c | d | fingerprint | 0.930 | -1.24 |" in second and "| a |" not in second
    assert "2 duplicate groups holding 4 clips; 2 matched pairs" in report
