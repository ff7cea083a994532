"""The served model: real audio through the logged pyfunc, bad inputs, and `mlflow models serve`."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import librosa
import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
import soundfile
from audio_bombs import flac_of_zeros, ogg_of_zeros
from live_services import clean_env, mlflow_server
from mlflow.exceptions import MlflowException
from mlflow_helpers import GENRES, log_served, log_sklearn, reference_classifier, sqlite_store

from gtzan_mlops.data.audio import load_waveform
from gtzan_mlops.features.handcrafted import (
    FEATURE_NAMES,
    REFERENCE_SETTINGS,
    extract_clip,
    segment_samples,
)
from gtzan_mlops.serving.inputs import decode_base64_audio
from gtzan_mlops.serving.packaging import synthetic_example_clip
from gtzan_mlops.serving.spec import BASE64_COLUMN, PATH_COLUMN, ServingSpec, output_columns


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    with sqlite_store(tmp_path_factory.mktemp("serving-store")) as uri:
        yield uri


@pytest.fixture(scope="module")
def classifier(reference_table):
    return reference_classifier(reference_table)


@pytest.fixture(scope="module")
def classifier_uri(store, classifier):
    return log_sklearn(classifier)


@pytest.fixture(scope="module")
def audio_root(tmp_path_factory) -> Path:
    """The folder audio_path may read on the test's server."""
    return tmp_path_factory.mktemp("audio-root")


@pytest.fixture(scope="module")
def served(classifier_uri, audio_root):
    """The serving pyfunc of a segment-level model, loaded as `mlflow models serve` loads it;
    logged with its input example, so logging also ran a prediction. audio_path is allowed
    under `audio_root`."""
    uri = log_served(
        classifier_uri,
        level="segment",
        input_example=True,
        max_upload_mib=2.0,
        allow_audio_path=True,
        audio_root=str(audio_root),
    )
    return uri, mlflow.pyfunc.load_model(uri)


@pytest.fixture(scope="module")
def clip(gtzan_mini, audio_root) -> Path:
    """A real jazz clip, copied under the audio root (a symlink would resolve out of it)."""
    copy = audio_root / "jazz.00001.wav"
    shutil.copyfile(gtzan_mini / "genres" / "jazz" / "jazz.00001.wav", copy)
    return copy


PROBABILITIES = [f"prob_{genre}" for genre in GENRES]


def _base64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def test_real_clip_by_path_and_base64_matches_the_pipeline_features(served, classifier, clip):
    _, model = served
    by_path = model.predict(pd.DataFrame({PATH_COLUMN: [str(clip)]}))
    by_bytes = model.predict(pd.DataFrame({BASE64_COLUMN: [_base64(clip)]}))
    assert list(by_path.columns) == output_columns(GENRES)
    pd.testing.assert_frame_equal(by_path, by_bytes)

    # What the pipeline would compute: the same extraction, each segment classified, averaged.
    settings = REFERENCE_SETTINGS
    segments = extract_clip(load_waveform(clip, settings.sample_rate), settings).segments
    assert len(segments) == 10
    expected = classifier.predict_proba(pd.DataFrame(segments, columns=FEATURE_NAMES)).mean(0)
    probabilities = by_path.loc[0, PROBABILITIES].to_numpy(dtype=float)
    np.testing.assert_allclose(probabilities, expected, rtol=1e-9)
    assert probabilities.sum() == pytest.approx(1.0)
    assert by_path.loc[0, "genre"] == GENRES[int(expected.argmax())]


def test_clip_level_model_uses_the_whole_clip_features(store, classifier, classifier_uri, clip):
    model = mlflow.pyfunc.load_model(log_served(classifier_uri, level="clip", family="clip"))
    output = model.predict(pd.DataFrame({BASE64_COLUMN: [_base64(clip)]}))
    settings = REFERENCE_SETTINGS
    features = extract_clip(load_waveform(clip, settings.sample_rate), settings).clip
    expected = classifier.predict_proba(pd.DataFrame([features], columns=FEATURE_NAMES))[0]
    np.testing.assert_allclose(
        output.loc[0, PROBABILITIES].to_numpy(dtype=float), expected, rtol=1e-9
    )


