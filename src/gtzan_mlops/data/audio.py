"""Decoding audio files and byte strings into mono float32 waveforms at the target sample rate.

The pipeline (manifest, features) and the served model both decode through `load_waveform`, so
a clip is turned into samples the same way wherever it is classified.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import struct
from collections.abc import Iterator
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
    handle = _open(source, label)
    first_bytes = _read_header(source)
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


# --- what a file's first bytes say, read before libsndfile opens it -----------------------------

# WAVE format tags (RFC 2361) and Sun/NeXT AU encodings, to name an encoding the decoder refuses.
_WAV_ENCODINGS = {
    0x0001: "PCM", 0x0002: "MS ADPCM", 0x0003: "IEEE float", 0x0006: "A-law", 0x0007: "u-law",
    0x0010: "OKI ADPCM", 0x0011: "IMA ADPCM", 0x0014: "G.723 ADPCM", 0x0022: "TrueSpeech",
    0x0031: "GSM 6.10", 0x0038: "NMS ADPCM", 0x0040: "G.721 ADPCM", 0x0042: "G.723.1",
    0x0045: "G.726 ADPCM", 0x0050: "MPEG-1 Layer I/II", 0x0055: "MPEG Layer III",
    0x0065: "G.722 ADPCM", 0x00FF: "AAC", 0x0161: "WMA", 0x0162: "WMA Pro",
    0x0163: "WMA Lossless", 0x2000: "AC-3", 0x2001: "DTS",
}  # fmt: skip
_WAV_READABLE = {0x0001, 0x0002, 0x0003, 0x0006, 0x0007, 0x0011, 0x0055}
_AU_ENCODINGS = {
    1: "8-bit u-law", 2: "8-bit PCM", 3: "16-bit PCM", 4: "24-bit PCM", 5: "32-bit PCM",
    6: "32-bit float", 7: "64-bit float", 23: "G.721 ADPCM", 24: "G.722 ADPCM",
    25: "G.723 ADPCM (3-bit)", 26: "G.723 ADPCM (5-bit)", 27: "8-bit A-law",
}  # fmt: skip
# Bytes per sample of the AU encodings GTZAN and common tools write (Sun/NeXT encoding codes).
_AU_SAMPLE_BYTES = {1: 1, 2: 1, 3: 2, 4: 3, 5: 4, 6: 4, 7: 8, 27: 1}


@dataclass(frozen=True)
class _FirstBytes:
    """What a file's header says before libsndfile reads it."""

    encoding: str | None  # e.g. "GSM 6.10 WAV" (WAV and AU files only)
    readable: bool  # False: an encoding the decoder does not read
    states_length: bool  # FLAC, or MP3 with a Xing/Info/VBRI frame: a frame count of its own


@contextlib.contextmanager
def _binary(source: AudioSource) -> Iterator[BinaryIO]:
    """A seekable binary handle on `source`, at its start; an open file is left open, at 0."""
    if isinstance(source, bytes):
        yield io.BytesIO(source)
    elif hasattr(source, "read"):
        source.seek(0)
        try:
            yield source
        finally:
            source.seek(0)
    else:
        with open(source, "rb") as handle:
            yield handle


def _read_header(source: AudioSource) -> _FirstBytes:
    with _binary(source) as handle:
        wav = _wav_format(handle)
        if wav is not None:
            # Only a known encoding is named: an unknown tag is as likely a damaged header
            # (GTZAN's jazz.00054) as a codec, and libsndfile's reason says more then.
            name = _WAV_ENCODINGS.get(wav.tag)
            encoding = f"{name} WAV" if name else None
            return _FirstBytes(encoding, wav.tag in _WAV_READABLE, False)
        handle.seek(0)
        au = _au_format(handle)
        if au is not None:
            code = au[2]
            name = _AU_ENCODINGS.get(code)
            encoding = f"{name} AU" if name else None
            return _FirstBytes(encoding, code in _AU_SAMPLE_BYTES, False)
        handle.seek(0)
        if handle.read(4) == b"fLaC":
            return _FirstBytes(None, True, True)  # STREAMINFO's total sample count
        handle.seek(0)
        return _FirstBytes(None, True, _mp3_states_length(handle))


