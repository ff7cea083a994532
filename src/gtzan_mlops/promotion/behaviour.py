"""The audio transforms of the promote stage's behavioural gate.

Before a model becomes champion, the promote stage checks that the genre it gives each test clip
stays the same when the clip is turned down (6, 12, 20 dB), starts later (its first 2 s cut),
is resampled to 44.1 kHz stereo, and is re-encoded as 128 kbps constant-bitrate MP3: at least
`min_unchanged` of the clips must keep their genre under every transform. A served genre
classifier meets exactly these copies of songs (quieter masters, excerpts that do not start at
the top, CD-rate stereo files, lossy downloads), and none of them changes what the music is, so
a model whose answer moves with them has learnt the recording rather than the genre.

Each transform turns mono float32 samples into encoded file bytes, what the served model takes:
the gate classifies them the way a request would be. The MP3 re-encoding runs the `lame`
command-line encoder (Debian package `lame`), like the duplicates stage runs Chromaprint's
`fpcalc`.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile

from gtzan_mlops.data.audio import resample
from gtzan_mlops.settings.schema import Behaviour

LAME_MISSING = (
    "lame not found on PATH: the MP3 check of promote.behaviour needs it "
    "(Debian package lame; `make setup` installs it)"
)
LAME_TIMEOUT_S = 120.0  # a 30 s clip encodes in about 0.1 s

# Layer III bitrates (kbps) by the 4-bit index of a frame header: MPEG-1 (32-48 kHz) and
# MPEG-2/2.5 (8-24 kHz). Index 0 is free format, 15 invalid.
_MPEG1_LAYER3_KBPS = (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, -1)
_MPEG2_LAYER3_KBPS = (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160, -1)


class BehaviourError(RuntimeError):
    """A transform that cannot run (lame missing, failing or not giving what was asked); the
    message says what happened and how to fix it."""


Encoder = Callable[[np.ndarray, int], bytes]


@dataclass(frozen=True)
class Transform:
    """One change a song's copy may have; `apply` gives the changed copy as encoded file bytes."""

    name: str  # e.g. "gain_-6db": a column or metric name
    description: str  # e.g. "turned down 6 dB": for reports
    encode: Encoder = field(repr=False, compare=False)

    def apply(self, samples: np.ndarray, sample_rate: int) -> bytes:
        """Mono float32 samples in [-1, 1] at `sample_rate` -> the transformed file's bytes."""
        waveform = np.asarray(samples, dtype=np.float32)
        if waveform.ndim != 1 or waveform.size == 0:
            raise ValueError(f"{self.name}: expected non-empty mono samples, got {waveform.shape}")
        # A read-only view: an encoder that tried to change the caller's array would fail here
        # instead of corrupting the clip the next transform gets.
        view = waveform.view()
        view.flags.writeable = False
        return self.encode(view, int(sample_rate))


def transforms(behaviour: Behaviour) -> list[Transform]:
    """The transforms of `promote.behaviour`: gains (in the order given), shift, resample, MP3."""
    found = [_gain(gain_db) for gain_db in behaviour.gains_db]
    found.append(_shift(behaviour.shift_s))
    found.append(_resampling(behaviour.resample_rate, behaviour.resample_channels))
    found.append(_mp3(behaviour.mp3_kbps))
    return found


