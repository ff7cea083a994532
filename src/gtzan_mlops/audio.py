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
from typing import BinaryIO

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


@dataclass(frozen=True)
class DecodeLimits:
    """What a file may decode to, checked from its header before any sample is decoded: a few
    KiB of FLAC or Ogg can declare minutes of audio at hundreds of kHz on hundreds of channels.
    None switches a limit off (the pipeline's own clips are trusted)."""

    max_seconds: float | None = None
    max_channels: int | None = None
    max_sample_rate: int | None = None
    max_decoded_mib: float | None = None  # frames x channels as float32, at the file's own rate

    def check(self, name: str, frames: int, channels: int, sample_rate: int) -> None:
        if self.max_channels is not None and channels > self.max_channels:
            raise AudioError(f"{name}: {channels} channels exceed the limit of {self.max_channels}")
        if self.max_sample_rate is not None and sample_rate > self.max_sample_rate:
            raise AudioError(
                f"{name}: sample rate {sample_rate} Hz exceeds the limit of "
                f"{self.max_sample_rate} Hz"
            )
        if self.max_seconds is not None and frames > self.max_seconds * sample_rate:
            raise AudioError(
                f"{name}: {frames / sample_rate:.0f} s of audio is longer than the limit of "
                f"{self.max_seconds:g} s"
            )
        decoded_mib = frames * channels * 4 / 2**20
        if self.max_decoded_mib is not None and decoded_mib > self.max_decoded_mib:
            raise AudioError(
                f"{name}: decodes to {decoded_mib:.0f} MiB ({frames} frames x {channels} "
                f"channels), more than the limit of {self.max_decoded_mib:g} MiB"
            )


# Frames decoded at a time: memory follows the mono output, not the channels of the input.
_BLOCK_FRAMES = 65536


AudioSource = str | os.PathLike[str] | bytes | BinaryIO  # a path, encoded bytes or an open file


def _open(source: AudioSource, name: str) -> str | BinaryIO:
    """What soundfile opens: a checked path, or a seekable file object at its start."""
    if isinstance(source, bytes):
        if not source:
            raise AudioError(f"{name}: empty (0 bytes)")
        return io.BytesIO(source)
    if hasattr(source, "read"):
        source.seek(0)
        if source.seek(0, io.SEEK_END) == 0:
            raise AudioError(f"{name}: empty file (0 bytes)")
        source.seek(0)
        return source
    path = Path(source)
    if not path.is_file():
        raise AudioError(f"{name}: no such file")
    if path.stat().st_size == 0:
        raise AudioError(f"{name}: empty file (0 bytes)")
    return str(path)


@dataclass(frozen=True)
class AudioHeader:
    frames: int
    channels: int
    sample_rate: int

    @property
    def duration_s(self) -> float:
        return self.frames / self.sample_rate


def probe_audio(
    source: AudioSource, name: str | None = None, limits: DecodeLimits | None = None
) -> AudioHeader:
    """The header of a file, checked against `limits`; nothing is decoded."""
    label = name or _label(source)
    try:
        with soundfile.SoundFile(_open(source, label)) as audio:
            header = AudioHeader(audio.frames, audio.channels, audio.samplerate)
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as error:
        raise AudioError(f"{label}: not decodable as audio ({_reason(error)})") from error
    (limits or DecodeLimits()).check(label, header.frames, header.channels, header.sample_rate)
    return header


def _reason(error: BaseException) -> str:
    """libsndfile's own words, without its "Error opening <object repr>" preamble."""
    return str(getattr(error, "error_string", None) or error)


def _label(source: AudioSource) -> str:
    if isinstance(source, bytes):
        return f"<{len(source)} bytes>"
    return getattr(source, "name", None) or str(source)


def _decode(
    source: AudioSource, name: str, limits: DecodeLimits | None = None
) -> tuple[np.ndarray, int, int, float]:
    """(mono float32 samples, the file's own sample rate, its channels, its peak amplitude).

    The header is checked against `limits` before decoding; the file is then read in blocks,
    each down-mixed (channel mean) as it arrives, so a multi-channel file never exists in
    memory whole. The mean per block equals the mean of the whole decode, bit for bit."""
    handle = _open(source, name)
    limits = limits or DecodeLimits()
    peak = 0.0
    try:
        with soundfile.SoundFile(handle) as audio:
            sample_rate, channels, frames = audio.samplerate, audio.channels, audio.frames
            limits.check(name, frames, channels, sample_rate)
            mono = np.empty(frames, dtype=np.float32)
            filled = 0
            for block in audio.blocks(_BLOCK_FRAMES, dtype="float32", always_2d=True):
                if filled + len(block) > len(mono):  # a header that undercounts (some MP3s)
                    limits.check(name, filled + len(block), channels, sample_rate)
                    mono = np.resize(mono, max(2 * len(mono), filled + len(block)))
                down = block[:, 0] if channels == 1 else block.mean(axis=1, dtype=np.float32)
                if not np.all(np.isfinite(down)):
                    raise AudioError(f"{name}: contains NaN or infinite samples")
                if len(block):
                    peak = max(peak, float(np.max(np.abs(block))))
                mono[filled : filled + len(block)] = down
                filled += len(block)
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as error:
        raise AudioError(f"{name}: not decodable as audio ({_reason(error)})") from error
    if filled == 0:
        raise AudioError(f"{name}: contains no audio frames")
    return mono[:filled], int(sample_rate), int(channels), peak


