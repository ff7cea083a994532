"""The behavioural gate's transforms: each gives the file it promises, decoded by soundfile as the
served model would decode it, and the MP3 one fails with a message that says what to do."""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import soundfile
from project_params import project_params
from scipy import signal

from gtzan_mlops.promotion import behaviour
from gtzan_mlops.promotion.behaviour import (
    BehaviourError,
    encode_wav,
    require_tools,
    transforms,
    unchanged_fraction,
)

SETTINGS = project_params().promote.behaviour
TRANSFORMS = {transform.name: transform for transform in transforms(SETTINGS)}
QUANTUM = 1 / 32768  # one 16-bit step as soundfile reads it


@pytest.fixture(scope="module")
def clip(gtzan_mini: Path) -> tuple[np.ndarray, int]:
    """A real 30 s GTZAN clip: mono float32 at 22050 Hz."""
    samples, rate = soundfile.read(
        gtzan_mini / "genres" / "blues" / "blues.00000.wav", dtype="float32"
    )
    assert samples.ndim == 1 and rate == 22050
    return samples, rate


@pytest.fixture(scope="module")
def mp3(clip) -> tuple[bytes, np.ndarray, int]:
    """The clip re-encoded by the MP3 transform of params.yaml, and decoded again."""
    samples, rate = clip
    data = TRANSFORMS[f"mp3_{SETTINGS.mp3_kbps}kbps"].apply(samples, rate)
    decoded, decoded_rate = soundfile.read(io.BytesIO(data), dtype="float32")
    return data, decoded, decoded_rate


def decode(data: bytes) -> tuple[np.ndarray, int]:
    return soundfile.read(io.BytesIO(data), dtype="float32")


def rms(samples: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(samples, dtype=np.float64))))


def best_lag(decoded: np.ndarray, original: np.ndarray, max_lag: int) -> int:
    """Lag (samples) by which `decoded` runs late of `original`, within +-max_lag."""
    correlation = signal.correlate(decoded, original, mode="full", method="fft")
    lags = signal.correlation_lags(len(decoded), len(original), mode="full")
    near = np.abs(lags) <= max_lag
    return int(lags[near][np.argmax(correlation[near])])