def encode_wav(samples: np.ndarray, sample_rate: int) -> bytes:
    """16-bit PCM WAV bytes of float samples in [-1, 1]: mono (n,) or (n, channels).

    Quantised here rather than by libsndfile, as x * 32768 rounded: soundfile reads 16-bit
    samples back as int / 32768, so a clip that came from a 16-bit file round-trips exactly.
    Values beyond full scale are clipped, as any 16-bit file would have them.
    """
    waveform = np.asarray(samples, dtype=np.float64)
    if waveform.ndim not in (1, 2) or waveform.shape[0] == 0:
        raise ValueError(f"expected (n,) or (n, channels) samples, got {waveform.shape}")
    if not np.isfinite(waveform).all():
        raise ValueError("samples hold NaN or infinite values")
    if sample_rate <= 0:
        raise ValueError(f"sample rate must be positive, got {sample_rate}")
    pcm = np.clip(np.rint(waveform * 32768.0), -32768, 32767).astype(np.int16)
    buffer = io.BytesIO()
    soundfile.write(buffer, pcm, int(sample_rate), format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def require_tools(behaviour: Behaviour) -> None:
    """Fail early, before any model is scored, when a transform's program is missing."""
    if behaviour.mp3_kbps:
        _lame_path()


def unchanged_fraction(reference: Sequence[str], transformed: Sequence[str]) -> float:
    """Share of clips whose genre under a transform is the one they got untouched."""
    if len(reference) != len(transformed):
        raise ValueError(
            f"{len(reference)} reference genres but {len(transformed)} transformed ones"
        )
    if not reference:
        raise ValueError("no clips: the share of unchanged genres is undefined")
    same = sum(before == after for before, after in zip(reference, transformed, strict=True))
    return same / len(reference)


def _gain(gain_db: float) -> Transform:
    factor = 10.0 ** (gain_db / 20.0)

    def encode(samples: np.ndarray, sample_rate: int) -> bytes:
        # Written as 16-bit PCM on purpose: a quieter file also has coarser quantisation.
        return encode_wav(samples * factor, sample_rate)

    direction = "down" if gain_db < 0 else "up"
    return Transform(f"gain_{gain_db:g}db", f"turned {direction} {abs(gain_db):g} dB", encode)


def _shift(shift_s: float) -> Transform:
    def encode(samples: np.ndarray, sample_rate: int) -> bytes:
        offset = round(shift_s * sample_rate)
        if offset >= len(samples):
            raise ValueError(
                f"a clip of {len(samples) / sample_rate:.2f} s is not longer than the shift "
                f"of {shift_s:g} s"
            )
        return encode_wav(samples[offset:], sample_rate)

    return Transform(
        f"shift_{shift_s:g}s", f"shifted by {shift_s:g} s (the first {shift_s:g} s cut)", encode
    )


def _resampling(rate: int, channels: int) -> Transform:
    def encode(samples: np.ndarray, sample_rate: int) -> bytes:
        # The project's resampler (librosa, soxr_hq): the one the pipeline decodes with.
        resampled = resample(samples, sample_rate, rate)
        return encode_wav(np.repeat(resampled[:, None], channels, axis=1), rate)

    layout = "mono" if channels == 1 else f"{channels} identical channels"
    return Transform(f"resample_{rate}hz_{channels}ch", f"resampled to {rate} Hz, {layout}", encode)


def _mp3(kbps: int) -> Transform:
    def encode(samples: np.ndarray, sample_rate: int) -> bytes:
        return encode_mp3(samples, sample_rate, kbps)

    return Transform(
        f"mp3_{kbps}kbps", f"re-encoded as {kbps} kbps constant-bitrate MP3 (lame)", encode
    )


def _lame_path() -> str:
    found = shutil.which("lame")
    if found is None:
        raise BehaviourError(LAME_MISSING)
    return found


def encode_mp3(samples: np.ndarray, sample_rate: int, kbps: int) -> bytes:
    """Constant-bitrate MP3 bytes of mono float samples, encoded by `lame`.

    lame writes to a file, not stdout: only a seekable output gets the LAME tag (encoder delay
    and padding) written back into its first frame, and with it libsndfile decodes exactly the
    original samples; from stdout the decoded audio starts 1105 samples late (576 encoder delay
    + 529 decoder delay) and runs about 1200 samples long.
    """
    lame = _lame_path()
    with tempfile.TemporaryDirectory(prefix="gtzan-behaviour-") as folder:
        source, target = Path(folder) / "clip.wav", Path(folder) / "clip.mp3"
        source.write_bytes(encode_wav(samples, sample_rate))
        command = [lame, "--quiet", "--cbr", "-b", str(kbps), str(source), str(target)]
        try:
            result = subprocess.run(
                command, capture_output=True, text=True, timeout=LAME_TIMEOUT_S, check=False
            )
        except subprocess.TimeoutExpired:
            raise BehaviourError(
                f"lame did not finish encoding a {len(samples) / sample_rate:.1f} s clip in "
                f"{LAME_TIMEOUT_S:g} s"
            ) from None
        except OSError as error:  # removed or not executable since `which` found it
            raise BehaviourError(f"lame could not be run ({error}): {LAME_MISSING}") from None
        if result.returncode != 0:
            tail = result.stderr.strip()[-500:] or "(no output on stderr)"
            raise BehaviourError(f"lame failed with exit status {result.returncode}: {tail}")
        if not target.is_file():
            raise BehaviourError(f"lame exited 0 but wrote no MP3 ({' '.join(command)})")
        data = target.read_bytes()
    _check_mp3(data, kbps)
    return data


def _check_mp3(data: bytes, kbps: int) -> None:
    """The bytes decode (what the served model will do with them) at the bitrate asked for."""
    encoded = _first_frame_kbps(data)
    if encoded is None:
        raise BehaviourError("the file lame wrote does not start with an MPEG Layer III frame")
    if encoded != kbps:
        # lame silently clamps a bitrate the sample rate does not allow (at 22050 Hz, MPEG-2,
        # anything above 160 kbps becomes 160): the gate would report a check it did not make.
        raise BehaviourError(
            f"lame encoded at {encoded} kbps, not the {kbps} kbps asked for: "
            "promote.behaviour.mp3_kbps must be a standard MP3 bitrate the clips' sample rate "
            "allows (at most 160 kbps below 32 kHz)"
        )
    try:
        decoded, _ = soundfile.read(io.BytesIO(data), dtype="float32")
    except (RuntimeError, ValueError) as error:
        raise BehaviourError(
            f"the MP3 lame wrote does not decode with soundfile: {error}"
        ) from None
    if len(decoded) == 0:
        raise BehaviourError("the MP3 lame wrote decodes to no samples")


def _first_frame_kbps(data: bytes) -> int | None:
    """Bitrate of the first MPEG Layer III frame header (lame writes no ID3 tag unless asked)."""
    if len(data) < 4 or data[0] != 0xFF or data[1] & 0xE0 != 0xE0:
        return None
    version = (data[1] >> 3) & 0b11  # 3: MPEG-1, 2: MPEG-2, 0: MPEG-2.5
    layer = (data[1] >> 1) & 0b11  # 1: Layer III
    if layer != 1 or version == 1:
        return None
    table = _MPEG1_LAYER3_KBPS if version == 3 else _MPEG2_LAYER3_KBPS
    return table[data[2] >> 4]