def test_lossless_and_stereo_44k_encodings_are_converted(served, clip, audio_root):
    # 30 s of 44.1 kHz stereo is about 5 MiB: above the fixture's 2 MiB limit, so raise it.
    model = mlflow.pyfunc.load_model(served[0], model_config={"max_upload_mib": 10})
    samples, rate = soundfile.read(clip, dtype="float32")
    flac = io.BytesIO()
    soundfile.write(flac, samples, rate, format="FLAC")
    stereo_44k = audio_root / "stereo_44k.wav"
    resampled = librosa.resample(samples, orig_sr=rate, target_sr=44100)
    soundfile.write(stereo_44k, np.stack([resampled, resampled], axis=1), 44100)

    rows = pd.DataFrame(
        {
            PATH_COLUMN: [str(clip), None, str(stereo_44k)],
            BASE64_COLUMN: [None, base64.b64encode(flac.getvalue()).decode(), None],
        }
    )
    output = model.predict(rows)
    assert len(output) == 3
    # FLAC is lossless: exactly the WAV's answer. The 44.1 kHz stereo copy is resampled back,
    # so close to it, not equal.
    probabilities = output[PROBABILITIES].astype(float)
    np.testing.assert_allclose(probabilities.iloc[1], probabilities.iloc[0])
    np.testing.assert_allclose(probabilities.iloc[2], probabilities.iloc[0], atol=0.15)
    assert np.allclose(probabilities.sum(axis=1), 1.0)


def _short_wav(seconds: float) -> bytes:
    buffer = io.BytesIO()
    tone = np.sin(np.linspace(0, 2000, int(22050 * seconds))).astype(np.float32)
    soundfile.write(buffer, tone, 22050, format="WAV")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def bad_files(audio_root):
    folder = audio_root / "bad"
    folder.mkdir()
    (folder / "empty.wav").write_bytes(b"")
    (folder / "notes.wav").write_text("these are not audio samples\n")
    (folder / "short.wav").write_bytes(_short_wav(1.0))
    return folder


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ({PATH_COLUMN: "{folder}/empty.wav"}, "empty file (0 bytes)"),
        ({PATH_COLUMN: "{folder}/notes.wav"}, "not decodable as audio"),
        ({PATH_COLUMN: "{folder}/missing.wav"}, "no readable regular audio file at this path"),
        ({PATH_COLUMN: "{folder}/short.wav"}, "1.00 s of audio is shorter than one 3 s segment"),
        ({BASE64_COLUMN: "not base64 at all!"}, "is not valid base64"),
        ({BASE64_COLUMN: base64.b64encode(b"RIFF....WAVE").decode()}, "not decodable as audio"),
        ({BASE64_COLUMN: ""}, "give exactly one of audio_path or audio_base64 (neither given)"),
        ({PATH_COLUMN: "{folder}/short.wav", BASE64_COLUMN: "AAAA"}, "(both given)"),
        ({"audio": "x.wav"}, "has no audio_path or audio_base64 column"),
    ],
)
def test_bad_input_gets_a_clear_invalid_parameter_error(served, bad_files, row, problem):
    _, model = served
    row = {key: value.format(folder=bad_files) for key, value in row.items()}
    with pytest.raises(MlflowException) as caught:
        model.predict(pd.DataFrame([row]))
    assert caught.value.error_code == "INVALID_PARAMETER_VALUE"
    assert problem in caught.value.message
    if set(row) == {PATH_COLUMN} and "missing" not in row[PATH_COLUMN]:
        assert row[PATH_COLUMN] in caught.value.message  # the message names the file


def test_every_bad_row_of_a_request_is_reported(served, bad_files, clip):
    _, model = served
    rows = pd.DataFrame(
        {PATH_COLUMN: [str(clip), str(bad_files / "empty.wav"), str(bad_files / "short.wav")]}
    )
    with pytest.raises(MlflowException) as caught:
        model.predict(rows)
    assert "row 1" in caught.value.message and "empty file" in caught.value.message
    assert "row 2" in caught.value.message and "shorter than one" in caught.value.message
    assert "row 0" not in caught.value.message


def test_oversized_uploads_are_refused(served, audio_root):
    _, model = served  # logged with max_upload_mib=2
    large = os.urandom(3 * 2**20)
    with pytest.raises(MlflowException, match=r"exceeds the limit of 2 MiB"):
        model.predict(pd.DataFrame({BASE64_COLUMN: [base64.b64encode(large).decode()]}))
    big_file = audio_root / "big.wav"
    big_file.write_bytes(large)
    with pytest.raises(MlflowException, match=r"big.wav: file of 3.0 MiB exceeds the limit"):
        model.predict(pd.DataFrame({PATH_COLUMN: [str(big_file)]}))


def test_operational_settings_can_be_overridden_when_loading(served, clip):
    uri, _ = served
    strict = mlflow.pyfunc.load_model(uri, model_config={"allow_audio_path": False})
    with pytest.raises(MlflowException, match="audio_path is switched off"):
        strict.predict(pd.DataFrame({PATH_COLUMN: [str(clip)]}))
    assert len(strict.predict(pd.DataFrame({BASE64_COLUMN: [_base64(clip)]}))) == 1
    # Audio longer than max_audio_seconds is refused from its header, before decoding.
    brief = mlflow.pyfunc.load_model(uri, model_config={"max_audio_seconds": 5})
    with pytest.raises(MlflowException, match=r"30 s of audio is longer than the limit of 5 s"):
        brief.predict(pd.DataFrame({BASE64_COLUMN: [_base64(clip)]}))