def fake_lame(folder: Path, script: str) -> Path:
    folder.mkdir()
    lame = folder / "lame"
    lame.write_text("#!/bin/sh\n" + script + "\n")
    lame.chmod(lame.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return folder


def test_transforms_follow_params():
    assert list(TRANSFORMS) == [
        "gain_-6db",
        "gain_-12db",
        "gain_-20db",
        "shift_2s",
        "resample_44100hz_2ch",
        "mp3_128kbps",
    ]
    assert TRANSFORMS["gain_-6db"].description == "turned down 6 dB"
    assert SETTINGS.min_unchanged == pytest.approx(0.9)

    other = project_params(
        {
            "promote.behaviour.gains_db": [-3.5],
            "promote.behaviour.shift_s": 0.5,
            "promote.behaviour.resample_rate": 48000,
            "promote.behaviour.resample_channels": 1,
            "promote.behaviour.mp3_kbps": 64,
        }
    ).promote.behaviour
    assert other.gains_db == [-3.5]
    assert [t.name for t in transforms(other)] == [
        "gain_-3.5db",
        "shift_0.5s",
        "resample_48000hz_1ch",
        "mp3_64kbps",
    ]


@pytest.mark.parametrize("gain_db", SETTINGS.gains_db)
def test_gain_turns_the_clip_down_by_its_decibels(clip, gain_db):
    samples, rate = clip
    decoded, decoded_rate = decode(TRANSFORMS[f"gain_{gain_db:g}db"].apply(samples, rate))
    assert decoded_rate == rate and decoded.shape == samples.shape
    ratio_db = 20 * np.log10(rms(decoded) / rms(samples))
    assert ratio_db == pytest.approx(gain_db, abs=0.05)


def test_shift_cuts_the_first_seconds(clip):
    samples, rate = clip
    decoded, decoded_rate = decode(TRANSFORMS[f"shift_{SETTINGS.shift_s:g}s"].apply(samples, rate))
    offset = round(SETTINGS.shift_s * rate)
    assert decoded_rate == rate
    assert len(decoded) == len(samples) - offset
    np.testing.assert_allclose(decoded, samples[offset:], rtol=0, atol=QUANTUM)


def test_resample_gives_identical_channels_at_the_new_rate(clip):
    samples, rate = clip
    name = f"resample_{SETTINGS.resample_rate}hz_{SETTINGS.resample_channels}ch"
    decoded, decoded_rate = decode(TRANSFORMS[name].apply(samples, rate))
    assert decoded_rate == 44100
    assert decoded.ndim == 2 and decoded.shape[1] == 2
    assert abs(len(decoded) / decoded_rate - len(samples) / rate) <= 0.001
    np.testing.assert_array_equal(decoded[:, 0], decoded[:, 1])
    assert rms(decoded[:, 0]) == pytest.approx(rms(samples), rel=0.01)  # the music, not silence


def test_mp3_is_constant_bitrate_and_sounds_like_the_clip(clip, mp3):
    samples, rate = clip
    data, decoded, decoded_rate = mp3
    duration = len(samples) / rate
    assert data[:2] == b"\xff\xf3"  # an MPEG-2 Layer III frame: lame kept 22050 Hz
    assert decoded_rate == rate and decoded.ndim == 1
    assert abs(len(decoded) / decoded_rate - duration) <= 0.1
    assert len(data) == pytest.approx(SETTINGS.mp3_kbps * 1000 / 8 * duration, rel=0.10)
    # Aligned for the encoder delay in case the decoder did not remove it.
    lag = best_lag(decoded, samples, max_lag=2048)
    late, original = decoded[max(lag, 0) :], samples[max(-lag, 0) :]
    n = min(len(late), len(original))
    assert np.corrcoef(late[:n], original[:n])[0, 1] > 0.9


def test_mp3_decodes_without_the_encoder_delay(clip, mp3):
    """lame writes to a file, so its LAME tag (delay and padding) makes the decode gapless; from
    stdout the audio would start 1105 samples late and run about 1200 samples long."""
    samples, _ = clip
    _, decoded, _ = mp3
    assert len(decoded) == len(samples)
    assert best_lag(decoded, samples, max_lag=2048) == 0


def test_mp3_bitrate_the_sample_rate_does_not_allow_is_refused(clip):
    samples, rate = clip
    transform = transforms(SETTINGS.model_copy(update={"mp3_kbps": 192}))[-1]
    with pytest.raises(BehaviourError, match="160 kbps, not the 192 kbps"):
        transform.apply(samples[: 2 * rate], rate)


def test_transforms_leave_their_input_alone(clip):
    samples, rate = clip
    excerpt = samples[: 3 * rate].copy()
    before = excerpt.copy()
    for transform in TRANSFORMS.values():
        assert transform.apply(excerpt, rate)
    np.testing.assert_array_equal(excerpt, before)
    assert excerpt.flags.writeable


def test_apply_wants_mono_samples():
    with pytest.raises(ValueError, match="mono"):
        TRANSFORMS["shift_2s"].apply(np.zeros((100, 2), dtype=np.float32), 22050)
    with pytest.raises(ValueError, match="not longer than the shift"):
        TRANSFORMS["shift_2s"].apply(np.zeros(22050, dtype=np.float32), 22050)


def test_encode_wav_round_trips_16_bit_samples_and_clips():
    pcm = np.array([-32768, -1, 0, 1, 12345, 32767], dtype=np.int16)
    decoded, rate = decode(encode_wav(pcm / 32768, 8000))
    assert rate == 8000
    np.testing.assert_array_equal(np.rint(decoded * 32768).astype(np.int16), pcm)

    stereo, _ = soundfile.read(io.BytesIO(encode_wav(np.array([[2.0, -2.0]]), 8000)), dtype="int16")
    np.testing.assert_array_equal(stereo, [[32767, -32768]])
    with pytest.raises(ValueError, match="NaN"):
        encode_wav(np.array([0.0, np.nan]), 8000)


def test_require_tools_names_lame_when_it_is_missing(monkeypatch, tmp_path, clip):
    require_tools(SETTINGS)  # installed here (and wherever `make setup` ran)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BehaviourError, match="lame not found on PATH") as raised:
        require_tools(SETTINGS)
    assert "Debian package lame" in str(raised.value)

    samples, rate = clip
    with pytest.raises(BehaviourError, match="lame not found on PATH"):
        TRANSFORMS["mp3_128kbps"].apply(samples[:rate], rate)


def test_lame_failing_is_reported_with_its_stderr(monkeypatch, tmp_path, clip):
    folder = fake_lame(tmp_path / "bin", 'echo "lame: cannot write the frobnicator" >&2\nexit 1')
    monkeypatch.setenv("PATH", f"{folder}:{os.environ['PATH']}")
    samples, rate = clip
    with pytest.raises(BehaviourError, match="exit status 1: lame: cannot write the frobnicator"):
        TRANSFORMS["mp3_128kbps"].apply(samples[:rate], rate)


def test_lame_hanging_times_out(monkeypatch, tmp_path, clip):
    folder = fake_lame(tmp_path / "bin", "exec sleep 30")
    monkeypatch.setenv("PATH", f"{folder}:{os.environ['PATH']}")
    monkeypatch.setattr(behaviour, "LAME_TIMEOUT_S", 0.5)
    samples, rate = clip
    with pytest.raises(BehaviourError, match="did not finish"):
        TRANSFORMS["mp3_128kbps"].apply(samples[:rate], rate)


def test_unchanged_fraction():
    assert (
        unchanged_fraction(["blues", "jazz", "rock", "pop"], ["blues", "jazz", "pop", "pop"])
        == 0.75
    )
    assert unchanged_fraction(("metal",), ("metal",)) == 1.0
    assert unchanged_fraction(["metal"], ["disco"]) == 0.0
    with pytest.raises(ValueError, match="2 reference genres but 1"):
        unchanged_fraction(["blues", "jazz"], ["blues"])
    with pytest.raises(ValueError, match="no clips"):
        unchanged_fraction([], [])
