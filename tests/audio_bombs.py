"""Decompression bombs, built in code: a few KiB of FLAC or Ogg that declare gigabytes of samples.
Used by the serving tests and by benchmarks/serve.py --load."""

from __future__ import annotations

import io

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
