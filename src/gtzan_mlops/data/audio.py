"""Decoding audio files and byte strings into mono float32 waveforms at the target sample rate.

The pipeline (manifest, features) and the served model both decode through `load_waveform`, so
a clip is turned into samples the same way wherever it is classified. What a file's header says
(its encoding, its promised length) is read by audio_headers.py; what a decoded clip must pass
to be used, by quality.py.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile

from gtzan_mlops.data.audio_headers import (
    AudioSource,
    FirstBytes,
    Truncation,
    binary,
    container_truncation,
    read_first_bytes,
)

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
    handle = _open(source, label)
    first_bytes = read_first_bytes(source)
    try:
        with soundfile.SoundFile(handle) as audio:
            _check_encoding(audio, first_bytes, label)
            header = AudioHeader(audio.frames, audio.channels, audio.samplerate)
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as error:
        raise _undecodable(label, first_bytes, error) from error
    (limits or DecodeLimits()).check(label, header.frames, header.channels, header.sample_rate)
    return header


def _reason(error: BaseException) -> str:
    """libsndfile's own words, without its "Error opening <object repr>" preamble."""
    return str(getattr(error, "error_string", None) or error)


def _label(source: AudioSource) -> str:
    if isinstance(source, bytes):
        return f"<{len(source)} bytes>"
    return getattr(source, "name", None) or str(source)


def _unsupported(name: str, encoding: str) -> AudioError:
    return AudioError(f"{name}: {encoding} is not supported; send e.g. PCM WAV, FLAC, MP3 or Ogg")


def _undecodable(name: str, first_bytes: FirstBytes, error: BaseException) -> AudioError:
    """The refusal of a file libsndfile cannot open: its encoding named when the header shows
    one the decoder does not read, else libsndfile's reason."""
    if first_bytes.encoding is not None and not first_bytes.readable:
        return _unsupported(name, first_bytes.encoding)
    return AudioError(f"{name}: not decodable as audio ({_reason(error)})")


def _check_encoding(audio: soundfile.SoundFile, first_bytes: FirstBytes, name: str) -> None:
    """Refuse, by name, the encodings libsndfile decodes only as a stream, without seeking:
    GSM 6.10, G.721/G.723 ADPCM, NMS and VOX ADPCM and the like. libsndfile could read them
    given a frame count, but they are 8 kHz telephony codecs no music source produces, the
    pipeline has never decoded one (its fetch listed them as undecodable), and an endpoint
    others can reach need not expose their decoders. Before this check their refusal was the
    decoding library's "frames must be specified for non-seekable files"."""
    if not audio.seekable():
        subtype = soundfile.available_subtypes().get(audio.subtype, audio.subtype)
        raise _unsupported(name, first_bytes.encoding or f"{subtype} {audio.format}")


@dataclass(frozen=True)
class _Decoded:
    waveform: np.ndarray  # mono float32 at the file's own rate
    sample_rate: int
    channels: int
    peak: float  # over every channel
    shortfall: Truncation | None  # fewer frames decoded than a FLAC or MP3 header states