def inspect_audio(path: str | os.PathLike[str]) -> AudioInfo:
    """Decode a whole file (which catches corrupt data) and describe it.

    A WAV or AU file cut short still decodes, to the frames present: see `find_truncation`.
    """
    samples, sample_rate, channels, peak = _decode(path, str(path))
    return AudioInfo(
        duration_s=len(samples) / sample_rate,
        sample_rate=sample_rate,
        channels=channels,
        frames=len(samples),
        peak=peak,
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


def _wav_data_extent(handle: BinaryIO) -> tuple[int, int, int] | None:
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


def _au_data_extent(handle: BinaryIO) -> tuple[int, int, int] | None:
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


def find_truncation(source: AudioSource) -> Truncation | None:
    """The shortfall of a WAV or AU file (a path or its bytes) cut short, e.g. by an
    interrupted copy or upload; else None.

    libsndfile reads such a file without an error and returns only the frames present (its log
    merely notes the header's size "should be" smaller), so decoding alone cannot tell a clip cut
    at 12 s from a 12 s clip. The header's data size is compared with the bytes held instead.
    Other formats, and headers declaring an unknown length, are not checked (None).
    """
    if hasattr(source, "read"):
        source.seek(0)
        return _truncation(source)
    with io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb") as handle:
        return _truncation(handle)


def _truncation(handle: BinaryIO) -> Truncation | None:
    extent = _wav_data_extent(handle)
    if extent is None:
        handle.seek(0)
        extent = _au_data_extent(handle)
    if extent is None:
        return None
    offset, promised_bytes, frame_bytes = extent
    size = handle.seek(0, io.SEEK_END)
    held_bytes = max(0, size - offset)
    if promised_bytes in (0, _UNKNOWN_SIZE) or held_bytes >= promised_bytes:
        return None
    return Truncation(promised_bytes // frame_bytes, held_bytes // frame_bytes)


@dataclass(frozen=True)
class QualityGates:
    """What a clip must pass to be used, by the pipeline (fetch's manifest) and by the served
    model alike: params `data.min_duration_s` and `data.silence_peak`."""

    min_duration_s: float
    silence_peak: float


@dataclass(frozen=True)
class QualityProblem:
    kind: str  # truncated | too_short | silent
    message: str  # "<kind in words>: <detail>", the manifest's status


def quality_problems(
    duration_s: float, peak: float, truncation: Truncation | None, gates: QualityGates
) -> list[QualityProblem]:
    """Every gate a decoded clip fails, in the order the manifest reports them. (Not audio, and
    NaN samples, are refused by decoding itself: AudioError.)"""
    problems = []
    if truncation is not None:
        problems.append(
            QualityProblem(
                "truncated",
                f"truncated: header promises {truncation.promised_frames} frames, "
                f"file holds {truncation.held_frames}",
            )
        )
    if duration_s < gates.min_duration_s:
        problems.append(
            QualityProblem(
                "too_short",
                f"too short: {duration_s:.2f} s, min_duration_s is {gates.min_duration_s}",
            )
        )
    if peak < gates.silence_peak:
        problems.append(
            QualityProblem(
                "silent", f"silent: peak {peak:.3g}, silence_peak is {gates.silence_peak}"
            )
        )
    return problems


@dataclass(frozen=True)
class DecodedAudio:
    """One decoded file: mono samples at its own rate and what the quality gates look at."""

    waveform: np.ndarray  # float32, channel mean
    sample_rate: int
    channels: int
    peak: float  # over every channel
    truncation: Truncation | None

    @property
    def duration_s(self) -> float:
        return len(self.waveform) / self.sample_rate


def decode_audio(
    source: AudioSource,
    name: str | None = None,
    limits: DecodeLimits | None = None,
) -> DecodedAudio:
    """Decode a file path or encoded bytes within `limits` (see DecodeLimits), and look for
    truncation."""
    label = name or _label(source)
    waveform, file_rate, channels, peak = _decode(source, label, limits)
    return DecodedAudio(waveform, file_rate, channels, peak, find_truncation(source))


def decode_mono(
    source: AudioSource,
    name: str | None = None,
    limits: DecodeLimits | None = None,
) -> tuple[np.ndarray, int]:
    """Mono float32 samples of a file path or encoded bytes at the file's own rate, and that
    rate: one decode that every feature set resamples from (see `resample`)."""
    waveform, file_rate, _, _ = _decode(source, name or _label(source), limits)
    return waveform, file_rate


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
    limits: DecodeLimits | None = None,
) -> np.ndarray:
    """Mono float32 samples of a file path or encoded bytes, resampled to `sample_rate`.

    Matches `librosa.load(path, sr=sample_rate)` (channel mean, soxr_hq resampling) and skips
    the resampler when the file is already at the target rate.
    """
    waveform, file_rate = decode_mono(source, name, limits)
    return resample(waveform, file_rate, sample_rate)
