"""The 57 hand-crafted GTZAN features: one extraction function for the pipeline and for serving.

Definitions follow the widely used GTZAN feature table (features_30_sec.csv / features_3_sec.csv):
librosa's default frame settings, the mean and variance of each frame-level feature over the
excerpt, the harmonic/percussive waveforms of HPSS, and the estimated tempo.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import librosa
import numpy as np
from filelock import FileLock
from scipy import ndimage

from gtzan_mlops.settings.schema import FeatureSettings

log = logging.getLogger(__name__)

N_MFCC_REFERENCE = 20

_FRAME_FEATURES = (
    "chroma_stft",
    "rms",
    "spectral_centroid",
    "spectral_bandwidth",
    "rolloff",
    "zero_crossing_rate",
    "harmony",
    "perceptr",
)

# Column names and order of the reference table.
FEATURE_NAMES: tuple[str, ...] = (
    *(f"{name}_{stat}" for name in _FRAME_FEATURES for stat in ("mean", "var")),
    "tempo",
    *(
        f"mfcc{index}_{stat}"
        for index in range(1, N_MFCC_REFERENCE + 1)
        for stat in ("mean", "var")
    ),
)


def segment_samples(settings: FeatureSettings) -> int:
    """The samples of one segment at the features' sample rate."""
    return round(settings.segment_seconds * settings.sample_rate)


def max_segments(settings: FeatureSettings) -> int:
    """The most segments a clip is cut into: `clip_seconds / segment_seconds` of them."""
    return round(settings.clip_seconds / settings.segment_seconds)


# The settings of the widely used GTZAN feature table (features_30_sec.csv, features_3_sec.csv),
# which params.yaml's `features` reproduce: what benchmarks and tests compare against.
REFERENCE_SETTINGS = FeatureSettings(
    sample_rate=22050,
    n_fft=2048,
    hop_length=512,
    n_mfcc=N_MFCC_REFERENCE,
    clip_seconds=30.0,
    segment_seconds=3.0,
    last_segment_min_fraction=0.99,
    loudness_target_dbfs=None,  # the reference table was made from the clips as they are
    loudness_max_gain_db=40.0,
)


def feature_names(n_mfcc: int = N_MFCC_REFERENCE) -> tuple[str, ...]:
    """Column names for `n_mfcc` coefficients; `FEATURE_NAMES` for the reference's 20."""
    if n_mfcc == N_MFCC_REFERENCE:
        return FEATURE_NAMES
    return (
        *FEATURE_NAMES[: -2 * N_MFCC_REFERENCE],
        *(f"mfcc{index}_{stat}" for index in range(1, n_mfcc + 1) for stat in ("mean", "var")),
    )


@dataclass(frozen=True)
class ClipFeatures:
    """Features of one clip: the whole clip, and each full segment in order."""

    clip: np.ndarray  # shape (n_features,)
    segments: np.ndarray  # shape (n_segments, n_features)


class FeatureError(ValueError):
    """A waveform the features cannot be computed from (too short, empty, not finite)."""


def _mean_var(values: np.ndarray) -> tuple[float, float]:
    return float(np.mean(values)), float(np.var(values))


def median_filter_along(values: np.ndarray, size: int, axis: int) -> np.ndarray:
    """`scipy.ndimage.median_filter(values, size=<size along axis, 1 elsewhere>, mode="reflect")`.

    Equal element for element, about 8x faster: scipy filters a 1-D array with a fast sliding
    median but a 2-D array with a (1, size) footprint through its generic N-D path. So each line
    is padded the way mode "reflect" pads it (numpy's "symmetric"), the padded lines are joined
    into one 1-D array, filtered once, and the padding is cut away; a window centred on a kept
    sample never reaches past its own line's padding.
    """
    moved = np.moveaxis(values, axis, -1)
    length, half = moved.shape[-1], size // 2
    if size % 2 == 0 or length < size:  # edge cases the padding trick does not mirror exactly
        footprint = [1] * values.ndim
        footprint[axis] = size
        return ndimage.median_filter(values, size=footprint, mode="reflect")
    padded = np.pad(moved, [(0, 0)] * (moved.ndim - 1) + [(half, half)], mode="symmetric")
    filtered = ndimage.median_filter(padded.reshape(-1), size=size, mode="reflect")
    kept = filtered.reshape(padded.shape)[..., half : half + length]
    return np.ascontiguousarray(np.moveaxis(kept, -1, axis))