def test_decode_base64_accepts_line_breaks_and_data_uri():
    payload = os.urandom(300)
    text = base64.encodebytes(payload).decode()  # wrapped at 76 characters
    assert "\n" in text.strip()
    assert decode_base64_audio(text, 2**20) == payload
    assert decode_base64_audio("data:audio/wav;base64," + text, 2**20) == payload
    with pytest.raises(ValueError, match="exceeds the limit"):
        decode_base64_audio(text, 100)


def test_spec_round_trips_and_rejects_an_unknown_level():
    spec = ServingSpec("xgboost", "xgboost", "clip", tuple(GENRES), REFERENCE_SETTINGS.to_dict())
    assert ServingSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert spec.settings == REFERENCE_SETTINGS
    with pytest.raises(ValueError, match="level"):
        ServingSpec("x", "sklearn", "song", tuple(GENRES), {})


def test_example_clip_is_one_segment_long_after_resampling():
    settings = REFERENCE_SETTINGS
    waveform = load_waveform(synthetic_example_clip(settings), settings.sample_rate)
    assert len(waveform) >= segment_samples(settings)


# --- the served endpoint -----------------------------------------------------------------------


def _post(url: str, body: str | dict) -> requests.Response:
    data = body if isinstance(body, str) else json.dumps(body)
    return requests.post(url, data=data, headers={"Content-Type": "application/json"}, timeout=60)


@pytest.mark.slow
@pytest.mark.network
def test_mlflow_models_serve_classifies_audio_and_rejects_bad_input(
    served, store, clip, bad_files, tmp_path
):
    model_uri, _ = served
    name = "gtzan-serving-test"
    version = mlflow.register_model(model_uri, name)
    mlflow.MlflowClient().set_registered_model_alias(name, "champion", version.version)

    serve = ["serve", "-m", f"models:/{name}@champion", "--env-manager", "local"]
    env = clean_env(MLFLOW_TRACKING_URI=store)
    with mlflow_server("models", serve, tmp_path / "serve.log", env) as base:
        good = {"dataframe_split": {"columns": [BASE64_COLUMN], "data": [[_base64(clip)]]}}
        answer = _post(f"{base}/invocations", good)
        assert answer.status_code == 200, answer.text
        predictions = answer.json()["predictions"]
        assert len(predictions) == 1
        assert list(predictions[0]) == output_columns(GENRES)
        assert predictions[0]["genre"] in GENRES
        assert sum(predictions[0][f"prob_{genre}"] for genre in GENRES) == pytest.approx(1.0)
        (tmp_path / "response.json").write_text(answer.text)

        by_path = _post(f"{base}/invocations", {"dataframe_records": [{PATH_COLUMN: str(clip)}]})
        assert by_path.status_code == 200 and by_path.json() == answer.json()
        # The request parameter adds the timeline: ten 3 s segments of a 30 s clip.
        timeline = _post(f"{base}/invocations", {**good, "params": {"timeline": True}})
        assert timeline.status_code == 200, timeline.text
        assert len(timeline.json()["predictions"][0]["timeline"]) == 10

        short = base64.b64encode(_short_wav(1.0)).decode()
        bad_requests = {
            "empty file": {"dataframe_records": [{PATH_COLUMN: str(bad_files / "empty.wav")}]},
            "not audio": {"dataframe_records": [{PATH_COLUMN: str(bad_files / "notes.wav")}]},
            "short clip": {"dataframe_records": [{BASE64_COLUMN: short}]},
            "oversized": {
                "dataframe_records": [
                    {BASE64_COLUMN: base64.b64encode(os.urandom(3 * 2**20)).decode()}
                ]
            },
            "malformed json": '{"dataframe_split": {"columns": ',
            "unknown format": {"clips": [str(clip)]},
            "probing": {"dataframe_records": [{PATH_COLUMN: "~nosuchuser/x.wav"}]},
            "too many rows": {"dataframe_records": [{BASE64_COLUMN: short}] * 9},
        }
        expected = {
            "empty file": "empty file (0 bytes)",
            "not audio": "not decodable as audio",
            "short clip": "shorter than one 3 s segment",
            "oversized": "exceeds the limit of 2 MiB",
            "malformed json": "valid JSON",
            "unknown format": "dataframe_split",
            "probing": "no readable regular audio file at this path",
            "too many rows": "9 rows exceed the limit of 8",
        }
        for case, body in bad_requests.items():
            response = _post(f"{base}/invocations", body)
            assert 400 <= response.status_code < 500, (case, response.status_code, response.text)
            assert expected[case] in response.json()["message"], (case, response.text)
            assert "stack_trace" not in response.json() and "Traceback" not in response.text
            # The server keeps serving after each bad request.
            assert _post(f"{base}/invocations", good).json() == answer.json(), case