def _decode(source: AudioSource, name: str, limits: DecodeLimits | None = None) -> _Decoded:
    """Decode a file to mono float32 samples at its own rate, within `limits`.

    The header is checked against `limits` before decoding; the file is then read in blocks,
    each down-mixed (channel mean) as it arrives, so a multi-channel file never exists in
    memory whole. The mean per block equals the mean of the whole decode, bit for bit.

    The samples are what decoding gave, never what the header claims: soundfile's
    `SoundFile.blocks` reads as many frames as the header declares and, past the real end,
    yields its block buffer again (an MP3 whose Xing header claims 899 s but holding 30 s gave
    869 s of the last block repeated), so each read's own count is used instead."""
    handle = _open(source, name)
    first_bytes = read_first_bytes(source)
    limits = limits or DecodeLimits()
    try:
        audio = soundfile.SoundFile(handle)
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as error:
        raise _undecodable(name, first_bytes, error) from error
    with audio:
        _check_encoding(audio, first_bytes, name)
        sample_rate, channels, frames = audio.samplerate, audio.channels, audio.frames
        limits.check(name, frames, channels, sample_rate)
        # A count the header states on its own: a file holding less decodes to less. (WAV, AU
        # and AIFF report the frames held, not the header's: see `container_truncation`.)
        stated = frames if first_bytes.states_length and audio.format in ("FLAC", "MP3") else None
        mono = np.empty(frames, dtype=np.float32)
        block = np.empty((_BLOCK_FRAMES, channels), dtype=np.float32)
        filled, peak = 0, 0.0
        while True:
            try:
                read = len(audio.read(out=block))
            except (soundfile.LibsndfileError, RuntimeError) as error:
                if stated is not None and 0 < filled < stated:
                    break  # cut inside a frame (FLAC: "lost sync"): what came before stands
                raise AudioError(f"{name}: not decodable as audio ({_reason(error)})") from error
            if read == 0:
                break
            if filled + read > len(mono):  # a header that undercounts (some MP3s)
                limits.check(name, filled + read, channels, sample_rate)
                mono = np.resize(mono, max(2 * len(mono), filled + read))
            samples = block[:read]
            down = samples[:, 0] if channels == 1 else samples.mean(axis=1, dtype=np.float32)
            if not np.all(np.isfinite(down)):
                raise AudioError(f"{name}: contains NaN or infinite samples")
            peak = max(peak, float(np.max(np.abs(samples))))
            mono[filled : filled + read] = down
            filled += read
    if filled == 0:
        raise AudioError(f"{name}: contains no audio frames")
    if filled < len(mono):
        # A header that over-claims: keep what was decoded, not a view of the claimed size.
        mono = mono[:filled].copy()
    shortfall = Truncation(stated, filled) if stated is not None and filled < stated else None
    return _Decoded(mono, int(sample_rate), int(channels), peak, shortfall)


def inspect_audio(path: str | os.PathLike[str]) -> AudioInfo:
    """Decode a whole file (which catches corrupt data) and describe it.

    A file cut short still decodes, to the frames present: see `find_truncation`.
    """
    decoded = _decode(path, str(path))
    return AudioInfo(
        duration_s=len(decoded.waveform) / decoded.sample_rate,
        sample_rate=decoded.sample_rate,
        channels=decoded.channels,
        frames=len(decoded.waveform),
        peak=decoded.peak,
    )


def find_truncation(source: AudioSource) -> Truncation | None:
    """The shortfall of a file (a path, its bytes or an open file) holding fewer frames than
    its header promises, e.g. cut short by an interrupted copy or upload; else None.

    WAV, AU and AIFF: the header's data size against the bytes held (cheap). FLAC, and MP3
    with a Xing/Info/VBRI frame count: the header's count against the frames decoding gives
    (the file is decoded; `decode_audio` finds it in its own decode). Other formats (Ogg,
    MP3 without a count) state no length apart from their bytes: None.
    """
    with binary(source) as handle:
        truncation = container_truncation(handle)
    if truncation is not None or not read_first_bytes(source).states_length:
        return truncation
    try:
        return _decode(source, _label(source)).shortfall
    except AudioError:
        return None  # not decodable at all: decoding reports that


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
    truncation (see `find_truncation`; FLAC and MP3 from this decode, not a second one)."""
    label = name or _label(source)
    decoded = _decode(source, label, limits)
    with binary(source) as handle:
        truncation = container_truncation(handle) or decoded.shortfall
    return DecodedAudio(
        decoded.waveform, decoded.sample_rate, decoded.channels, decoded.peak, truncation
    )


def decode_mono(
    source: AudioSource,
    name: str | None = None,
    limits: DecodeLimits | None = None,
) -> tuple[np.ndarray, int]:
    """Mono float32 samples of a file path or encoded bytes at the file's own rate, and that
    rate: one decode that every feature set resamples from (see `resample`)."""
    decoded = _decode(source, name or _label(source), limits)
    return decoded.waveform, decoded.sample_rate


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
