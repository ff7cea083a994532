"""Decompression bombs, built in code: a few KiB of FLAC or Ogg that declare gigabytes of samples.
Used by the serving tests and by benchmarks/serve.py --load. Also files whose headers lie or name
encodings the served model refuses (tests/model/test_audio_inputs.py)."""

from __future__ import annotations

import io
import struct

import numpy as np
import soundfile


def flac_of_zeros(rate: int, channels: int, seconds: float, claim_seconds: float | None = None):
    """A FLAC of digital silence (a few hundred KiB even at 655 kHz x 8 channels). With
    `claim_seconds`, its STREAMINFO header claims that duration instead: how a few KiB ask a
    decoder for hours of samples."""
    buffer = io.BytesIO()
    block = np.zeros((rate, channels), dtype=np.int16)
    with soundfile.SoundFile(buffer, "w", rate, channels, "PCM_16", format="FLAC") as audio:
        for _ in range(int(seconds)):
            audio.write(block)
    data = bytearray(buffer.getvalue())
    if claim_seconds is not None:
        # fLaC, a 4-byte block header, then STREAMINFO: rate(20) channels(3) bps(5) and the
        # 36-bit total sample count share the 8 bytes at offset 18.
        packed = int.from_bytes(data[18:26], "big")
        packed = (packed & ~(2**36 - 1)) | int(claim_seconds * rate)
        data[18:26] = packed.to_bytes(8, "big")
    return bytes(data)


def ogg_of_zeros(channels: int, seconds: float = 2.0) -> bytes:
    buffer = io.BytesIO()
    with soundfile.SoundFile(buffer, "w", 44100, channels, format="OGG") as audio:
        audio.write(np.zeros((int(44100 * seconds), channels), dtype=np.float32))
    return buffer.getvalue()


def mp3_claiming(data: bytes, seconds: float) -> bytes:
    """An MP3 as LAME writes it (no ID3 tag: its first frame holds the Xing/Info header) whose
    Xing header claims `seconds` of audio, whatever it holds: only the frame count is patched."""
    if data[0] != 0xFF or data[1] & 0xE0 != 0xE0:
        raise ValueError("the file does not start with an MPEG frame")
    # The tag follows the side information: 13, 21 or 36 bytes into the frame.
    at = next((at for at in (13, 21, 36) if data[at : at + 4] in (b"Xing", b"Info")), None)
    if at is None or not struct.unpack(">I", data[at + 4 : at + 8])[0] & 1:
        raise ValueError("no Xing/Info header with a frame count")
    version, rate_index = (data[1] >> 3) & 0b11, (data[2] >> 2) & 0b11
    rates = {0b11: (44100, 48000, 32000), 0b10: (22050, 24000, 16000), 0b00: (11025, 12000, 8000)}
    samples_per_frame = 1152 if version == 0b11 else 576  # MPEG-1; MPEG-2 and 2.5 hold half
    frames = round(seconds * rates[version][rate_index] / samples_per_frame)
    return data[: at + 8] + struct.pack(">I", frames) + data[at + 12 :]


def synthetic_wav_with_format_tag(
    tag: int, rate: int, payload: bytes, fmt_extra: bytes = b""
) -> bytes:
    """A hand-written RIFF/WAVE of mono `payload` bytes with format tag `tag` (e.g. 0x0031
    GSM 6.10, 0x0040 G.721 ADPCM) and `fmt_extra` after the 16 bytes every fmt chunk has."""
    # GSM 6.10: 65-byte blocks of 320 samples; G.721: 4 bits a sample. Others: a byte a sample.
    block_align, bits, byte_rate = {
        0x0031: (65, 0, rate * 65 // 320),
        0x0040: (1, 4, rate // 2),
    }.get(tag, (1, 8, rate))
    fmt = struct.pack("<HHIIHH", tag, 1, rate, byte_rate, block_align, bits) + fmt_extra
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    body += b"data" + struct.pack("<I", len(payload)) + payload
    return b"RIFF" + struct.pack("<I", len(body)) + body


def synthetic_au_with_encoding(encoding: int, rate: int, payload: bytes) -> bytes:
    """A hand-written Sun/NeXT .au of mono `payload` bytes with `encoding` (23 G.721 ADPCM,
    24 G.722, 25 and 26 G.723 ADPCM)."""
    return b".snd" + struct.pack(">5I", 24, len(payload), encoding, rate, 1) + payload
