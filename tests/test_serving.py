"""The served model: real audio through the logged pyfunc, bad inputs, and `mlflow models serve`."""

from __future__ import annotations

import base64
import io
import json
import os
from pathlib import Path

import librosa
import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
import soundfile
from live_services import clean_env, mlflow_server
from mlflow.exceptions import MlflowException
from mlflow_helpers import GENRES, log_served, log_sklearn, reference_classifier, sqlite_store

from gtzan_mlops.audio import load_waveform
from gtzan_mlops.features import FEATURE_NAMES, FeatureSettings, extract_clip
from gtzan_mlops.serving import (
    BASE64_COLUMN,
    PATH_COLUMN,
    ServingSpec,
    decode_base64_audio,
    output_columns,
    synthetic_example_clip,
)


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
def served(classifier_uri):
    """The serving pyfunc of a segment-level model, loaded as `mlflow models serve` loads it;
    logged with its input example, so logging also ran a prediction."""
    uri = log_served(classifier_uri, level="segment", max_upload_mb=2.0, input_example=True)
    return uri, mlflow.pyfunc.load_model(uri)


@pytest.fixture(scope="module")
def clip(gtzan_mini) -> Path:
    return gtzan_mini / "genres" / "jazz" / "jazz.00001.wav"


def _base64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def test_real_clip_by_path_and_base64_matches_the_pipeline_features(served, classifier, clip):
    _, model = served
    by_path = model.predict(pd.DataFrame({PATH_COLUMN: [str(clip)]}))
    by_bytes = model.predict(pd.DataFrame({BASE64_COLUMN: [_base64(clip)]}))
    assert list(by_path.columns) == output_columns(GENRES)
    pd.testing.assert_frame_equal(by_path, by_bytes)

    # What the pipeline would compute: the same extraction, each segment classified, averaged.
    settings = FeatureSettings()
    segments = extract_clip(load_waveform(clip, settings.sample_rate), settings).segments
    assert len(segments) == 10
    expected = classifier.predict_proba(pd.DataFrame(segments, columns=FEATURE_NAMES)).mean(0)
    probabilities = by_path.iloc[0, 1:].to_numpy(dtype=float)
    np.testing.assert_allclose(probabilities, expected, rtol=1e-9)
    assert probabilities.sum() == pytest.approx(1.0)
    assert by_path.loc[0, "genre"] == GENRES[int(expected.argmax())]


def test_clip_level_model_uses_the_whole_clip_features(store, classifier, classifier_uri, clip):
    model = mlflow.pyfunc.load_model(log_served(classifier_uri, level="clip", family="clip"))
    output = model.predict(pd.DataFrame({PATH_COLUMN: [str(clip)]}))
    settings = FeatureSettings()
    features = extract_clip(load_waveform(clip, settings.sample_rate), settings).clip
    expected = classifier.predict_proba(pd.DataFrame([features], columns=FEATURE_NAMES))[0]
    np.testing.assert_allclose(output.iloc[0, 1:].to_numpy(dtype=float), expected, rtol=1e-9)


def test_lossless_and_stereo_44k_encodings_are_converted(served, clip, tmp_path):
    # 30 s of 44.1 kHz stereo is about 5 MB: above the fixture's 2 MB limit, so raise it.
    model = mlflow.pyfunc.load_model(served[0], model_config={"max_upload_mb": 10})
    samples, rate = soundfile.read(clip, dtype="float32")
    flac = io.BytesIO()
    soundfile.write(flac, samples, rate, format="FLAC")
    stereo_44k = tmp_path / "stereo_44k.wav"
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
    np.testing.assert_allclose(output.iloc[1, 1:].astype(float), output.iloc[0, 1:].astype(float))
    np.testing.assert_allclose(
        output.iloc[2, 1:].astype(float), output.iloc[0, 1:].astype(float), atol=0.15
    )
    assert np.allclose(output.iloc[:, 1:].astype(float).sum(axis=1), 1.0)


def _short_wav(seconds: float) -> bytes:
    buffer = io.BytesIO()
    tone = np.sin(np.linspace(0, 2000, int(22050 * seconds))).astype(np.float32)
    soundfile.write(buffer, tone, 22050, format="WAV")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad-audio")
    (folder / "empty.wav").write_bytes(b"")
    (folder / "notes.wav").write_text("these are not audio samples\n")
    (folder / "short.wav").write_bytes(_short_wav(1.0))
    return folder


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ({PATH_COLUMN: "{folder}/empty.wav"}, "empty file (0 bytes)"),
        ({PATH_COLUMN: "{folder}/notes.wav"}, "not decodable as audio"),
        ({PATH_COLUMN: "{folder}/missing.wav"}, "no such file"),
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
    if set(row) == {PATH_COLUMN}:
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


def test_oversized_uploads_are_refused(served, tmp_path):
    _, model = served  # logged with max_upload_mb=2
    large = os.urandom(3 * 2**20)
    with pytest.raises(MlflowException, match=r"exceeds the limit of 2 MB"):
        model.predict(pd.DataFrame({BASE64_COLUMN: [base64.b64encode(large).decode()]}))
    big_file = tmp_path / "big.wav"
    big_file.write_bytes(large)
    with pytest.raises(MlflowException, match=r"big.wav: file of 3.0 MB exceeds the limit"):
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
    spec = ServingSpec("xgboost", "xgboost", "clip", tuple(GENRES), FeatureSettings().to_dict())
    assert ServingSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert spec.settings == FeatureSettings()
    with pytest.raises(ValueError, match="level"):
        ServingSpec("x", "sklearn", "song", tuple(GENRES), {})


def test_example_clip_is_one_segment_long_after_resampling():
    settings = FeatureSettings()
    waveform = load_waveform(synthetic_example_clip(settings), settings.sample_rate)
    assert len(waveform) >= settings.segment_samples


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
        }
        expected = {
            "empty file": "empty file (0 bytes)",
            "not audio": "not decodable as audio",
            "short clip": "shorter than one 3 s segment",
            "oversized": "exceeds the limit of 2 MB",
            "malformed json": "valid JSON",
            "unknown format": "dataframe_split",
        }
        for case, body in bad_requests.items():
            response = _post(f"{base}/invocations", body)
            assert 400 <= response.status_code < 500, (case, response.status_code, response.text)
            assert expected[case] in response.json()["message"], (case, response.text)
            # The server keeps serving after each bad request.
            assert _post(f"{base}/invocations", good).json() == answer.json(), case
