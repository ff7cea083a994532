"""The features stage: tables from a manifest, failures skipped, the per-clip cache, the pool."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile

from gtzan_mlops import extract
from gtzan_mlops.features import FEATURE_NAMES

SAMPLE_RATE = 22050


def _manifest_row(path: Path, root: Path, genre: str, status: str = "ok") -> dict:
    return {
        "path": str(path.relative_to(root)),
        "genre": genre,
        "track_id": path.stem,
        "duration_s": 0.0,
        "sample_rate": SAMPLE_RATE,
        "channels": 1,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "",
        "status": status,
        "source": "test",
    }


@pytest.fixture()
def stage_repo(tmp_path, gtzan_mini):
    """A repository folder with params and a manifest of three real 6 s excerpts (kept short for
    speed), a clip that fails in extraction and a clip the manifest already excludes."""
    raw = tmp_path / "data" / "raw" / "genres"
    rows = []
    for genre in ("blues", "metal", "pop"):
        source = gtzan_mini / "genres" / genre / f"{genre}.00001.wav"
        samples, rate = soundfile.read(source, dtype="int16")
        target = raw / genre / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(target, samples[: 6 * rate + 100], rate, subtype="PCM_16")
        rows.append(_manifest_row(target, tmp_path, genre))
    broken = raw / "jazz" / "jazz.00054.wav"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"RIFF....WAVEfmt garbage that is not audio")
    rows.append(_manifest_row(broken, tmp_path, "jazz"))
    rows.append(_manifest_row(raw / "rock" / "rock.00009.wav", tmp_path, "rock", "empty file"))
    (tmp_path / "data").mkdir(exist_ok=True)
    pd.DataFrame(rows).to_csv(tmp_path / "data" / "manifest.csv", index=False)
    params = {
        "features": {
            "sample_rate": SAMPLE_RATE,
            "n_fft": 2048,
            "hop_length": 512,
            "n_mfcc": 20,
            "clip_seconds": 30.0,
            "segment_seconds": 3.0,
            "last_segment_min_fraction": 0.99,
            "workers": 1,
            "chunksize": 1,
        }
    }
    return tmp_path, params


def test_stage_writes_tables_and_skips_failures(stage_repo):
    root, params = stage_repo
    counts = extract.run(params, root, show_progress=False)
    assert counts == {
        "clips": 3,
        "segments": 6,
        "failed": 1,
        "from_cache": 0,
        "excluded_by_manifest": 1,
    }
    clips = pd.read_csv(root / "data/features/features_30_sec.csv")
    segments = pd.read_csv(root / "data/features/features_3_sec.csv")
    assert clips.columns.tolist() == ["track_id", "genre", "length", *FEATURE_NAMES]
    assert segments.columns.tolist() == ["track_id", "segment", "genre", "length", *FEATURE_NAMES]
    assert clips["track_id"].tolist() == ["blues.00001", "metal.00001", "pop.00001"]
    assert segments.groupby("track_id")["segment"].apply(list).tolist() == [[0, 1]] * 3
    assert (clips["length"] == 6 * SAMPLE_RATE + 100).all()
    assert np.isfinite(clips[list(FEATURE_NAMES)].to_numpy()).all()
    failures = pd.read_csv(root / "data/features/failures.csv")
    assert failures["track_id"].tolist() == ["jazz.00054"]
    assert "jazz.00054.wav" in failures.loc[0, "reason"]
    assert "not decodable" in failures.loc[0, "reason"]


def test_rerun_reads_the_cache_and_extracts_only_new_clips(stage_repo, gtzan_mini):
    root, params = stage_repo
    extract.run(params, root, show_progress=False)
    first = pd.read_csv(root / "data/features/features_30_sec.csv")

    assert extract.run(params, root, show_progress=False)["from_cache"] == 3
    pd.testing.assert_frame_equal(pd.read_csv(root / "data/features/features_30_sec.csv"), first)

    added = root / "data/raw/genres/disco/disco.00002.wav"
    added.parent.mkdir(parents=True)
    shutil.copy(gtzan_mini / "genres/disco/disco.00002.wav", added)
    manifest = pd.read_csv(root / "data/manifest.csv")
    manifest.loc[len(manifest)] = _manifest_row(added, root, "disco")
    manifest.to_csv(root / "data/manifest.csv", index=False)
    counts = extract.run(params, root, show_progress=False)
    assert (counts["clips"], counts["segments"], counts["from_cache"]) == (4, 16, 3)


def test_changed_settings_do_not_reuse_cached_values(stage_repo):
    root, params = stage_repo
    extract.run(params, root, show_progress=False)
    params["features"]["n_mfcc"] = 13
    counts = extract.run(params, root, show_progress=False)
    assert counts["from_cache"] == 0
    clips = pd.read_csv(root / "data/features/features_30_sec.csv")
    assert clips.columns[-1] == "mfcc13_var"


def test_a_truncated_cache_entry_is_extracted_again(stage_repo):
    root, params = stage_repo
    extract.run(params, root, show_progress=False)
    entry = next((root / "data/features/cache").rglob("*.npz"))
    entry.write_bytes(entry.read_bytes()[:100])  # as an interrupted write would leave it
    assert extract.run(params, root, show_progress=False)["from_cache"] == 2


def test_process_pool_gives_the_same_tables(stage_repo):
    root, params = stage_repo
    extract.run(params, root, show_progress=False)
    single = pd.read_csv(root / "data/features/features_3_sec.csv")
    shutil.rmtree(root / "data/features")
    params["features"]["workers"] = 2
    extract.run(params, root, show_progress=False)
    pd.testing.assert_frame_equal(pd.read_csv(root / "data/features/features_3_sec.csv"), single)


def test_missing_manifest_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "params.yaml").write_text("features:\n  workers: 1\n")
    assert extract.main(["--params", str(tmp_path / "params.yaml")]) == 1
    error = capsys.readouterr().err
    assert f"{tmp_path / 'data' / 'manifest.csv'}: manifest not found" in error
    assert "run the fetch stage first" in error