def hpss_waveforms(
    stft: np.ndarray, length: int, settings: FeatureSettings, kernel_size: int = 31
) -> tuple[np.ndarray, np.ndarray]:
    """`librosa.effects.hpss` from an STFT already computed: harmonic and percussive waveforms.

    The same steps as librosa 0.11 (`decompose.hpss` with power 2 and margin 1, then `istft`),
    with the two median filters done by `median_filter_along`.
    """
    magnitude, phase = librosa.magphase(stft)
    harmonic_median = median_filter_along(magnitude, kernel_size, axis=-1)
    percussive_median = median_filter_along(magnitude, kernel_size, axis=-2)
    harmonic_mask = librosa.util.softmask(
        harmonic_median, percussive_median, power=2.0, split_zeros=True
    )
    percussive_mask = librosa.util.softmask(
        percussive_median, harmonic_median, power=2.0, split_zeros=True
    )
    waveforms = []
    for mask in (harmonic_mask, percussive_mask):
        waveforms.append(
            librosa.istft(
                (magnitude * mask) * phase,
                dtype=np.float32,
                n_fft=settings.n_fft,
                hop_length=settings.hop_length,
                length=length,
            )
        )
    return waveforms[0], waveforms[1]


def excerpt_features(waveform: np.ndarray, settings: FeatureSettings) -> np.ndarray:
    """The features of one excerpt (a whole clip or one segment), in `feature_names` order.

    Each spectrum is computed once and shared: the STFT magnitude feeds chroma, centroid,
    bandwidth, rolloff and HPSS; the dB mel spectrogram feeds both MFCC and the onset envelope
    behind tempo. Values equal librosa's one-call-per-feature results (see `naive_features`).
    """
    sr, n_fft, hop = settings.sample_rate, settings.n_fft, settings.hop_length
    stft = librosa.stft(waveform, n_fft=n_fft, hop_length=hop)
    magnitude = np.abs(stft)
    power = magnitude**2
    mel_db = librosa.power_to_db(librosa.feature.melspectrogram(S=power, sr=sr, n_fft=n_fft))
    harmonic, percussive = hpss_waveforms(stft, len(waveform), settings)
    onset_envelope = librosa.onset.onset_strength(S=mel_db, sr=sr, n_fft=n_fft, hop_length=hop)
    tempo = librosa.feature.tempo(onset_envelope=onset_envelope, sr=sr, hop_length=hop)
    mfcc = librosa.feature.mfcc(S=mel_db, sr=sr, n_mfcc=settings.n_mfcc)

    values: list[float] = []
    for frames in (
        librosa.feature.chroma_stft(S=power, sr=sr, n_fft=n_fft, hop_length=hop),
        librosa.feature.rms(y=waveform, frame_length=n_fft, hop_length=hop),
        librosa.feature.spectral_centroid(S=magnitude, sr=sr, n_fft=n_fft, hop_length=hop),
        librosa.feature.spectral_bandwidth(S=magnitude, sr=sr, n_fft=n_fft, hop_length=hop),
        librosa.feature.spectral_rolloff(S=magnitude, sr=sr, n_fft=n_fft, hop_length=hop),
        librosa.feature.zero_crossing_rate(waveform, frame_length=n_fft, hop_length=hop),
        harmonic,
        percussive,
    ):
        values.extend(_mean_var(frames))
    values.append(float(tempo[0]))
    for coefficient in mfcc:
        values.extend(_mean_var(coefficient))
    return np.asarray(values, dtype=np.float64)


def normalise_loudness(
    waveform: np.ndarray, sample_rate: int, settings: FeatureSettings
) -> np.ndarray:
    """`waveform` (at `sample_rate`) scaled so that the RMS of its first `clip_seconds`, the part
    the features describe, is `settings.loudness_target_dbfs` (dBFS: 20 log10 of the RMS, full
    scale 1.0), with at most `loudness_max_gain_db` of gain; as float32.

    Unchanged when the target is None (normalisation off) and when that part is all zeros (or
    not finite): the quality gates and `check_waveform` refuse those elsewhere.
    """
    target = settings.loudness_target_dbfs
    if target is None:
        return waveform
    samples = np.asarray(waveform, dtype=np.float32)
    # One RMS over the clip (a served song's 30 s excerpt), not per segment or frame: a quieter
    # copy of a song is the same song, but a quiet intro inside it is music, and the segments
    # keep their loudness relative to each other. Measured over the first clip_seconds, which
    # is what a longer training file's features and a served excerpt both describe.
    measured = samples[: round(settings.clip_seconds * sample_rate)]
    rms = float(np.sqrt(np.mean(np.square(measured, dtype=np.float64)))) if measured.size else 0.0
    if rms == 0.0 or not np.isfinite(rms):
        return samples
    # The cap: a near-silent clip (a fade, a hiss) is not blown up into loud noise. There is
    # none on attenuation: a loud clip always comes down to the target.
    gain = min(10.0 ** (target / 20.0) / rms, 10.0 ** (settings.loudness_max_gain_db / 20.0))
    return (samples.astype(np.float64) * gain).astype(np.float32)