# --- bounded work: decompression bombs are refused from their headers ------------------------


def _predict_peak(model, rows: pd.DataFrame) -> tuple[MlflowException, int]:
    """The error of a refused request and the peak bytes allocated while refusing it."""
    import tracemalloc

    tracemalloc.start()
    try:
        with pytest.raises(MlflowException) as caught:
            model.predict(rows)
        return caught.value, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.fixture(scope="module")
def roomy(served):
    """The served model with room for the bombs' bytes: only their headers can refuse them."""
    return mlflow.pyfunc.load_model(served[0], model_config={"max_upload_mib": 10})


@pytest.mark.parametrize(
    ("bomb", "problem", "decoded_mib"),
    [
        (lambda: flac_of_zeros(655350, 8, 60), "655350 Hz exceeds the limit of 192000 Hz", 1200),
        (
            lambda: flac_of_zeros(655350, 8, 2, claim_seconds=590),
            "655350 Hz exceeds the limit",
            11800,
        ),
        (
            lambda: flac_of_zeros(192000, 8, 2, claim_seconds=590),
            "more than the limit of 256 MiB",
            3457,
        ),
        (lambda: flac_of_zeros(48000, 2, 2, claim_seconds=3000), "longer than the limit", 1098),
        (lambda: ogg_of_zeros(255), "255 channels exceed the limit of 8", 86),
    ],
    ids=[
        "flac-655kHz-8ch-60s",
        "flac-claims-590s",
        "flac-192kHz-decodes-3GiB",
        "50min",
        "ogg-255ch",
    ],
)
def test_decompression_bombs_are_refused_before_decoding(roomy, bomb, problem, decoded_mib):
    data = bomb()
    assert len(data) < 400 * 2**10  # small uploads, all of them
    rows = pd.DataFrame({BASE64_COLUMN: [base64.b64encode(data).decode()]})
    error, peak = _predict_peak(roomy, rows)
    assert error.error_code == "INVALID_PARAMETER_VALUE"
    assert problem in error.message
    # Refused from the header: what was allocated is the upload's copies, not the samples.
    assert peak < 8 * 2**20 and peak < decoded_mib * 2**20 / 10


def test_many_rows_of_bombs_are_refused_by_the_row_limit(roomy):
    bomb = base64.b64encode(flac_of_zeros(192000, 8, 1, claim_seconds=590)).decode()
    error, peak = _predict_peak(roomy, pd.DataFrame({BASE64_COLUMN: [bomb] * 50}))
    assert "50 rows exceed the limit of 8 songs per request" in error.message
    assert peak < 2**20  # nothing of any row was decoded
    error, _ = _predict_peak(roomy, pd.DataFrame({BASE64_COLUMN: [bomb] * 8}))
    assert error.message.count("more than the limit of 256 MiB") == 8  # every row reported


def test_a_request_larger_than_its_limit_is_refused(served):
    tight = mlflow.pyfunc.load_model(
        served[0], model_config={"max_request_mib": 1, "max_upload_mib": 1}
    )
    rows = pd.DataFrame({BASE64_COLUMN: [base64.b64encode(os.urandom(600 * 2**10)).decode()] * 2})
    with pytest.raises(MlflowException, match=r"about 1.2 MiB, exceeds the limit of 1 MiB"):
        tight.predict(rows)


