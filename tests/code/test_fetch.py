"""The fetch stage: local copies of the real clips, the synthetic demo set, unusable clips in the
manifest, and the gtzan download (resume, checksum, safe extraction, mirrors) against a real HTTP
server on 127.0.0.1 serving a small synthetic genres.tar.gz built here."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import socket
import tarfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import soundfile
import yaml
from project_params import project_params

from gtzan_mlops.data.audio import find_truncation, load_waveform
from gtzan_mlops.data.audio_headers import Truncation
from gtzan_mlops.data.gtzan import archive as archive_lib
from gtzan_mlops.data.manifest import ManifestGates, build_manifest
from gtzan_mlops.features.handcrafted import REFERENCE_SETTINGS, extract_clip
from gtzan_mlops.settings.loading import ConfigError, validate_settings
from gtzan_mlops.settings.schema import Settings
from gtzan_mlops.stages import fetch

RATE = 22050
GENRES = [
    "blues",
    "classical",
    "country",
    "disco",
    "hiphop",
    "jazz",
    "metal",
    "pop",
    "reggae",
    "rock",
]
# The manifest's documented columns, spelled out rather than imported from fetch.py, so that a
# change there cannot quietly change what the test expects.
COLUMNS = [
    "path",
    "genre",
    "track_id",
    "duration_s",
    "sample_rate",
    "channels",
    "sha256",
    "status",
    "source",
]
# How long the test server goes silent in a stalled reply; the client's timeout is shorter.
STALL_S = 1.0
# What the synthetic archive holds: genre -> tone frequency; two clips each.
ARCHIVE_GENRES = {"blues": 220.0, "metal": 880.0}

# The settings these tests run fetch with: small, quick to retry, the rest as in params.yaml.
TEST_SETTINGS: dict[str, Any] = {
    "genres": GENRES,
    "data.local_dir": None,
    "data.gtzan.folder": None,
    "data.gtzan.archive": None,
    "data.gtzan.md5": "0" * 32,
    "data.gtzan.mirrors": [],
    "data.gtzan.download_dir": "data/download",
    "data.gtzan.retries": 2,
    "data.gtzan.retry_backoff_s": 0.01,
    "data.gtzan.timeout_s": 5,
    "data.demo.clips_per_genre": 2,
    "data.demo.duration_s": 3.0,
    "data.demo.sample_rate": RATE,
    "data.demo.seed": 0,
    "data.min_duration_s": 1.0,
    "data.silence_peak": 1.0e-4,
    "data.max_peak": 1000.0,
    "resources.fetch.workers": 0,
}


def _raw(source: str, changes: dict[str, Any] | None = None, **gtzan: Any) -> dict[str, Any]:
    """Full params for `source` as params.yaml would hold them: TEST_SETTINGS, then the dotted
    `changes`, then `gtzan` (keys of data.gtzan)."""
    updates = {**TEST_SETTINGS, "data.source": source, **(changes or {})}
    updates.update({f"data.gtzan.{key}": value for key, value in gtzan.items()})
    return project_params(updates, validate=False)


def _params(source: str, changes: dict[str, Any] | None = None, **gtzan: Any) -> Settings:
    """The settings fetch runs with (see `_raw`), validated."""
    return validate_settings(_raw(source, changes, **gtzan))


def _manifest(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / "data" / "manifest.csv")


def _files_under(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.is_file())


def _synthetic_clip(seconds: float, frequency: float = 440.0, seed: int = 0) -> np.ndarray:
    """A tone with a little noise (so it does not gzip to nothing), peak about 0.5."""
    t = np.arange(round(seconds * RATE)) / RATE
    noise = np.random.default_rng(seed).uniform(-0.05, 0.05, len(t))
    return (0.45 * np.sin(2 * np.pi * frequency * t) + noise).astype(np.float32)


def _write_synthetic_clip(path: Path, samples: np.ndarray, audio_format: str = "WAV") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, samples, RATE, format=audio_format, subtype="PCM_16")
    return path


def _wav_bytes(samples: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, RATE, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def _synthetic_archive(
    extra_members: dict[str, bytes] | None = None, links: dict[str, str] | None = None
) -> bytes:
    """A small genres.tar.gz: two synthetic WAVs per genre of ARCHIVE_GENRES and an .mf list,
    plus `extra_members` (name: bytes) and symbolic `links` (name: target)."""
    members: dict[str, bytes] = {}
    for genre, frequency in ARCHIVE_GENRES.items():
        for index in range(2):
            clip = _synthetic_clip(1.5, frequency * (index + 1), seed=index)
            members[f"genres/{genre}/synthetic-{genre}.{index:05d}.wav"] = _wav_bytes(clip)
    members["genres/input.mf"] = b"genres/blues/synthetic-blues.00000.wav\tblues\n"
    members.update(extra_members or {})
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return buffer.getvalue()


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


# --------------------------------------------------------------------------------------------
# local source: the real clips


def test_local_source_lists_every_real_clip(tmp_path, gtzan_mini):
    # A relative local_dir resolves against the repository root (here tmp_path).
    local_dir = os.path.relpath(gtzan_mini, tmp_path)
    params = _params("local", {"data.local_dir": local_dir, "data.min_duration_s": 3.0})

    summary = fetch.run(params, tmp_path, show_progress=False)

    assert summary == {"source": "local", "clips": 70, "ok": 70, "unusable": 0}
    manifest = _manifest(tmp_path)
    assert manifest.columns.tolist() == COLUMNS
    assert (manifest["status"] == "ok").all()
    assert (manifest["source"] == "local").all()
    assert manifest.groupby("genre").size().to_dict() == dict.fromkeys(GENRES, 7)
    assert manifest[["genre", "track_id"]].equals(
        manifest[["genre", "track_id"]].sort_values(["genre", "track_id"], ignore_index=True)
    )
    assert (manifest["sample_rate"] == RATE).all() and (manifest["channels"] == 1).all()
    assert manifest["duration_s"].between(29.0, 31.0).all()
    first = manifest.iloc[0]
    assert first["path"] == "data/raw/genres/blues/blues.00000.wav"
    assert first["track_id"] == "blues.00000"
    for row in manifest.itertuples():
        copied = tmp_path / row.path
        original = gtzan_mini / "genres" / row.genre / copied.name
        assert hashlib.sha256(copied.read_bytes()).hexdigest() == row.sha256
        assert hashlib.sha256(original.read_bytes()).hexdigest() == row.sha256


def test_local_source_accepts_the_genres_folder_and_leaves_no_stale_files(tmp_path, gtzan_mini):
    stale = _write_synthetic_clip(
        tmp_path / "data/raw/genres/blues/synthetic-stale.00000.wav", _synthetic_clip(2.0)
    )
    params = _params("local", {"data.local_dir": str(gtzan_mini / "genres")})

    assert fetch.run(params, tmp_path, show_progress=False)["ok"] == 70
    assert not stale.exists()
    assert len(_files_under(tmp_path / "data/raw")) == 70


def test_local_source_bad_folders_are_config_errors(tmp_path):
    raw = _raw("local", {"data.local_dir": "no/such/folder"})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))

    assert fetch.main(["--params", str(tmp_path / "params.yaml")]) == 2  # configuration
    with pytest.raises(ConfigError, match=r"data\.local_dir: .*no/such/folder: no such folder"):
        fetch.run(validate_settings(raw), tmp_path, show_progress=False)
    (tmp_path / "no-audio/genres/blues").mkdir(parents=True)
    params = _params("local", {"data.local_dir": "no-audio"})
    with pytest.raises(ConfigError, match="no audio files at genres/<genre>/<file>"):
        fetch.run(params, tmp_path, show_progress=False)
    # The stage's own output, emptied at every run.
    params = _params("local", {"data.local_dir": "data/raw"})
    _write_synthetic_clip(tmp_path / "data/raw/genres/pop/synthetic-pop.00000.wav", np.zeros(9))
    with pytest.raises(ConfigError, match="overlaps the stage's output folder"):
        fetch.run(params, tmp_path, show_progress=False)
    # The local source without a folder: refused by the settings' schema, before the stage.
    with pytest.raises(ConfigError, match="local_dir must be set when source is local"):
        _params("local")


def test_unknown_source_names_the_allowed_values(tmp_path):
    # Checked by the settings' schema, before the stage runs.
    with pytest.raises(
        ConfigError, match=r"data\.source: Input should be 'demo', 'gtzan' or 'local'"
    ):
        _params("kaggle")


# --------------------------------------------------------------------------------------------
# demo source: synthetic clips


def test_demo_source_is_deterministic_and_all_ok(tmp_path):
    first_root, second_root = tmp_path / "first", tmp_path / "second"
    params = _params("demo")

    summary = fetch.run(params, first_root, show_progress=False)
    fetch.run(params, second_root, show_progress=False)

    assert summary == {"source": "demo", "clips": 20, "ok": 20, "unusable": 0}
    first, second = _manifest(first_root), _manifest(second_root)
    assert first.columns.tolist() == COLUMNS
    assert first["sha256"].tolist() == second["sha256"].tolist()
    assert first["sha256"].is_unique  # every clip varies, even within a genre
    assert (first["source"] == "synthetic-demo").all()
    assert first["track_id"].tolist()[:2] == ["synthetic-blues.00000", "synthetic-blues.00001"]
    assert first["path"][0] == "data/raw/genres/blues/synthetic-blues.00000.wav"
    assert (first["duration_s"] == 3.0).all() and (first["sample_rate"] == RATE).all()
    info = soundfile.info(first_root / first["path"][0])
    assert (info.format, info.subtype, info.channels) == ("WAV", "PCM_16", 1)

    fetch.run(_params("demo", {"data.demo.seed": 1}), second_root, show_progress=False)
    assert set(_manifest(second_root)["sha256"]).isdisjoint(first["sha256"])


def test_synthetic_genres_are_separable_by_their_features(tmp_path):
    """Leave-one-out nearest centroid on the 57 standardised features: far above 10% chance."""
    params = _params("demo", {"data.demo.clips_per_genre": 3, "data.demo.duration_s": 3.0})
    fetch.run(params, tmp_path, show_progress=False)
    manifest = _manifest(tmp_path)

    settings = REFERENCE_SETTINGS
    features = np.stack(
        [
            extract_clip(load_waveform(tmp_path / path, RATE), settings).clip
            for path in manifest["path"]
        ]
    )
    features = (features - features.mean(axis=0)) / (features.std(axis=0) + 1e-12)
    labels = manifest["genre"].to_numpy()
    correct = 0
    for held_out in range(len(labels)):
        train = np.arange(len(labels)) != held_out
        centroids = {genre: features[train & (labels == genre)].mean(axis=0) for genre in GENRES}
        guess = min(centroids, key=lambda g: np.linalg.norm(features[held_out] - centroids[g]))
        correct += guess == labels[held_out]
    accuracy = correct / len(labels)
    assert accuracy >= 0.6, f"synthetic genres barely separable: leave-one-out accuracy {accuracy}"


# --------------------------------------------------------------------------------------------
# unusable clips


@pytest.mark.parametrize(
    ("audio_format", "subtype"),
    [("WAV", "PCM_16"), ("WAV", "FLOAT"), ("AU", "PCM_16"), ("AU", "ULAW")],
)
def test_find_truncation_compares_the_header_with_the_bytes(tmp_path, audio_format, subtype):
    path = tmp_path / f"synthetic.{audio_format.lower()}"
    soundfile.write(path, _synthetic_clip(1.0), RATE, format=audio_format, subtype=subtype)
    assert find_truncation(path) is None
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    truncation = find_truncation(path)
    assert isinstance(truncation, Truncation)
    assert truncation.promised_frames == RATE
    assert truncation.held_frames == soundfile.info(path).frames < RATE // 2 + 100


def test_unusable_clips_are_listed_with_their_reasons(tmp_path, caplog, capsys):
    genres_dir = tmp_path / "synthetic-local" / "genres"
    good = _synthetic_clip(2.0)
    _write_synthetic_clip(genres_dir / "blues/synthetic-blues.00000.wav", good)
    _write_synthetic_clip(genres_dir / "blues/synthetic-blues.00001.au", good, "AU")
    (genres_dir / "blues/notes.txt").write_text("not audio, not listed")
    (genres_dir / "input.mf").write_text("a list file beside the genre folders, not listed")
    (genres_dir / "classical").mkdir()
    (genres_dir / "classical/synthetic-empty.00000.wav").write_bytes(b"")
    (genres_dir / "country").mkdir()
    (genres_dir / "country/synthetic-text.00000.wav").write_text("this is not a WAV file\n")
    cut_clips = {"disco/synthetic-cut.00000.wav": "WAV", "hiphop/synthetic-cut.00000.au": "AU"}
    for name, audio_format in cut_clips.items():
        path = _write_synthetic_clip(genres_dir / name, good, audio_format)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _write_synthetic_clip(genres_dir / "jazz/synthetic-silent.00000.wav", np.zeros(2 * RATE))
    _write_synthetic_clip(genres_dir / "metal/synthetic-short.00000.wav", good[: RATE // 2])
    _write_synthetic_clip(genres_dir / "polka/synthetic-polka.00000.wav", good)
    raw = _raw("local", {"data.local_dir": str(genres_dir.parent)})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))

    with caplog.at_level(logging.WARNING, logger="gtzan_mlops.data.manifest"):
        assert fetch.main(["--params", str(tmp_path / "params.yaml")]) == 0

    summary = capsys.readouterr().out.strip().splitlines()[-1]  # the stage's one result line
    assert summary == "fetch: source local, clips 9, ok 2, unusable 7"
    manifest = _manifest(tmp_path).set_index("track_id")
    status = manifest["status"]
    assert status["synthetic-blues.00000"] == "ok" and status["synthetic-blues.00001"] == "ok"
    assert status["synthetic-empty.00000"] == "empty: 0 bytes"
    assert status["synthetic-text.00000"].startswith("undecodable: not decodable as audio")
    truncated = manifest.loc[manifest["genre"].isin(["disco", "hiphop"])]
    for reason in truncated["status"]:
        assert reason.startswith(f"truncated: header promises {2 * RATE} frames, file holds ")
    assert truncated["duration_s"].between(0.9, 1.1).all()  # the part that is there
    assert status["synthetic-silent.00000"].startswith("silent: peak 0, silence_peak is 0.0001")
    assert status["synthetic-short.00000"] == "too short: 0.50 s, min_duration_s is 1.0"
    assert status["synthetic-polka.00000"] == (
        "unknown genre: folder 'polka' is not in params genres"
    )
    assert manifest["sha256"].str.fullmatch(r"[0-9a-f]{64}").all()
    undecodable = manifest.loc[["synthetic-empty.00000", "synthetic-text.00000"]]
    assert undecodable[["duration_s", "sample_rate", "channels"]].isna().all().all()
    assert manifest.loc["synthetic-short.00000", "sample_rate"] == RATE
    warnings = [
        record.getMessage() for record in caplog.records if "unusable clip" in record.message
    ]
    assert len(warnings) == 7
    assert any("synthetic-cut.00000.au: truncated" in message for message in warnings)


def test_threads_write_the_same_manifest(tmp_path):
    genres_dir = tmp_path / "data/raw/genres"
    for index in range(6):
        clip = _synthetic_clip(1.0, seed=index)
        _write_synthetic_clip(genres_dir / f"pop/synthetic-pop.{index:05d}.wav", clip)
    (genres_dir / "rock").mkdir()
    (genres_dir / "rock/synthetic-empty.00000.wav").write_bytes(b"")
    gates = ManifestGates(tuple(GENRES), min_duration_s=0.5, silence_peak=1e-4, max_peak=1e3)

    one = build_manifest(tmp_path / "data/raw", tmp_path, "test", gates, 1, False)
    threaded = build_manifest(tmp_path / "data/raw", tmp_path, "test", gates, 3, False)

    pd.testing.assert_frame_equal(threaded, one)
    assert one["status"].tolist() == ["ok"] * 6 + ["empty: 0 bytes"]


# --------------------------------------------------------------------------------------------
# gtzan source without a download: an existing folder or archive


def test_gtzan_folder_param_is_copied(tmp_path):
    for genre, frequency in ARCHIVE_GENRES.items():
        clip = _synthetic_clip(1.5, frequency)
        _write_synthetic_clip(
            tmp_path / f"extracted/genres/{genre}/synthetic-{genre}.00000.au", clip, "AU"
        )
    params = _params("gtzan", folder="extracted", mirrors=["http://127.0.0.1:9/never-used"])

    assert fetch.run(params, tmp_path, show_progress=False) == {
        "source": "gtzan",
        "clips": 2,
        "ok": 2,
        "unusable": 0,
    }
    assert _manifest(tmp_path)["path"].tolist() == [
        "data/raw/genres/blues/synthetic-blues.00000.au",
        "data/raw/genres/metal/synthetic-metal.00000.au",
    ]


def test_gtzan_archive_param_is_verified_and_extracted(tmp_path):
    data = _synthetic_archive()
    archive = tmp_path / "elsewhere" / "genres.tar.gz"
    archive.parent.mkdir()
    archive.write_bytes(data)
    params = _params("gtzan", archive=str(archive), md5=_md5(data))

    summary = fetch.run(params, tmp_path, show_progress=False)

    assert summary == {"source": "gtzan", "clips": 4, "ok": 4, "unusable": 0}
    assert [path.name for path in _files_under(tmp_path / "data/raw")] == [
        "synthetic-blues.00000.wav",
        "synthetic-blues.00001.wav",
        "synthetic-metal.00000.wav",
        "synthetic-metal.00001.wav",
    ]  # input.mf is not extracted
    assert not (tmp_path / "data/download").exists()

    params = _params("gtzan", archive=str(archive), md5="f" * 32)
    with pytest.raises(
        archive_lib.ChecksumError, match=f"md5 mismatch: expected {'f' * 32}, got {_md5(data)}"
    ):
        fetch.run(params, tmp_path, show_progress=False)
    assert archive.read_bytes() == data  # the user's own file is never deleted


ABSOLUTE = "/tmp/synthetic-absolute.wav"
LINK = "genres/blues/synthetic-link.wav"


@pytest.mark.parametrize(
    ("members", "links", "named", "problem"),
    [
        ({ABSOLUTE: b"RIFF"}, {}, ABSOLUTE, "absolute path"),
        ({"genres/../../evil.wav": b"RIFF"}, {}, "genres/../../evil.wav", "path contains '..'"),
        ({}, {LINK: "/etc/passwd"}, LINK, "link to '/etc/passwd'"),
    ],
)
def test_unsafe_archive_members_are_refused(tmp_path, members, links, named, problem):
    data = _synthetic_archive(members, links)
    archive = tmp_path / "genres.tar.gz"
    archive.write_bytes(data)
    root = tmp_path / "repo"
    params = _params("gtzan", archive=str(archive), md5=_md5(data))

    with pytest.raises(archive_lib.UnsafeArchiveError) as raised:
        fetch.run(params, root, show_progress=False)

    assert f"unsafe member '{named}' ({problem}); nothing was extracted" in str(raised.value)
    assert _files_under(root / "data/raw") == []
    assert not Path(ABSOLUTE).exists()


# --------------------------------------------------------------------------------------------
# gtzan source: downloads from a real HTTP server on 127.0.0.1


class ArchiveServer:
    """What the test server serves and saw: files by path, requests as (path, Range, status)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.cut_after: dict[str, int] = {}  # path -> bytes sent before dropping the first reply
        self.stall_after: dict[str, int] = {}  # path -> bytes sent before the first reply stalls
        self.honour_ranges = True
        self.requests: list[tuple[str, str | None, int]] = []
        self.base_url = ""

    def url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    def statuses(self, path: str) -> list[int]:
        return [status for seen, _, status in self.requests if seen == path]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        state = self.server.state  # type: ignore[attr-defined]
        body = state.files.get(self.path)
        range_header = self.headers.get("Range")
        if body is None:
            state.requests.append((self.path, range_header, 404))
            self.send_error(404)
            return
        start = 0
        if range_header and state.honour_ranges:
            start = int(range_header.removeprefix("bytes=").split("-")[0])
        status = 206 if start else 200
        payload = body[start:]
        state.requests.append((self.path, range_header, status))
        self.send_response(status)
        self.send_header("Content-Type", "application/gzip")
        self.send_header("Content-Length", str(len(payload)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.end_headers()
        cut = state.cut_after.pop(self.path, None)
        if cut is not None:  # a dropped connection: part of the body, then the socket closes
            self.wfile.write(payload[:cut])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        stall = state.stall_after.pop(self.path, None)
        if stall is not None:  # part of the body, then silence longer than the client's timeout
            self.wfile.write(payload[:stall])
            self.wfile.flush()
            time.sleep(STALL_S)
            self.close_connection = True
            return
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture()
def archive_server() -> Iterator[ArchiveServer]:
    state = ArchiveServer()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.state = state  # type: ignore[attr-defined]
    server.daemon_threads = True
    state.base_url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()
    thread.join()


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.network
def test_download_verifies_extracts_and_keeps_the_archive(tmp_path, archive_server):
    data = _synthetic_archive()
    archive_server.files["/genres.tar.gz"] = data
    params = _params("gtzan", md5=_md5(data), mirrors=[archive_server.url("/genres.tar.gz")])

    summary = fetch.run(params, tmp_path, show_progress=False)

    assert summary == {"source": "gtzan", "clips": 4, "ok": 4, "unusable": 0}
    kept = tmp_path / "data/download/genres.tar.gz"
    assert kept.read_bytes() == data
    assert [path.name for path in _files_under(tmp_path / "data/download")] == ["genres.tar.gz"]
    manifest = _manifest(tmp_path)
    assert (manifest["source"] == "gtzan").all()
    assert manifest["genre"].tolist() == ["blues", "blues", "metal", "metal"]

    # A second run uses the verified archive in the download folder: no request.
    assert fetch.run(params, tmp_path, show_progress=False) == summary
    assert archive_server.statuses("/genres.tar.gz") == [200]


@pytest.mark.network
def test_wrong_checksum_fails_cleanly(tmp_path, archive_server):
    data = _synthetic_archive()
    url = archive_server.url("/genres.tar.gz")
    archive_server.files["/genres.tar.gz"] = data
    raw = _raw("gtzan", md5="a" * 32, mirrors=[url])
    params = validate_settings(raw)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))

    with pytest.raises(archive_lib.DownloadError) as raised:
        fetch.run(params, tmp_path, show_progress=False)

    assert f"{url}: md5 mismatch: expected {'a' * 32}, got {_md5(data)}" in str(raised.value)
    assert _files_under(tmp_path / "data/raw") == []
    assert _files_under(tmp_path / "data/download") == []  # the .part is deleted
    assert not (tmp_path / "data/manifest.csv").exists()
    assert fetch.main(["--params", str(tmp_path / "params.yaml")]) == 1


