"""What an audio file's bytes say before and beside decoding: the encoding its header names
(WAV format tags, AU encodings), whether it states its own length (FLAC, MP3 with a Xing/Info/VBRI
frame), and whether a WAV, AU or AIFF file holds fewer bytes than its header promises.

Decoding (audio.py) reads these to name an encoding it refuses and to find a truncated file;
nothing here decodes a sample.
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

AudioSource = str | os.PathLike[str] | bytes | BinaryIO  # a path, encoded bytes or an open file

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
class FirstBytes:
    """What a file's header says before libsndfile reads it."""

    encoding: str | None  # e.g. "GSM 6.10 WAV" (WAV and AU files only)
    readable: bool  # False: an encoding the decoder does not read
    states_length: bool  # FLAC, or MP3 with a Xing/Info/VBRI frame: a frame count of its own


@contextlib.contextmanager
def binary(source: AudioSource) -> Iterator[BinaryIO]:
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


def read_first_bytes(source: AudioSource) -> FirstBytes:
    """The encoding and length facts of a file's first bytes (a path, bytes or an open file)."""
    with binary(source) as handle:
        wav = _wav_format(handle)
        if wav is not None:
            # Only a known encoding is named: an unknown tag is as likely a damaged header
            # (GTZAN's jazz.00054) as a codec, and libsndfile's reason says more then.
            name = _WAV_ENCODINGS.get(wav.tag)
            encoding = f"{name} WAV" if name else None
            return FirstBytes(encoding, wav.tag in _WAV_READABLE, False)
        handle.seek(0)
        au = _au_format(handle)
        if au is not None:
            code = au[2]
            name = _AU_ENCODINGS.get(code)
            encoding = f"{name} AU" if name else None
            return FirstBytes(encoding, code in _AU_SAMPLE_BYTES, False)
        handle.seek(0)
        if handle.read(4) == b"fLaC":
            return FirstBytes(None, True, True)  # STREAMINFO's total sample count
        handle.seek(0)
        return FirstBytes(None, True, _mp3_states_length(handle))


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


def container_truncation(handle: BinaryIO) -> Truncation | None:
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