def _mp3_states_length(handle: BinaryIO) -> bool:
    """Whether an MP3's first frame is a Xing, Info or VBRI header, which counts its frames.
    Without one, libsndfile estimates the length from the file's size: no promise to hold it
    to (a trailing tag alone makes the estimate overshoot)."""
    head = handle.read(10)
    start = 0
    if len(head) == 10 and head[:3] == b"ID3":  # ID3v2: a syncsafe size, maybe a footer
        size = (head[6] & 0x7F) << 21 | (head[7] & 0x7F) << 14 | (head[8] & 0x7F) << 7 | head[9]
        start = 10 + size + (10 if head[5] & 0x10 else 0)
    handle.seek(start)
    data = handle.read(4096)
    sync = data.find(b"\xff")
    while sync != -1 and (sync + 1 >= len(data) or data[sync + 1] & 0xE0 != 0xE0):
        sync = data.find(b"\xff", sync + 1)
    if sync == -1:
        return False
    frame = data[sync : sync + 48]
    # Xing/Info follow the side information (13, 21 or 36 bytes in); VBRI sits at 36.
    return any(frame[at : at + 4] in (b"Xing", b"Info", b"VBRI") for at in (13, 21, 36))


def _unsupported(name: str, encoding: str) -> AudioError:
    return AudioError(f"{name}: {encoding} is not supported; send e.g. PCM WAV, FLAC, MP3 or Ogg")


def _undecodable(name: str, first_bytes: _FirstBytes, error: BaseException) -> AudioError:
    """The refusal of a file libsndfile cannot open: its encoding named when the header shows
    one the decoder does not read, else libsndfile's reason."""
    if first_bytes.encoding is not None and not first_bytes.readable:
        return _unsupported(name, first_bytes.encoding)
    return AudioError(f"{name}: not decodable as audio ({_reason(error)})")


def _check_encoding(audio: soundfile.SoundFile, first_bytes: _FirstBytes, name: str) -> None:
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
    first_bytes = _read_header(source)
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
        # and AIFF report the frames held, not the header's: see `_container_truncation`.)
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


# A header's data size meaning "unknown length" (streamed writers): nothing to compare against.
_UNKNOWN_SIZE = 0xFFFFFFFF
# Chunks walked before the data: real files have a handful; a crafted upload of millions of
# empty chunks would otherwise cost seconds of Python per walk (libsndfile gives up early).
_MAX_CHUNKS = 1000


@dataclass(frozen=True)
class Truncation:
    """A file holding fewer audio frames than its header promises."""

    promised_frames: int
    held_frames: int


@dataclass(frozen=True)
class _WavFormat:
    tag: int  # the format tag; for WAVE_FORMAT_EXTENSIBLE, its sub-format's
    block_align: int  # bytes per block: one frame, or one ADPCM block
    frames_per_block: int  # 1, or an ADPCM block's samples
    data: tuple[int, int] | None  # (offset, promised bytes) of the data chunk


def _wav_format(handle: BinaryIO) -> _WavFormat | None:
    """The `fmt ` chunk of a RIFF/WAVE header and where its data chunk starts."""
    head = handle.read(12)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    fmt, data = b"", None
    for _ in range(_MAX_CHUNKS):
        chunk = handle.read(8)
        if len(chunk) < 8:
            break  # no data chunk: cut inside the header, which decoding reports
        chunk_id, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
        if chunk_id == b"data":
            data = (handle.tell(), size)
            break
        if chunk_id == b"fmt ":
            fmt = handle.read(min(size, 40))
            handle.seek(size - len(fmt) + (size & 1), io.SEEK_CUR)
        else:
            handle.seek(size + (size & 1), io.SEEK_CUR)  # chunks are padded to even sizes
    if len(fmt) < 14:
        return None
    tag, block_align = struct.unpack("<H", fmt[:2])[0], struct.unpack("<H", fmt[12:14])[0]
    if tag == 0xFFFE and len(fmt) >= 26:
        tag = struct.unpack("<H", fmt[24:26])[0]  # the sub-format GUID starts with the tag
    frames_per_block = 1
    if tag in (0x0002, 0x0011) and len(fmt) >= 20:  # MS and IMA ADPCM: wSamplesPerBlock
        frames_per_block = struct.unpack("<H", fmt[18:20])[0]
    return _WavFormat(tag, block_align, frames_per_block, data)


def _au_format(handle: BinaryIO) -> tuple[int, int, int, int] | None:
    """(data offset, promised data bytes, encoding, channels) from a Sun/NeXT .au header."""
    head = handle.read(24)
    if len(head) < 24 or head[:4] not in (b".snd", b"dns."):
        return None
    order = ">" if head[:4] == b".snd" else "<"
    offset, size, encoding, _, channels = struct.unpack(f"{order}5I", head[4:24])
    return offset, size, encoding, channels


# AIFF-C compression types whose samples are stored as plain frames.
_AIFC_UNCOMPRESSED = {b"NONE", b"sowt", b"fl32", b"FL32", b"fl64", b"FL64", b"in24", b"in32"}


