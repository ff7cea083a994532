"""Decoding audio files and byte strings into mono float32 waveforms at the target sample rate.

The pipeline (manifest, features) and the served model both decode through `load_waveform`, so
a clip is turned into samples the same way wherever it is classified.
"""

from __future__ import annotations

import io
import os
import struct
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


def _decode(
    source: str | os.PathLike[str] | bytes, name: str, max_seconds: float | None = None
) -> tuple[np.ndarray, int]:
    """Samples as (frames, channels) float32 and the file's own sample rate; audio longer than
    `max_seconds` is refused from its header, before it is decoded."""
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
        with soundfile.SoundFile(handle) as audio:
            sample_rate = audio.samplerate
            if max_seconds is not None and audio.frames > max_seconds * sample_rate:
                raise AudioError(
                    f"{name}: {audio.frames / sample_rate:.0f} s of audio is longer than the "
                    f"limit of {max_seconds:g} s"
                )
            samples = audio.read(dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as error:
        # libsndfile's own words, without its "Error opening <object repr>" preamble.
        reason = getattr(error, "error_string", None) or error
        raise AudioError(f"{name}: not decodable as audio ({reason})") from error
    if samples.shape[0] == 0:
        raise AudioError(f"{name}: contains no audio frames")
    if not np.all(np.isfinite(samples)):
        raise AudioError(f"{name}: contains NaN or infinite samples")
    return samples, int(sample_rate)


def inspect_audio(path: str | os.PathLike[str]) -> AudioInfo:
    """Decode a whole file (which catches corrupt data) and describe it.

    A WAV or AU file cut short still decodes, to the frames present: see `find_truncation`.
    """
    samples, sample_rate = _decode(path, str(path))
    return AudioInfo(
        duration_s=samples.shape[0] / sample_rate,
        sample_rate=sample_rate,
        channels=samples.shape[1],
        frames=samples.shape[0],
        peak=float(np.max(np.abs(samples))),
    )


# Bytes per sample of the AU encodings GTZAN and common tools write (Sun/NeXT encoding codes).
_AU_SAMPLE_BYTES = {1: 1, 2: 1, 3: 2, 4: 3, 5: 4, 6: 4, 7: 8, 27: 1}
# A header's data size meaning "unknown length" (streamed writers): nothing to compare against.
_UNKNOWN_SIZE = 0xFFFFFFFF


@dataclass(frozen=True)
class Truncation:
    """A file holding fewer audio frames than its header promises."""

    promised_frames: int
    held_frames: int


def _wav_data_extent(handle: io.BufferedReader) -> tuple[int, int, int] | None:
    """(data offset, promised data bytes, bytes per frame) from a RIFF/WAVE header."""
    head = handle.read(12)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    frame_bytes = 0
    while True:
        chunk = handle.read(8)
        if len(chunk) < 8:
            return None  # no data chunk: cut inside the header, which decoding reports
        chunk_id, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
        if chunk_id == b"data":
            return (handle.tell(), size, frame_bytes) if frame_bytes else None
        if chunk_id == b"fmt ":
            fmt = handle.read(min(size, 16))
            if len(fmt) < 14:
                return None
            frame_bytes = struct.unpack("<H", fmt[12:14])[0]  # block align
            handle.seek(size - len(fmt) + (size & 1), io.SEEK_CUR)
        else:
            handle.seek(size + (size & 1), io.SEEK_CUR)  # chunks are padded to even sizes


def _au_data_extent(handle: io.BufferedReader) -> tuple[int, int, int] | None:
    """(data offset, promised data bytes, bytes per frame) from a Sun/NeXT .au header."""
    head = handle.read(24)
    if len(head) < 24 or head[:4] not in (b".snd", b"dns."):
        return None
    order = ">" if head[:4] == b".snd" else "<"
    offset, size, encoding, _, channels = struct.unpack(f"{order}5I", head[4:24])
    sample_bytes = _AU_SAMPLE_BYTES.get(encoding)
    if sample_bytes is None or channels == 0:
        return None
    return offset, size, sample_bytes * channels


def find_truncation(path: str | os.PathLike[str]) -> Truncation | None:
    """The shortfall of a WAV or AU file cut short (e.g. by an interrupted copy), else None.

    libsndfile reads such a file without an error and returns only the frames present (its log
    merely notes the header's size "should be" smaller), so decoding alone cannot tell a clip cut
    at 12 s from a 12 s clip. The header's data size is compared with the bytes on disk instead.
    Other formats, and headers declaring an unknown length, are not checked (None).
    """
    with open(path, "rb") as handle:
        extent = _wav_data_extent(handle)
        if extent is None:
            handle.seek(0)
            extent = _au_data_extent(handle)
        if extent is None:
            return None
        offset, promised_bytes, frame_bytes = extent
        held_bytes = max(0, os.fstat(handle.fileno()).st_size - offset)
    if promised_bytes in (0, _UNKNOWN_SIZE) or held_bytes >= promised_bytes:
        return None
    return Truncation(promised_bytes // frame_bytes, held_bytes // frame_bytes)


def decode_mono(
    source: str | os.PathLike[str] | bytes,
    name: str | None = None,
    max_seconds: float | None = None,
) -> tuple[np.ndarray, int]:
    """Mono float32 samples of a file path or encoded bytes at the file's own rate, and that
    rate: one decode that every feature set resamples from (see `resample`). `max_seconds`
    refuses longer audio before decoding it (a small compressed upload can decode to gigabytes).
    """
    label = name or (f"<{len(source)} bytes>" if isinstance(source, bytes) else str(source))
    samples, file_rate = _decode(source, label, max_seconds)
    waveform = samples.mean(axis=1, dtype=np.float32) if samples.shape[1] > 1 else samples[:, 0]
    return np.ascontiguousarray(waveform, dtype=np.float32), file_rate


def resample(waveform: np.ndarray, file_rate: int, sample_rate: int) -> np.ndarray:
    """`waveform` at `sample_rate` as `librosa.load` would give it (soxr_hq); unchanged when it
    is already at that rate."""
    if file_rate == sample_rate:
        return waveform
    import librosa  # imported here: decoding alone should not pay librosa's import time

    resampled = librosa.resample(waveform, orig_sr=file_rate, target_sr=sample_rate)
    return np.ascontiguousarray(resampled, dtype=np.float32)


def load_waveform(
    source: str | os.PathLike[str] | bytes,
    sample_rate: int,
    name: str | None = None,
    max_seconds: float | None = None,
) -> np.ndarray:
    """Mono float32 samples of a file path or encoded bytes, resampled to `sample_rate`.

    Matches `librosa.load(path, sr=sample_rate)` (channel mean, soxr_hq resampling) and skips
    the resampler when the file is already at the target rate.
    """
    waveform, file_rate = decode_mono(source, name, max_seconds)
    return resample(waveform, file_rate, sample_rate)
