"""The synthetic demo set: GTZAN-shaped clips generated from a seed, so that `dvc repro` runs
offline on a fresh clone (params `data.source: demo`).

Each genre has its own recipe (pitch range, harmonics, note rate, beat, noise colour,
distortion) with random variation per clip, so the features separate the genres without any two
clips being alike. It is not music and says nothing about real accuracy; every file it writes
is named `synthetic-<genre>.000NN.wav`.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile

log = logging.getLogger(__name__)

# Samples in one period of a synthetic note's waveform table.
_WAVETABLE_SIZE = 4096


@dataclass(frozen=True)
class SyntheticRecipe:
    """How one genre's synthetic clips sound; every clip draws its own values around these."""

    pitch_hz: tuple[float, float]  # range of the notes' fundamentals
    harmonics: int  # partials per note
    brightness: float  # partial k has amplitude k ** -brightness: low = bright
    notes_per_s: float
    attack_s: float  # note envelope: rise time, then exponential decay
    decay_per_s: float
    tempo_bpm: tuple[float, float]  # range of the beat's tempo
    kick: float  # level of a low thump on every beat
    hat: float  # level of a short high noise burst between beats
    hat_offbeat_only: bool  # hats only halfway between beats (disco, reggae) or on every half beat
    noise: float  # level of a steady background noise
    noise_colour: str  # white, pink (power ~ 1/f) or brown (~ 1/f**2)
    drive: float  # tanh distortion of the tonal part; 0 = clean
    tremolo_hz: float  # slow amplitude swell; 0 = none


# Filters turning white noise coloured: pink (power ~ 1/f, Kellet's approximation) and brown
# (~ 1/f**2, a leaky integrator), as (numerator, denominator) coefficients.
_NOISE_FILTERS = {
    "white": ([1.0], [1.0]),
    "pink": (
        [0.049922035, -0.095993537, 0.050612699, -0.004408786],
        [1.0, -2.494956002, 2.017265875, -0.5221894],
    ),
    "brown": ([1.0], [1.0, -0.995]),
}  # fmt: skip


# One recipe per GTZAN genre; the contrasts (bass vs. treble, clean vs. distorted, busy vs.
# sparse, fast vs. slow beat, noise colour) are what the 57 features pick up.
TRACK_PREFIX = "synthetic-"  # every generated clip says what it is in its name
SYNTHETIC_RECIPES: dict[str, SyntheticRecipe] = {
    "blues": SyntheticRecipe(
        pitch_hz=(90, 330), harmonics=7, brightness=1.1, notes_per_s=1.5, attack_s=0.02,
        decay_per_s=2.5, tempo_bpm=(68, 84), kick=0.35, hat=0.15, hat_offbeat_only=False,
        noise=0.02, noise_colour="pink", drive=0.8, tremolo_hz=0.0,
    ),
    "classical": SyntheticRecipe(
        pitch_hz=(220, 1100), harmonics=4, brightness=2.2, notes_per_s=1.8, attack_s=0.25,
        decay_per_s=0.6, tempo_bpm=(60, 80), kick=0.0, hat=0.0, hat_offbeat_only=False,
        noise=0.005, noise_colour="pink", drive=0.0, tremolo_hz=0.4,
    ),
    "country": SyntheticRecipe(
        pitch_hz=(160, 650), harmonics=9, brightness=0.9, notes_per_s=3.0, attack_s=0.005,
        decay_per_s=5.0, tempo_bpm=(100, 120), kick=0.3, hat=0.25, hat_offbeat_only=False,
        noise=0.01, noise_colour="white", drive=0.0, tremolo_hz=0.0,
    ),
    "disco": SyntheticRecipe(
        pitch_hz=(110, 440), harmonics=5, brightness=1.4, notes_per_s=4.0, attack_s=0.01,
        decay_per_s=3.0, tempo_bpm=(116, 128), kick=0.8, hat=0.5, hat_offbeat_only=True,
        noise=0.01, noise_colour="white", drive=0.0, tremolo_hz=0.0,
    ),
    "hiphop": SyntheticRecipe(
        pitch_hz=(55, 165), harmonics=6, brightness=1.2, notes_per_s=1.0, attack_s=0.01,
        decay_per_s=1.5, tempo_bpm=(84, 96), kick=1.0, hat=0.35, hat_offbeat_only=False,
        noise=0.03, noise_colour="brown", drive=0.5, tremolo_hz=0.0,
    ),
    "jazz": SyntheticRecipe(
        pitch_hz=(110, 880), harmonics=5, brightness=1.6, notes_per_s=5.0, attack_s=0.01,
        decay_per_s=3.5, tempo_bpm=(130, 180), kick=0.1, hat=0.3, hat_offbeat_only=False,
        noise=0.01, noise_colour="pink", drive=0.0, tremolo_hz=0.0,
    ),
    "metal": SyntheticRecipe(
        pitch_hz=(80, 250), harmonics=12, brightness=0.6, notes_per_s=8.0, attack_s=0.005,
        decay_per_s=1.0, tempo_bpm=(160, 200), kick=0.7, hat=0.4, hat_offbeat_only=False,
        noise=0.15, noise_colour="white", drive=6.0, tremolo_hz=0.0,
    ),
    "pop": SyntheticRecipe(
        pitch_hz=(250, 800), harmonics=6, brightness=1.3, notes_per_s=2.5, attack_s=0.01,
        decay_per_s=2.0, tempo_bpm=(100, 124), kick=0.6, hat=0.3, hat_offbeat_only=False,
        noise=0.01, noise_colour="pink", drive=0.0, tremolo_hz=0.0,
    ),
    "reggae": SyntheticRecipe(
        pitch_hz=(60, 200), harmonics=4, brightness=1.5, notes_per_s=2.0, attack_s=0.005,
        decay_per_s=6.0, tempo_bpm=(60, 76), kick=0.5, hat=0.45, hat_offbeat_only=True,
        noise=0.02, noise_colour="pink", drive=0.0, tremolo_hz=0.0,
    ),
    "rock": SyntheticRecipe(
        pitch_hz=(100, 400), harmonics=10, brightness=0.8, notes_per_s=4.0, attack_s=0.005,
        decay_per_s=1.5, tempo_bpm=(112, 140), kick=0.6, hat=0.35, hat_offbeat_only=False,
        noise=0.05, noise_colour="white", drive=2.5, tremolo_hz=0.0,
    ),
}  # fmt: skip