def segment_bounds(n_samples: int, settings: FeatureSettings) -> list[tuple[int, int]]:
    """Sample ranges of the segments of a clip: back to back from the start, at most
    `clip_seconds / segment_seconds` of them. A trailing partial segment counts only if it has
    `last_segment_min_fraction` of a segment's samples; it then ends at the clip's end (overlapping
    its neighbour by the missing samples), so every segment is exactly one segment long."""
    length = segment_samples(settings)
    full = min(n_samples // length, max_segments(settings))
    bounds = [(index * length, (index + 1) * length) for index in range(full)]
    remainder = n_samples - full * length
    if full < max_segments(settings) and remainder >= settings.last_segment_min_fraction * length:
        bounds.append((n_samples - length, n_samples))
    return bounds


def check_waveform(waveform: np.ndarray, settings: FeatureSettings) -> np.ndarray:
    """A mono, finite waveform of at least one segment, as float32; else FeatureError."""
    samples = np.asarray(waveform, dtype=np.float32)
    if samples.ndim != 1:
        raise FeatureError(f"expected a mono waveform, got an array of shape {samples.shape}")
    if len(samples) < segment_samples(settings):
        raise FeatureError(
            f"{len(samples) / settings.sample_rate:.2f} s of audio is shorter than one "
            f"{settings.segment_seconds:g} s segment"
        )
    if not np.all(np.isfinite(samples)):
        raise FeatureError("waveform contains NaN or infinite samples")
    return samples


def extract_clip(
    waveform: np.ndarray, settings: FeatureSettings, include_clip: bool = True
) -> ClipFeatures:
    """The one extraction function of the project: features of a whole clip and of each of its
    segments, from a mono waveform at `settings.sample_rate` (see `audio.load_waveform`).

    The pipeline stores both; a served model trained on segments needs only the segments, so it
    passes `include_clip=False` (and gets an empty `clip`).
    """
    samples = check_waveform(waveform, settings)
    n_features = len(feature_names(settings.n_mfcc))
    clip = excerpt_features(samples, settings) if include_clip else np.empty(0)
    segments = [
        excerpt_features(samples[start:stop], settings)
        for start, stop in segment_bounds(len(samples), settings)
    ]
    return ClipFeatures(clip=clip, segments=np.reshape(segments, (len(segments), n_features)))


def jit_lock_path() -> Path:
    """The lock `warm_up` holds: beside numba's cache (NUMBA_CACHE_DIR when set; by default
    numba caches beside librosa's modules, in this environment's site-packages)."""
    return Path(os.environ.get("NUMBA_CACHE_DIR") or sys.prefix) / ".gtzan-mlops-jit.lock"


def warm_up(settings: FeatureSettings) -> None:
    """Run the extractor once, one process at a time, on a synthetic segment of noise.

    librosa compiles some of its functions with numba on first use (the pitch tracking behind
    chroma among them) and numba keeps the machine code in an on-disk cache that is not safe for
    concurrent writers: two fresh processes compiling at once can leave cache files of both, and
    every later process that loads them dies of a segmentation fault (seen: the two pool workers
    of the first features stage in a new environment). Under the lock the first process
    compiles and writes the cache; the others, and every process started after it, only read
    it. Call it before starting worker processes, and where a process that may start beside
    others (a serving worker) loads.
    """
    noise = (0.1 * np.random.default_rng(0).standard_normal(segment_samples(settings))).astype(
        np.float32
    )
    path = jit_lock_path()
    with contextlib.ExitStack() as held:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            held.enter_context(FileLock(path))
        except OSError as error:  # read-only environment: numba cannot write its cache there
            log.warning(
                "no lock for the JIT warm-up at %s (%s): warming up without it", path, error
            )
        extract_clip(noise, settings)


def naive_features(waveform: np.ndarray, settings: FeatureSettings) -> np.ndarray:
    """The features the way most GTZAN projects compute them: one librosa call per feature, each
    recomputing its own STFT from the waveform. Kept as the definition `excerpt_features` must
    equal, and as the baseline of benchmarks/extract.py."""
    y, sr, n_fft, hop = waveform, settings.sample_rate, settings.n_fft, settings.hop_length
    harmonic, percussive = librosa.effects.hpss(y, n_fft=n_fft, hop_length=hop)
    values: list[float] = []
    for frames in (
        librosa.feature.chroma_stft(y=y, sr=sr, n_fft=n_fft, hop_length=hop),
        librosa.feature.rms(y=y, frame_length=n_fft, hop_length=hop),
        librosa.feature.spectral_centroid(y=y, sr=sr, n_fft=n_fft, hop_length=hop),
        librosa.feature.spectral_bandwidth(y=y, sr=sr, n_fft=n_fft, hop_length=hop),
        librosa.feature.spectral_rolloff(y=y, sr=sr, n_fft=n_fft, hop_length=hop),
        librosa.feature.zero_crossing_rate(y, frame_length=n_fft, hop_length=hop),
        harmonic,
        percussive,
    ):
        values.extend(_mean_var(frames))
    values.append(float(librosa.feature.tempo(y=y, sr=sr, hop_length=hop)[0]))
    mfcc = librosa.feature.mfcc(y=y, sr=sr, n_mfcc=settings.n_mfcc, n_fft=n_fft, hop_length=hop)
    for coefficient in mfcc:
        values.extend(_mean_var(coefficient))
    return np.asarray(values, dtype=np.float64)
