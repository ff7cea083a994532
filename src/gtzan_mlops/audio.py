"""Decoding audio files and byte strings into mono float32 waveforms at the target sample rate.

The pipeline (manifest, features) and the served model both decode through `load_waveform`, so
a clip is turned into samples the same way wherever it is classified.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile

AUDIO_EXTENSIONS = (".au", ".wav", ".flac", ".mp3", ".ogg", ".aiff", ".aif")


class AudioError(ValueError):
    """An audio file or byte string that cannot be used; the message names the source and why."""


@dataclass(frozen=True)
class AudioInfo:
    """What decoding a whole file found."""

    duration_s: float
    sample_rate: int
    channels: int
    frames: int
    peak: float


def _decode(source: str | os.PathLike[str] | bytes, name: str) -> tuple[np.ndarray, int]:
    """Samples as (frames, channels) float32 and the file's own sample rate."""
    if isinstance(source, bytes):
        if not source:
            raise AudioError(f"{name}: empty (0 bytes)")
        handle: io.BytesIO | str = io.BytesIO(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise AudioError(f"{name}: no such file")
        if path.stat().st_size == 0:
            raise AudioError(f"{name}: empty file (0 bytes)")
        handle = str(path)
    try:
        samples, sample_rate = soundfile.read(handle, dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as error:
        raise AudioError(f"{name}: not decodable as audio ({error})") from error
    if samples.shape[0] == 0:
        raise AudioError(f"{name}: contains no audio frames")
    if not np.all(np.isfinite(samples)):
        raise AudioError(f"{name}: contains NaN or infinite samples")
    return samples, int(sample_rate)


def inspect_audio(path: str | os.PathLike[str]) -> AudioInfo:
    """Decode a whole file (which catches truncated data) and describe it."""
    samples, sample_rate = _decode(path, str(path))
    return AudioInfo(
        duration_s=samples.shape[0] / sample_rate,
        sample_rate=sample_rate,
        channels=samples.shape[1],
        frames=samples.shape[0],
        peak=float(np.max(np.abs(samples))),
    )


def load_waveform(
    source: str | os.PathLike[str] | bytes, sample_rate: int, name: str | None = None
) -> np.ndarray:
    """Mono float32 samples of a file path or encoded bytes, resampled to `sample_rate`.

    Matches `librosa.load(path, sr=sample_rate)` (channel mean, soxr_hq resampling) and skips
    the resampler when the file is already at the target rate.
    """
    label = name or (f"<{len(source)} bytes>" if isinstance(source, bytes) else str(source))
    samples, file_rate = _decode(source, label)
    waveform = samples.mean(axis=1, dtype=np.float32) if samples.shape[1] > 1 else samples[:, 0]
    if file_rate != sample_rate:
        import librosa  # imported here: decoding alone should not pay librosa's import time

        waveform = librosa.resample(waveform, orig_sr=file_rate, target_sr=sample_rate)
    return np.ascontiguousarray(waveform, dtype=np.float32)