def synthetic_recipe(genre: str) -> SyntheticRecipe:
    """The genre's recipe; a genre without one gets a recipe derived from its name."""
    if genre in SYNTHETIC_RECIPES:
        return SYNTHETIC_RECIPES[genre]
    rng = np.random.default_rng(zlib.crc32(genre.encode()))
    low = float(rng.uniform(50, 500))
    return SyntheticRecipe(
        pitch_hz=(low, low * float(rng.uniform(2, 4))),
        harmonics=int(rng.integers(2, 12)),
        brightness=float(rng.uniform(0.6, 2.2)),
        notes_per_s=float(rng.uniform(1, 8)),
        attack_s=float(rng.uniform(0.005, 0.2)),
        decay_per_s=float(rng.uniform(0.5, 6)),
        tempo_bpm=(float(rng.uniform(60, 160)),) * 2,
        kick=float(rng.uniform(0, 1)),
        hat=float(rng.uniform(0, 0.5)),
        hat_offbeat_only=bool(rng.integers(2)),
        noise=float(rng.uniform(0, 0.1)),
        noise_colour=str(rng.choice(list(_NOISE_FILTERS))),
        drive=float(rng.uniform(0, 5)),
        tremolo_hz=0.0,
    )


def _coloured_noise(rng: np.random.Generator, n: int, colour: str) -> np.ndarray:
    """White, pink or brown noise scaled to unit peak."""
    from scipy import signal  # imported here: it takes a second, and only the demo needs it

    numerator, denominator = _NOISE_FILTERS[colour]
    noise = signal.lfilter(numerator, denominator, rng.standard_normal(n))
    return noise / (np.max(np.abs(noise)) or 1.0)