@pytest.mark.network
@pytest.mark.parametrize("server_resumes", [True, False])
def test_broken_transfer_is_resumed(tmp_path, archive_server, caplog, server_resumes):
    data = _synthetic_archive()
    assert len(data) > 100_000
    archive_server.files["/genres.tar.gz"] = data
    archive_server.cut_after["/genres.tar.gz"] = 60_000
    archive_server.honour_ranges = server_resumes
    params = _params("gtzan", md5=_md5(data), mirrors=[archive_server.url("/genres.tar.gz")])

    with caplog.at_level(logging.INFO, logger="gtzan_mlops"):
        summary = fetch.run(params, tmp_path, show_progress=False)

    assert summary["ok"] == 4
    assert (tmp_path / "data/download/genres.tar.gz").read_bytes() == data
    requests_seen = archive_server.requests
    assert [range_header for _, range_header, _ in requests_seen] == [None, "bytes=60000-"]
    assert "transfer broke off after 60000 of" in caplog.text
    if server_resumes:
        assert archive_server.statuses("/genres.tar.gz") == [200, 206]
        assert "resuming at byte 60000 (HTTP 206 Partial Content)" in caplog.text
    else:
        assert archive_server.statuses("/genres.tar.gz") == [200, 200]
        assert "restarting at 0" in caplog.text