def test_decoding_down_mixes_block_by_block(tmp_path):
    """Memory follows the mono output: 8 channels decode in about the mono size, not 8 times."""
    import tracemalloc

    from gtzan_mlops.data.audio import decode_audio

    rate, seconds = 22050, 60
    path = tmp_path / "eight.wav"
    rng = np.random.default_rng(0)
    soundfile.write(path, rng.uniform(-0.5, 0.5, (rate * seconds, 8)).astype(np.float32), rate)
    tracemalloc.start()
    decoded = decode_audio(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    mono_bytes = rate * seconds * 4
    assert decoded.channels == 8 and len(decoded.waveform) == rate * seconds
    assert peak < 3 * mono_bytes  # a whole 8-channel decode would be 8 x mono_bytes
    expected = soundfile.read(path, dtype="float32")[0].mean(axis=1, dtype=np.float32)
    np.testing.assert_array_equal(decoded.waveform, expected)


def test_concurrent_requests_decode_at_most_the_limit_at_once(served, clip, monkeypatch):
    import threading
    import time

    from gtzan_mlops.serving import pyfunc

    model = mlflow.pyfunc.load_model(served[0], model_config={"max_concurrent_decodes": 2})
    active, most, lock = [0], [0], threading.Lock()
    real_decode = pyfunc.decode_audio
    workers: set[str] = set()

    def slow_decode(*args, **kwargs):
        with lock:
            workers.add(threading.current_thread().name)
            active[0] += 1
            most[0] = max(most[0], active[0])
        time.sleep(0.3)
        try:
            return real_decode(*args, **kwargs)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(pyfunc, "decode_audio", slow_decode)
    rows = pd.DataFrame({BASE64_COLUMN: [_base64(clip)]})
    threads = [threading.Thread(target=model.predict, args=(rows,)) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most[0] == 2
    # Five request threads, but the songs were decoded (and classified) in the model's own two
    # long-lived threads, whose per-thread memory (TensorFlow's, glibc's) is bounded by them.
    assert len(workers) == 2 and all(name.startswith("gtzan-classify") for name in workers)


def test_work_stops_at_the_servers_request_timeout(served, clip, monkeypatch):
    """Past MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT the client has had its 504: the work stops
    (503), and a request that cannot get a decoding slot in time is told the server is busy."""
    _, model = served
    rows = pd.DataFrame({BASE64_COLUMN: [_base64(clip)]})
    monkeypatch.setenv("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT", "0")
    with pytest.raises(MlflowException, match="longer than the server's request timeout") as late:
        model.predict(rows)
    assert late.value.get_http_status_code() == 503

    monkeypatch.setenv("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT", "0.2")
    busy = mlflow.pyfunc.load_model(served[0], model_config={"max_concurrent_decodes": 1})
    slots = busy.unwrap_python_model()._decoding
    slots.acquire()  # another request holds the only slot
    try:
        with pytest.raises(MlflowException, match="the server is busy") as refused:
            busy.predict(rows)
        assert refused.value.get_http_status_code() == 429
    finally:
        slots.release()


# --- the quality gates of the pipeline, at serving time ---------------------------------------


def test_silent_audio_is_refused_and_truncation_is_reported(served, clip):
    _, model = served
    silence = io.BytesIO()
    soundfile.write(silence, np.zeros(22050 * 30, dtype=np.float32), 22050, format="WAV")
    with pytest.raises(MlflowException, match=r"silent: peak 0, silence_peak is 0.0001"):
        model.predict(
            pd.DataFrame({BASE64_COLUMN: [base64.b64encode(silence.getvalue()).decode()]})
        )

    whole = clip.read_bytes()
    cut = whole[: len(whole) // 3]  # a WAV cut at 10 s: its header still promises 30 s
    output = model.predict(pd.DataFrame({BASE64_COLUMN: [base64.b64encode(cut).decode()]}))
    assert output.loc[0, "warning"].startswith("truncated: header promises 661794 frames")
    assert model.predict(pd.DataFrame({BASE64_COLUMN: [_base64(clip)]})).loc[0, "warning"] is None


def test_an_unexpected_failure_is_a_500_without_trace_or_paths(served, clip, monkeypatch):
    from gtzan_mlops.serving import pyfunc

    def broken(*args, **kwargs):
        raise RuntimeError(f"boom in {pyfunc.__file__}")

    monkeypatch.setattr(pyfunc, "classify_song", broken)
    _, model = served
    with pytest.raises(MlflowException) as caught:
        model.predict(pd.DataFrame({BASE64_COLUMN: [_base64(clip)]}))
    assert caught.value.error_code == "INTERNAL_ERROR"
    body = caught.value.serialize_as_json()
    assert "Traceback" not in body and "stack_trace" not in body
    assert pyfunc.__file__ not in body and "/" not in json.loads(body)["message"]


# --- audio_path reads only under the audio root, and cannot be used to probe -----------------


def test_audio_path_is_off_by_default(classifier_uri, clip):
    model = mlflow.pyfunc.load_model(log_served(classifier_uri))
    with pytest.raises(MlflowException, match="audio_path is switched off on this server"):
        model.predict(pd.DataFrame({PATH_COLUMN: [str(clip)]}))


def test_audio_path_refusals_are_indistinguishable(served, audio_root, tmp_path_factory):
    _, model = served
    outside = tmp_path_factory.mktemp("outside-the-root")
    (outside / "notes.txt").write_text("not audio\n")
    (audio_root / "escape.wav").symlink_to(outside / "notes.txt")
    fifo = audio_root / "pipe.wav"
    os.mkfifo(fifo)
    probes = [
        str(outside / "notes.txt"),  # an existing non-audio file, outside the root
        str(audio_root / "missing.wav"),
        "/etc/passwd",
        "../" * 12 + "etc/passwd",
        "bad/../../" + outside.name + "/notes.txt",
        "escape.wav",  # a symlink out of the root
        "~root/x.wav",
        "~nosuchuser/x.wav",
        "pipe.wav",  # a FIFO under the root
        "/dev/zero",
        str(audio_root),  # a folder
    ]
    messages = set()
    for path in probes:
        with pytest.raises(MlflowException) as caught:
            model.predict(pd.DataFrame({PATH_COLUMN: [path]}))
        assert caught.value.error_code == "INVALID_PARAMETER_VALUE", path
        messages.add(caught.value.message)
    assert messages == {
        "row 0: audio_path: no readable regular audio file at this path under the server's "
        "audio folder"
    }


# --- whole songs --------------------------------------------------------------------------------


def test_song_windows_cover_the_song_then_space_out():
    from gtzan_mlops.serving.windows import song_windows

    settings = REFERENCE_SETTINGS
    rate = 1000
    assert song_windows(30_013, rate, settings, "segment", 100) == [(0, 30_013)]
    assert song_windows(65_000, rate, settings, "segment", 100) == [
        (0, 30_000), (30_000, 60_000), (60_000, 65_000)
    ]  # fmt: skip
    assert song_windows(61_000, rate, settings, "segment", 100) == [(0, 30_000), (30_000, 61_000)]
    assert song_windows(65_000, rate, settings, "clip", 100)[-1] == (35_000, 65_000)
    spaced = song_windows(3_600_000, rate, settings, "segment", 100)  # an hour, 10 excerpts
    assert len(spaced) == 10 and spaced[0] == (0, 30_000) and spaced[-1] == (3_570_000, 3_600_000)


def _concatenated_song(gtzan_mini: Path, genres: list[str]) -> str:
    """The base64 FLAC of real 30 s clips back to back, one of each genre listed in turn (the
    n-th clip of a genre is its n-th file, cycling)."""
    parts = []
    for position, genre in enumerate(genres):
        files = sorted((gtzan_mini / "genres" / genre).glob("*.wav"))
        index = genres[:position].count(genre) % len(files)
        parts.append(load_waveform(files[index], 22050)[: 30 * 22050])
    song = io.BytesIO()
    soundfile.write(song, np.concatenate(parts), 22050, format="FLAC")
    return base64.b64encode(song.getvalue()).decode()


def test_a_long_song_of_two_genres_shows_both_on_its_timeline(served, gtzan_mini):
    """Three classical clips then three metal clips as one 3 min song: the answer covers the
    whole song and the timeline shows where it changes."""
    model = mlflow.pyfunc.load_model(served[0], model_config={"max_upload_mib": 20})
    song = _concatenated_song(gtzan_mini, ["classical"] * 3 + ["metal"] * 3)
    rows = pd.DataFrame({BASE64_COLUMN: [song]})

    plain = model.predict(rows)
    assert list(plain.columns) == output_columns(GENRES)  # no timeline unless asked
    output = model.predict(rows, params={"timeline": True})
    timeline = output.loc[0, "timeline"]
    assert len(timeline) == 60  # every 3 s segment of 180 s
    assert [segment["start_s"] for segment in timeline[:2]] == [0.0, 3.0]
    first, second = timeline[:30], timeline[30:]
    assert sum(s["genre"] == "classical" for s in first) > 20
    assert sum(s["genre"] == "metal" for s in second) > 20
    mean = np.mean([[s["probabilities"][g] for g in GENRES] for s in timeline], axis=0)
    np.testing.assert_allclose(output.loc[0, PROBABILITIES].to_numpy(float), mean)

    capped = mlflow.pyfunc.load_model(
        served[0], model_config={"max_upload_mib": 20, "max_segments": 20}
    )
    spaced = capped.predict(rows, params={"timeline": True}).loc[0, "timeline"]
    assert len(spaced) == 20 and spaced[-1]["end_s"] == pytest.approx(180.0)


def test_serving_limits_come_from_params_and_reject_mistakes(repo_root):
    """A served model's config is params.yaml's `serving` with the `data` gates, checked by the
    same model: a mistake is refused in params.yaml and in a logged model's config alike."""
    from gtzan_mlops.serving.limits import read_served_config
    from gtzan_mlops.settings.loading import ConfigError, read_params, validate_settings
    from gtzan_mlops.settings.schema import ServedConfig

    raw = read_params(repo_root / "params.yaml")
    settings = validate_settings(raw)
    limits = ServedConfig.of(settings.serving, settings.data)
    assert limits.max_rows == settings.serving.max_rows
    assert limits.silence_peak == settings.data.silence_peak  # one set of quality gates
    assert not limits.allow_audio_path
    assert read_served_config(limits.model_dump()) == limits
    for key, value, problem in [
        ("max_rowz", 3, "serving.max_rowz: unknown setting"),
        ("max_rows", "8", "max_rows must be a number"),
        ("max_rows", 0, "max_rows must be at least 1"),
        ("allow_audio_path", True, "allow_audio_path needs an audio_root"),
    ]:
        with pytest.raises(ConfigError, match=problem):
            read_served_config({**limits.model_dump(), key: value})
        with pytest.raises(ConfigError, match="serving"):  # params.yaml's own check
            validate_settings({**raw, "serving": {**raw["serving"], key: value}})


# --- the proxy in front of a public endpoint ----------------------------------------------------


def _proxy_body_limit_mib(repo_root: Path) -> int:
    import re

    text = (repo_root / "deploy" / "nginx.conf").read_text()
    return int(re.search(r"^\s*client_max_body_size (\d+)m;", text, re.MULTILINE).group(1))


def test_the_proxy_body_limit_matches_the_request_limit(repo_root):
    from gtzan_mlops.settings.loading import load_settings

    request_mib = load_settings(repo_root / "params.yaml").serving.max_request_mib
    base64_mib = request_mib * 4 / 3
    assert base64_mib <= _proxy_body_limit_mib(repo_root) <= base64_mib + 8


def _status_of_headers_only(port: int, length: int) -> int:
    """Announce a body of `length` bytes and send none of it: the proxy's answer's status."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(
            f"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n".encode()
        )
        return int(connection.recv(200).split(b" ", 2)[1])


@pytest.mark.slow
@pytest.mark.network
def test_the_nginx_proxy_bounds_the_body_before_the_model_server(
    served, store, clip, tmp_path, repo_root
):
    import getpass
    import subprocess
    import time

    from live_services import free_port, stop_process

    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        pytest.fail("nginx is missing: run .ci/system-packages.sh")
    model_uri, _ = served
    serve = ["serve", "-m", model_uri, "--env-manager", "local"]
    with mlflow_server(
        "models", serve, tmp_path / "serve.log", clean_env(MLFLOW_TRACKING_URI=store)
    ) as base:
        model_port, proxy_port = int(base.rsplit(":", 1)[1]), free_port()
        config = (repo_root / "deploy" / "nginx.conf").read_text()
        config = config.replace("server 127.0.0.1:5001;", f"server 127.0.0.1:{model_port};")
        config = config.replace("listen 127.0.0.1:8080;", f"listen 127.0.0.1:{proxy_port};")
        if os.geteuid() == 0:  # as root, nginx's workers would switch to a user without access
            config = f"user {getpass.getuser()};\n" + config
        prefix = tmp_path / "nginx"
        prefix.mkdir()
        (prefix / "nginx.conf").write_text(config)
        log = (tmp_path / "nginx.log").open("w")
        proxy = subprocess.Popen(
            [nginx, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-g", "daemon off;"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            url = f"http://127.0.0.1:{proxy_port}"
            for _ in range(100):
                try:
                    if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                        break
                except requests.ConnectionError:
                    time.sleep(0.1)
            good = {"dataframe_split": {"columns": [BASE64_COLUMN], "data": [[_base64(clip)]]}}
            answer = _post(f"{url}/invocations", good)
            assert answer.status_code == 200, answer.text
            assert answer.json() == _post(f"{base}/invocations", good).json()
            # A body over the limit is refused from its Content-Length, before it is sent.
            limit = _proxy_body_limit_mib(repo_root) * 2**20
            assert _status_of_headers_only(proxy_port, 300 * 2**20) == 413
            assert _status_of_headers_only(proxy_port, limit + 1) == 413
            assert requests.get(f"{url}/version", timeout=5).status_code == 404
            # Only JSON passes: a parquet bomb or CSV never reaches MLflow's parsers.
            for content_type, body in [
                ("application/x-parquet", _parquet_bomb(rows=8, mib_per_row=4)),
                ("text/csv", b'audio_base64\n"UklGR'),
                ("application/json-seq", b"{}"),
            ]:
                refused = requests.post(
                    f"{url}/invocations", data=body, headers={"Content-Type": content_type}
                )
                assert refused.status_code == 415, (content_type, refused.text)
                assert refused.json()["message"].startswith("the body must be JSON")
            charset = {"Content-Type": "application/json; charset=utf-8"}
            with_charset = requests.post(f"{url}/invocations", json=good, headers=charset)
            assert with_charset.json() == answer.json()
            assert _post(f"{url}/invocations", good).json() == answer.json()
        finally:
            stop_process(proxy)
            log.close()


@contextlib.contextmanager
def _gtzan_serve(
    model_uri: str, store: str, log_path: Path, model_config: dict | None = None
) -> Iterator[str]:
    """`gtzan-mlops serve` with only the system's PATH, as from a fresh shell."""
    from live_services import gtzan_serve

    env = clean_env(MLFLOW_TRACKING_URI=store, PATH="/usr/bin:/bin")
    if model_config:
        env["SERVING_MODEL_CONFIG"] = json.dumps(model_config)
    with gtzan_serve(model_uri, env, log_path) as base:
        yield base


def _parquet_bomb(rows: int, mib_per_row: int) -> bytes:
    """A parquet file of `rows` strings of `mib_per_row` MiB each, compressed to a few KiB."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    column = pa.array(["A" * (mib_per_row * 2**20)] * rows)
    buffer = io.BytesIO()
    pq.write_table(pa.table({BASE64_COLUMN: column}), buffer, compression="zstd")
    return buffer.getvalue()


@pytest.mark.slow
@pytest.mark.network
def test_gtzan_mlops_serve_refuses_hostile_bodies_small_and_plain(served, store, clip, tmp_path):
    """The README's serve command, from a fresh shell: a good request is answered; bodies MLflow
    would expand, echo or answer with a trace are refused before it parses them, in a few
    hundred bytes."""
    good = {"dataframe_split": {"columns": [BASE64_COLUMN], "data": [[_base64(clip)]]}}
    bomb = _parquet_bomb(rows=8, mib_per_row=4)
    assert len(bomb) < 64 * 2**10
    hostile = {
        "parquet bomb": (bomb, "application/x-parquet", 415, "the body must be JSON"),
        "csv, unterminated quote": (b'audio_base64\n"UklGR', "text/csv", 415, "must be JSON"),
        # Read and dropped before the answer: the client, still sending, gets the 415.
        "20 MiB of csv": (b"a\n" + b"x" * (20 * 2**20), "text/csv", 415, "must be JSON"),
        "60 MiB of malformed JSON": (
            b'{"dataframe_split": ' + b"A" * (60 * 2**20), "application/json", 400,
            "not valid JSON: Expecting value at line 1 column 21",
        ),
        "20 MiB of non-UTF-8": (b"\xff" * (20 * 2**20), "application/json", 400, "not UTF-8"),
        "JSON 100,000 deep": (b"[" * 100_000 + b"]" * 100_000, "application/json", 400, "deeply"),
        "a bad params value": (
            json.dumps({**good, "params": {"timeline": "A" * 10_000}}).encode(),
            "application/json", 400, "params.timeline must be a JSON boolean",
        ),
    }  # fmt: skip
    with _gtzan_serve(served[0], store, tmp_path / "serve.log") as base:
        url = f"{base}/invocations"
        answer = _post(url, good)
        assert answer.status_code == 200, answer.text
        for case, (body, content_type, status, message) in hostile.items():
            response = requests.post(
                url, data=body, headers={"Content-Type": content_type}, timeout=60
            )
            assert response.status_code == status, (case, response.text[:300])
            assert message in response.json()["message"], case
            assert len(response.content) < 400, case  # no echo, no trace, no path
            assert "stack_trace" not in response.text
            assert not re.search(r"/[\w.-]+/", response.text), case  # no server path
        assert _post(url, good).json() == answer.json()


# Wall-clock bounds: run without the other worker's load (make test runs `-m timing` serially).
@pytest.mark.timing
@pytest.mark.slow
@pytest.mark.network
def test_gtzan_mlops_serve_refuses_early_under_overload_and_stops_late_work(
    served, store, gtzan_mini, tmp_path
):
    """With one slot: a long song holds it past its time budget and gets the model's 503 (not
    MLflow's 504, which comes later), while the requests behind it get 429 with Retry-After as
    soon as their queue wait runs out, not when the slot frees."""
    import concurrent.futures
    import time

    song = _concatenated_song(gtzan_mini, ["classical"] * 10)  # 5 min: ~10 windows of work
    body = {"dataframe_split": {"columns": [BASE64_COLUMN], "data": [[song]]}}
    config = {
        "max_concurrent_decodes": 1,
        "max_queue_wait_s": 0.5,
        "request_timeout_s": 1.5,
        "max_upload_mib": 50,
    }
    with _gtzan_serve(served[0], store, tmp_path / "serve.log", config) as base:
        url = f"{base}/invocations"

        def timed_post(delay_s: float) -> tuple[requests.Response, float]:
            time.sleep(delay_s)
            started = time.monotonic()
            return _post(url, body), time.monotonic() - started

        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            first = pool.submit(timed_post, 0.0)
            behind = [pool.submit(timed_post, 0.2) for _ in range(2)]
            (late, late_s), refused = first.result(), [f.result() for f in behind]
        assert late.status_code == 503, late.text
        assert "longer than the server's request timeout" in late.json()["message"]
        assert late_s < 3.0  # MLflow's backstop is 2 x 1.5 s
        for response, seconds in refused:
            assert response.status_code == 429, response.text
            assert int(response.headers["Retry-After"]) >= 1
            # At the end of the 0.5 s wait, not when the slot frees (they started 0.2 s later).
            assert 0.5 <= seconds < late_s - 0.2