def _pulses(n: int, positions: np.ndarray, levels: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """`kernel` started at each sample position, scaled by its level."""
    inside = positions < n
    indices = positions[inside, None] + np.arange(len(kernel))
    weights = levels[inside, None] * kernel
    return np.bincount(indices.ravel(), weights.ravel(), minlength=n + len(kernel))[:n]


def synthetic_clip(
    genre: str, rng: np.random.Generator, duration_s: float, sample_rate: int
) -> np.ndarray:
    """One synthetic clip of `genre` as float32 samples with a peak of 0.5 to 0.9.

    A tonal line (random notes in the genre's range, harmonic partials, a plucked or swelling
    envelope, optional distortion), a beat of low thumps and noise bursts at a random tempo in
    the genre's range, and coloured background noise. Levels vary by up to ±25% per clip.
    """
    recipe = synthetic_recipe(genre)
    n = max(1, round(duration_s * sample_rate))
    t = np.arange(n) / sample_rate

    def vary(value: float) -> float:
        return value * float(rng.uniform(0.75, 1.25))

    # Tonal line: note k covers [k, k+1) / notes_per_s seconds.
    notes_per_s = vary(recipe.notes_per_s)
    position = t * notes_per_s
    note_index = position.astype(np.int64)
    low, high = recipe.pitch_hz
    pitches = np.exp(rng.uniform(np.log(low), np.log(high), note_index[-1] + 1))
    frequency = pitches[note_index]
    # One period of the note's waveform from a table: partial k has amplitude k**-brightness,
    # and a note keeps only the partials below Nyquist (more would alias).
    period = np.arange(_WAVETABLE_SIZE) / _WAVETABLE_SIZE
    ks = np.arange(1, recipe.harmonics + 1)
    partials = np.sin(2 * np.pi * (ks[:, None] * period + rng.uniform(0, 1, (len(ks), 1))))
    tables = np.cumsum(partials * ks[:, None] ** -recipe.brightness, axis=0)  # row m: m+1 partials
    partial_count = np.clip((0.45 * sample_rate // pitches).astype(np.int64), 1, len(ks))
    cycles = np.cumsum(frequency) / sample_rate
    table_index = ((cycles % 1.0) * _WAVETABLE_SIZE).astype(np.int64)
    tone = tables[partial_count[note_index] - 1, table_index]
    in_note_s = (position - note_index) / notes_per_s
    envelope = np.minimum(1.0, in_note_s / recipe.attack_s) * np.exp(
        -vary(recipe.decay_per_s) * in_note_s
    )
    tone *= envelope
    if recipe.drive > 0:
        drive = vary(recipe.drive)
        tone = np.tanh(drive * tone / (np.max(np.abs(tone)) or 1.0)) / np.tanh(drive)
    else:
        tone /= np.max(np.abs(tone)) or 1.0
    if recipe.tremolo_hz > 0:
        tone *= 0.6 + 0.4 * np.sin(2 * np.pi * vary(recipe.tremolo_hz) * t)

    # Beat: thumps on every beat, noise bursts between beats.
    beat_s = 60.0 / rng.uniform(*recipe.tempo_bpm)
    beats = np.arange(0.0, duration_s, beat_s)
    kernel_t = np.arange(round(0.25 * sample_rate)) / sample_rate
    thump = np.sin(2 * np.pi * 55 * kernel_t) * np.exp(-kernel_t / 0.08)
    burst = np.diff(rng.standard_normal(len(kernel_t) + 1)) * np.exp(-kernel_t / 0.02) / 2
    hats = beats + beat_s / 2 if recipe.hat_offbeat_only else np.arange(0, duration_s, beat_s / 2)
    beat = recipe.kick * _pulses(
        n,
        np.round(beats * sample_rate).astype(np.int64),
        rng.uniform(0.8, 1.0, len(beats)),
        thump,
    ) + recipe.hat * _pulses(
        n, np.round(hats * sample_rate).astype(np.int64), rng.uniform(0.6, 1.0, len(hats)), burst
    )

    noise = vary(recipe.noise) * _coloured_noise(rng, n, recipe.noise_colour)
    mix = vary(0.6) * tone + beat + noise
    mix *= rng.uniform(0.5, 0.9) / (np.max(np.abs(mix)) or 1.0)
    return mix.astype(np.float32)


def synthetic_rng(seed: int, genre: str, clip_index: int) -> np.random.Generator:
    """The clip's own random stream: a clip does not change when other genres or clips do."""
    return np.random.default_rng([seed, zlib.crc32(genre.encode()), clip_index])


def generate_synthetic_demo(
    genres: Iterable[str],
    raw_dir: Path,
    clips_per_genre: int,
    duration_s: float,
    sample_rate: int,
    seed: int,
) -> list[Path]:
    """Write `clips_per_genre` synthetic 16-bit mono WAVs per genre; the same seed, the same bytes.

    Files are `raw_dir/genres/<genre>/synthetic-<genre>.000NN.wav`.
    """
    written = []
    for genre in genres:
        folder = raw_dir / "genres" / genre
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(clips_per_genre):
            rng = synthetic_rng(seed, genre, index)
            samples = synthetic_clip(genre, rng, duration_s, sample_rate)
            path = folder / f"{TRACK_PREFIX}{genre}.{index:05d}.wav"
            soundfile.write(path, samples, sample_rate, subtype="PCM_16", format="WAV")
            written.append(path)
    log.info("synthetic demo: generated %d clips in %s", len(written), raw_dir / "genres")
    return written
