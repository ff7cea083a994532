"""The served model's answers follow the samples a file holds, and every bad file is a plain 400
naming its problem: headers that lie, encodings the decoder refuses, samples no microphone
produces, and messages that never quote the client's bytes. In process, as test_serving.py."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import soundfile
from audio_bombs import mp3_claiming, synthetic_au_with_encoding, synthetic_wav_with_format_tag
from mlflow.exceptions import MlflowException
from mlflow_helpers import log_served, log_sklearn, reference_classifier, sqlite_store

from gtzan_mlops.data.audio import decode_audio, find_truncation
from gtzan_mlops.serving.spec import BASE64_COLUMN

RATE = 22050
CLIP_FRAMES = 661794  # jazz.00001.wav: 30.01 s


@pytest.fixture(scope="module")
def model(tmp_path_factory, reference_table):
    """The serving pyfunc of a segment-level model on the real reference features, loaded as
    `mlflow models serve` loads it; room for 30 s of float WAV in one upload."""
    with sqlite_store(tmp_path_factory.mktemp("audio-inputs-store")):
        classifier_uri = log_sklearn(reference_classifier(reference_table))
        yield mlflow.pyfunc.load_model(log_served(classifier_uri, max_upload_mib=10))


@pytest.fixture(scope="module")
def clip(gtzan_mini) -> Path:
    return gtzan_mini / "genres" / "jazz" / "jazz.00001.wav"


@pytest.fixture(scope="module")
def lame() -> str:
    path = shutil.which("lame")
    if path is None:
        pytest.fail("lame is missing: run .ci/system-packages.sh")
    return path


@pytest.fixture(scope="module")
def mp3(lame, clip, tmp_path_factory) -> bytes:
    """The real clip as LAME's VBR MP3, whose first frame is a Xing header counting its frames."""
    out = tmp_path_factory.mktemp("mp3") / "jazz.00001.mp3"
    subprocess.run([lame, "--quiet", "--vbr-new", "-V", "4", str(clip), str(out)], check=True)
    return out.read_bytes()


def _rows(data: bytes) -> pd.DataFrame:
    return pd.DataFrame({BASE64_COLUMN: [base64.b64encode(data).decode("ascii")]})


def _answer(model, data: bytes) -> pd.Series:
    return model.predict(_rows(data), params={"timeline": True}).loc[0]


def _refusal(model, data: bytes) -> str:
    with pytest.raises(MlflowException) as caught:
        model.predict(_rows(data))
    assert caught.value.error_code == "INVALID_PARAMETER_VALUE", caught.value.message
    return caught.value.message


def _encoded(samples: np.ndarray, audio_format: str, subtype: str | None = None) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, RATE, format=audio_format, subtype=subtype)
    return buffer.getvalue()


# --- the answer follows the samples, not the header ---------------------------------------------


def test_an_mp3_whose_header_claims_899_s_is_answered_on_its_30_s(model, mp3):
    lying = mp3_claiming(mp3, 899)
    assert soundfile.info(io.BytesIO(lying)).duration > 898  # what the header claims
    answer = _answer(model, lying)
    timeline = answer["timeline"]
    assert len(timeline) == 10 and timeline[-1]["end_s"] <= 30.1
    assert answer["warning"].startswith("truncated: header promises 1982")  # ~19.8 M frames
    honest = _answer(model, mp3)
    assert honest["warning"] is None and len(honest["timeline"]) == 10
    assert answer["genre"] == honest["genre"]


def test_decoding_keeps_only_what_an_over_claiming_header_file_holds(mp3):
    decoded = decode_audio(mp3_claiming(mp3, 899))
    assert abs(len(decoded.waveform) - CLIP_FRAMES) < 1200  # gapless trimming aside
    # Its own array, not a view of the 75 MiB the header asked for.
    assert decoded.waveform.base is None and decoded.waveform.nbytes < 3 * 2**20
    assert decoded.truncation.held_frames == len(decoded.waveform)