@pytest.mark.network
def test_a_stalled_transfer_times_out_and_is_resumed(tmp_path, archive_server, caplog):
    data = _synthetic_archive()
    archive_server.files["/genres.tar.gz"] = data
    archive_server.stall_after["/genres.tar.gz"] = 50_000
    params = _params(
        "gtzan",
        md5=_md5(data),
        mirrors=[archive_server.url("/genres.tar.gz")],
        timeout_s=STALL_S / 4,
    )

    with caplog.at_level(logging.WARNING, logger="gtzan_mlops.data.gtzan.archive"):
        assert fetch.run(params, tmp_path, show_progress=False)["ok"] == 4

    assert archive_server.requests[1] == ("/genres.tar.gz", "bytes=50000-", 206)
    assert "transfer broke off after 50000 of" in caplog.text
    assert "(timed out); retry 1 of 2" in caplog.text


@pytest.mark.network
def test_a_part_file_from_an_interrupted_run_is_resumed(tmp_path, archive_server):
    data = _synthetic_archive()
    archive_server.files["/genres.tar.gz"] = data
    part = tmp_path / "data/download/genres.tar.gz.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(data[:12345])
    params = _params("gtzan", md5=_md5(data), mirrors=[archive_server.url("/genres.tar.gz")])

    assert fetch.run(params, tmp_path, show_progress=False)["ok"] == 4
    assert archive_server.requests == [("/genres.tar.gz", "bytes=12345-", 206)]
    assert not part.exists()