def _aiff_truncation(handle: BinaryIO, size: int) -> Truncation | None:
    """COMM's frame count against the SSND bytes held, for AIFF and uncompressed AIFF-C."""
    head = handle.read(12)
    if len(head) < 12 or head[:4] != b"FORM" or head[8:12] not in (b"AIFF", b"AIFC"):
        return None
    comm, data_start = b"", None
    for _ in range(_MAX_CHUNKS):
        if len(chunk := handle.read(8)) < 8:
            break
        chunk_id, length = chunk[:4], struct.unpack(">I", chunk[4:])[0]
        start = handle.tell()
        if chunk_id == b"COMM":
            comm = handle.read(min(length, 22))
        elif chunk_id == b"SSND":
            offset = handle.read(4)
            data_start = start + 8 + struct.unpack(">I", offset)[0] if len(offset) == 4 else None
        handle.seek(start + length + (length & 1))
    if len(comm) < 8 or data_start is None:
        return None
    channels, promised, bits = struct.unpack(">HIH", comm[:8])
    if head[8:12] == b"AIFC" and comm[18:22] not in _AIFC_UNCOMPRESSED:
        return None
    frame_bytes = channels * ((bits + 7) // 8)
    held = max(0, size - data_start) // frame_bytes if frame_bytes else promised
    return Truncation(promised, held) if held < promised else None


def _container_truncation(handle: BinaryIO) -> Truncation | None:
    """A WAV, AU or AIFF file holding fewer bytes than its header declares. libsndfile reads
    such a file without an error and reports only the frames present (its log merely notes the
    header's size "should be" smaller), so decoding alone cannot tell a clip cut at 12 s from a
    12 s clip: the header's size is compared with the bytes held instead."""
    size = handle.seek(0, io.SEEK_END)
    handle.seek(0)
    wav = _wav_format(handle)
    if wav is not None:
        if wav.data is None or not wav.block_align:
            return None
        (offset, promised), unit, per_unit = wav.data, wav.block_align, wav.frames_per_block
    else:
        handle.seek(0)
        au = _au_format(handle)
        if au is None:
            handle.seek(0)
            return _aiff_truncation(handle, size)
        offset, promised, encoding, channels = au
        unit, per_unit = _AU_SAMPLE_BYTES.get(encoding, 0) * channels, 1
        if not unit:
            return None
    held = max(0, size - offset)
    if promised in (0, _UNKNOWN_SIZE) or held >= promised:
        return None
    # Whole units (frames, or ADPCM blocks of `per_unit` frames) of the bytes promised and held.
    return Truncation(promised // unit * per_unit, held // unit * per_unit)


def find_truncation(source: AudioSource) -> Truncation | None:
    """The shortfall of a file (a path, its bytes or an open file) holding fewer frames than
    its header promises, e.g. cut short by an interrupted copy or upload; else None.

    WAV, AU and AIFF: the header's data size against the bytes held (cheap). FLAC, and MP3
    with a Xing/Info/VBRI frame count: the header's count against the frames decoding gives
    (the file is decoded; `decode_audio` finds it in its own decode). Other formats (Ogg,
    MP3 without a count) state no length apart from their bytes: None.
    """
    with _binary(source) as handle:
        truncation = _container_truncation(handle)
    if truncation is not None or not _read_header(source).states_length:
        return truncation
    try:
        return _decode(source, _label(source)).shortfall
    except AudioError:
        return None  # not decodable at all: decoding reports that


@dataclass(frozen=True)
class QualityGates:
    """What a clip must pass to be used, by the pipeline (fetch's manifest) and by the served
    model alike: params `data.min_duration_s`, `data.silence_peak` and `data.max_peak`."""

    min_duration_s: float
    silence_peak: float
    # Samples beyond max_peak are refused, not clipped. Float files may legitimately go a bit
    # over 1.0 (headroom), but 1000 times full scale is no microphone's or encoder's output,
    # and clipping it would classify a made-up waveform. Past about 1e19 the float32 spectra
    # of the features overflow to inf (librosa then raised ParameterError: an HTTP 500).
    max_peak: float


@dataclass(frozen=True)
class QualityProblem:
    kind: str  # truncated | too_short | beyond_full_scale | silent
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
    if peak > gates.max_peak:
        problems.append(
            QualityProblem(
                "beyond_full_scale",
                f"far beyond full scale: peak {peak:.3g}, max_peak is {gates.max_peak:g} "
                f"(+{20 * math.log10(gates.max_peak):.0f} dBFS): not audio a microphone or "
                "encoder produces",
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
    truncation (see `find_truncation`; FLAC and MP3 from this decode, not a second one)."""
    label = name or _label(source)
    decoded = _decode(source, label, limits)
    with _binary(source) as handle:
        truncation = _container_truncation(handle) or decoded.shortfall
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