@pytest.mark.parametrize("audio_format", ["FLAC", "WAV", "AIFF", "MP3"])
def test_a_file_cut_short_is_classified_on_what_it_holds_with_a_warning(
    model, clip, mp3, audio_format
):
    whole = mp3 if audio_format == "MP3" else _encoded(soundfile.read(clip)[0], audio_format)
    cut = whole[: len(whole) * 3 // 5]  # the end of an interrupted upload lost
    answer = _answer(model, cut)
    held = answer["timeline"][-1]["end_s"]
    assert 10 < held < 25
    assert answer["warning"].startswith(f"truncated: header promises {CLIP_FRAMES} frames")
    # The pipeline's fetch finds the same shortfall (its manifest status).
    assert find_truncation(cut).promised_frames == CLIP_FRAMES


def test_files_without_a_stated_length_get_no_warning(model, lame, clip, tmp_path):
    """An MP3 without a Xing header states no frame count: libsndfile's estimate from the file
    size is no promise (it overshoots this file by 0.07 s). IMA and MS ADPCM WAV decode."""
    untagged = tmp_path / "untagged.mp3"
    subprocess.run([lame, "--quiet", "-b", "128", "-t", str(clip), str(untagged)], check=True)
    samples = soundfile.read(clip)[0]
    for data in (
        untagged.read_bytes(),
        _encoded(samples, "WAV", "IMA_ADPCM"),
        _encoded(samples, "WAV", "MS_ADPCM"),
    ):
        answer = _answer(model, data)
        assert answer["warning"] is None and len(answer["timeline"]) == 10


# --- encodings the decoder refuses are named ----------------------------------------------------

_SYNTHETIC_PAYLOAD = np.random.default_rng(0).integers(0, 256, 65 * 200, np.uint8).tobytes()


@pytest.mark.parametrize(
    ("data", "encoding"),
    [
        # With the 2 extra bytes GSM needs (samples per block) libsndfile opens it, as a stream.
        (
            synthetic_wav_with_format_tag(0x0031, 8000, _SYNTHETIC_PAYLOAD, b"\x02\x00\x40\x01"),
            "GSM 6.10 WAV",
        ),
        # Without them libsndfile cannot open it at all: the header names it.
        (synthetic_wav_with_format_tag(0x0031, 8000, _SYNTHETIC_PAYLOAD), "GSM 6.10 WAV"),
        (synthetic_wav_with_format_tag(0x0040, 8000, _SYNTHETIC_PAYLOAD), "G.721 ADPCM WAV"),
        (synthetic_au_with_encoding(23, 8000, _SYNTHETIC_PAYLOAD), "G.721 ADPCM AU"),
        (synthetic_au_with_encoding(24, 8000, _SYNTHETIC_PAYLOAD), "G.722 ADPCM AU"),
        (synthetic_au_with_encoding(25, 8000, _SYNTHETIC_PAYLOAD), "G.723 ADPCM (3-bit) AU"),
        (synthetic_au_with_encoding(26, 8000, _SYNTHETIC_PAYLOAD), "G.723 ADPCM (5-bit) AU"),
    ],
    ids=["gsm-wav", "gsm-wav-bare-fmt", "g721-wav", "g721-au", "g722-au", "g723-au", "g723-5-au"],
)
def test_an_encoding_the_decoder_refuses_is_named(model, data, encoding):
    message = _refusal(model, data)
    assert message == (
        f"row 0: {BASE64_COLUMN}[0]: {encoding} is not supported; "
        "send e.g. PCM WAV, FLAC, MP3 or Ogg"
    )


# --- samples far beyond full scale ----------------------------------------------------------------


def _beyond_full_scale(peak: str) -> str:
    return (
        f"far beyond full scale: peak {peak}, max_peak is 1000 (+60 dBFS): not audio a "
        "microphone or encoder produces"
    )


@pytest.mark.parametrize(
    ("audio_format", "spike", "peak"),
    [("WAV", None, "1e+38"), ("WAV", 1e19, "1e+19"), ("AU", 1e19, "1e+19"), ("WAV", 1e4, "1e+04")],
    ids=["synthetic-1e38-everywhere", "spike-1e19-wav", "spike-1e19-au", "spike-1e4-wav"],
)
def test_samples_far_beyond_full_scale_are_refused(model, clip, audio_format, spike, peak):
    samples = soundfile.read(clip, dtype="float32")[0]
    if spike is None:
        samples = np.full_like(samples, 1e38)  # synthetic: no real clip is this
    else:
        samples[RATE * 12] = spike  # one sample of real audio
    data = _encoded(samples, audio_format, "FLOAT")
    assert _refusal(model, data) == f"row 0: {BASE64_COLUMN}[0]: {_beyond_full_scale(peak)}"


def test_float_samples_a_little_over_full_scale_are_audio(model, clip):
    samples = soundfile.read(clip, dtype="float32")[0]
    samples *= 4 / np.abs(samples).max()  # peaks at +12 dBFS, as float files may
    answer = _answer(model, _encoded(samples, "WAV", "FLOAT"))
    assert answer["warning"] is None and len(answer["timeline"]) == 10


def test_the_pipeline_gives_such_a_clip_the_same_status(clip, tmp_path):
    from gtzan_mlops.data.manifest import ManifestGates, clip_status

    samples = soundfile.read(clip, dtype="float32")[0]
    samples[RATE * 12] = 1e19
    path = tmp_path / "synthetic-spike.00000.wav"
    soundfile.write(path, samples, RATE, subtype="FLOAT")
    gates = ManifestGates(genres=("jazz",), min_duration_s=25.0, silence_peak=1e-4, max_peak=1e3)
    _, status = clip_status(path, "jazz", gates)
    assert status == _beyond_full_scale("1e+19")


# --- messages name the row and the problem, never the client's bytes -----------------------------


def _through_the_scoring_server(model, body: dict) -> dict:
    """What `mlflow models serve` answers for `body`: its request handling (parsing, then the
    model, then the message it sends), in process."""
    from mlflow.pyfunc import scoring_server

    schema = model.metadata.get_input_schema()
    try:
        response = scoring_server.invocations(json.dumps(body), "application/json", model, schema)
    except MlflowException as error:  # the app answers these with their own status and JSON
        return {"status": error.get_http_status_code(), **json.loads(error.serialize_as_json())}
    return {"status": response.status, **json.loads(response.response)}


_SYNTHETIC_BYTES = b"synthetic client bytes, not audio " * 40


@pytest.mark.parametrize(
    ("cell", "problem"),
    [
        (base64.b64encode(_SYNTHETIC_BYTES).decode() + "!?", "is not valid base64"),
        (base64.b64encode(_SYNTHETIC_BYTES).decode(), "not decodable as audio"),
        (
            base64.b64encode(synthetic_au_with_encoding(25, 8000, _SYNTHETIC_PAYLOAD)).decode(),
            "G.723 ADPCM (3-bit) AU is not supported",
        ),
        ([base64.b64encode(_SYNTHETIC_BYTES).decode()], "must be a string, got list"),
    ],
    ids=["bad-base64", "not-audio", "refused-encoding", "wrong-type"],
)
def test_a_refusal_never_quotes_the_clients_bytes(model, cell, problem):
    body = {"dataframe_split": {"columns": [BASE64_COLUMN], "data": [[cell]]}}
    answer = _through_the_scoring_server(model, body)
    assert answer["status"] == 400
    assert answer["message"].startswith(f"row 0: {BASE64_COLUMN}[0]: ")
    assert problem in answer["message"]
    payload = cell if isinstance(cell, str) else cell[0]
    assert payload[:12] not in answer["message"]  # MLflow's wrapper quoted about 45 characters