@pytest.mark.network
def test_unsafe_archive_member_is_refused_before_extracting(tmp_path, archive_server):
    evil = _wav_bytes(_synthetic_clip(1.5))
    data = _synthetic_archive({"../evil.wav": evil})
    archive_server.files["/genres.tar.gz"] = data
    root = tmp_path / "repo"
    params = _params("gtzan", md5=_md5(data), mirrors=[archive_server.url("/genres.tar.gz")])

    with pytest.raises(archive_lib.UnsafeArchiveError, match=r"unsafe member '\.\./evil\.wav'"):
        fetch.run(params, root, show_progress=False)

    assert _files_under(root / "data/raw") == []
    assert not list(tmp_path.rglob("evil.wav"))


@pytest.mark.network
def test_mirror_fallback_and_an_error_listing_every_mirror(tmp_path, archive_server, caplog):
    data = _synthetic_archive()
    archive_server.files["/good/genres.tar.gz"] = data
    missing = archive_server.url("/missing/genres.tar.gz")
    params = _params(
        "gtzan", md5=_md5(data), mirrors=[missing, archive_server.url("/good/genres.tar.gz")]
    )

    with caplog.at_level(logging.WARNING, logger="gtzan_mlops.data.gtzan.archive"):
        assert fetch.run(params, tmp_path, show_progress=False)["ok"] == 4
    assert archive_server.statuses("/missing/genres.tar.gz") == [404]  # a 404 is not retried
    assert f"{missing}: HTTP 404" in caplog.text

    refused = f"http://127.0.0.1:{_closed_port()}/genres.tar.gz"
    params = _params("gtzan", md5=_md5(data), mirrors=[missing, refused])
    (tmp_path / "data/download/genres.tar.gz").unlink()
    with pytest.raises(archive_lib.DownloadError) as raised:
        fetch.run(params, tmp_path, show_progress=False)
    message = str(raised.value)
    assert message.startswith("could not download genres.tar.gz from any mirror")
    assert f"{missing}: HTTP 404" in message
    assert f"{refused}: failed after 3 attempts; last: [Errno 111] Connection refused" in message
