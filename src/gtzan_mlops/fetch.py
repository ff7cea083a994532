"""The `fetch` stage: the audio under data/raw/genres/<genre>/ and the manifest describing it.

`data.source` in params.yaml picks where the audio comes from:

- `demo`: a small synthetic set generated here from a seed, so `dvc repro` runs offline on a
  fresh clone. Each genre has its own recipe (pitch range, harmonics, note rate, beat, noise
  colour, distortion) with random variation per clip, so the features separate the genres
  without any two clips being alike. It is not music and says nothing about real accuracy.
- `local`: an existing GTZAN-style folder (`genres/<genre>/<genre>.000NN.{au,wav}`), copied.
- `gtzan`: the full collection, from an extracted folder, an existing `genres.tar.gz`, or a
  download from the mirrors (resumed after a broken transfer, md5 checked, extracted safely).

Every audio file copied into data/raw is listed in data/manifest.csv. One that cannot be used
(undecodable, empty, truncated, too short, silent, or in a genre folder not in params `genres`)
is listed with the reason instead of failing the stage; the features stage skips it.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tarfile
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd
import requests
import soundfile
import urllib3
from tqdm import tqdm

from gtzan_mlops.audio import (
    AUDIO_EXTENSIONS,
    AudioError,
    AudioInfo,
    QualityGates,
    find_truncation,
    inspect_audio,
    quality_problems,
)
from gtzan_mlops.cli import progress_off, stage_main
from gtzan_mlops.config import ConfigError, resolve_path, section
from gtzan_mlops.tracking import file_digest

log = logging.getLogger(__name__)

# The stage's outputs, as dvc.yaml declares them (relative to the repository root).
RAW_DIR = "data/raw"
MANIFEST = "data/manifest.csv"

SOURCES = ("demo", "local", "gtzan")
SYNTHETIC_SOURCE = "synthetic-demo"  # the manifest's `source` for generated clips
ARCHIVE_NAME = "genres.tar.gz"  # the official archive's name, kept under this name in the cache
MANIFEST_COLUMNS = (
    "path",
    "genre",
    "track_id",
    "duration_s",
    "sample_rate",
    "channels",
    "sha256",
    "status",
    "source",
)
OK = "ok"

_CHUNK_BYTES = 1 << 20
# Samples in one period of a synthetic note's waveform table.
_WAVETABLE_SIZE = 4096


class FetchError(RuntimeError):
    """The stage as a whole cannot produce the audio (download, checksum or archive failure)."""


class DownloadError(FetchError):
    """No mirror delivered the archive; the message lists each mirror and why."""


class ChecksumError(FetchError):
    """A file's md5 differs from the expected one."""


class UnsafeArchiveError(FetchError):
    """An archive member would write outside the target folder, or is a link or device."""


# --------------------------------------------------------------------------------------------
# demo: synthetic clips


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
            path = folder / f"synthetic-{genre}.{index:05d}.wav"
            soundfile.write(path, samples, sample_rate, subtype="PCM_16", format="WAV")
            written.append(path)
    log.info("synthetic demo: generated %d clips in %s", len(written), raw_dir / "genres")
    return written


# --------------------------------------------------------------------------------------------
# local and gtzan folders


def _is_audio_file(path: Path) -> bool:
    # Hidden files are skipped: macOS leaves `._name.au` resource forks beside real clips.
    return (
        path.suffix.lower() in AUDIO_EXTENSIONS and not path.name.startswith(".") and path.is_file()
    )


def genre_audio_files(genres_dir: Path) -> list[Path]:
    """Audio files at `genres_dir/<genre>/<file>`, sorted by genre then name."""
    if not genres_dir.is_dir():
        return []
    return sorted(
        path
        for folder in genres_dir.iterdir()
        if folder.is_dir() and not folder.name.startswith(".")
        for path in folder.iterdir()
        if _is_audio_file(path)
    )


def find_genres_folder(folder: Path, setting: str) -> Path:
    """The `genres/` folder of a GTZAN-style collection: `folder/genres`, or `folder` itself.

    `setting` names the params key the folder came from, for the error message.
    """
    if not folder.is_dir():
        raise ConfigError(f"params.yaml: {setting}: {folder}: no such folder")
    for candidate in (folder / "genres", folder):
        if genre_audio_files(candidate):
            return candidate
    raise ConfigError(
        f"params.yaml: {setting}: {folder}: no audio files at genres/<genre>/<file> in it, "
        f"nor at <genre>/<file>"
    )


def copy_genre_folder(genres_dir: Path, raw_dir: Path) -> list[Path]:
    """Copy each audio file of `genres_dir/<genre>/` to `raw_dir/genres/<genre>/`, same name.

    Files in genre folders missing from params `genres` are copied too: the manifest lists them
    as unusable, so a misnamed folder is reported rather than silently dropped.
    """
    sources = genre_audio_files(genres_dir)
    copied = []
    for source in sources:
        target = raw_dir / "genres" / source.parent.name / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
        copied.append(target)
    log.info("copied %d audio files from %s", len(copied), genres_dir)
    return copied


# --------------------------------------------------------------------------------------------
# gtzan archive: checksum, safe extraction, download


def verify_md5(path: Path, expected: str, label: str | None = None) -> None:
    """Raise ChecksumError naming `label` (default: the path) unless the md5 matches."""
    actual = file_digest(path, "md5")
    if actual != expected.lower():
        raise ChecksumError(f"{label or path}: md5 mismatch: expected {expected}, got {actual}")


def _member_problem(member: tarfile.TarInfo) -> str | None:
    """Why extracting `member` would be unsafe, or None."""
    name = member.name.replace("\\", "/")
    if name.startswith("/") or PurePosixPath(name).is_absolute() or name[1:3] == ":/":
        return "absolute path"
    if ".." in PurePosixPath(name).parts:
        return "path contains '..'"
    if member.issym() or member.islnk():
        return f"link to '{member.linkname}'"
    if member.isdev():
        return "device or FIFO"
    if not (member.isfile() or member.isdir()):
        return "not a regular file or folder"
    return None


def audio_members(tar: tarfile.TarFile, archive: Path) -> list[tarfile.TarInfo]:
    """The archive's audio files under `genres/<genre>/`, after checking EVERY member is safe.

    Raises UnsafeArchiveError naming the first absolute, `..`, link or device member, before
    anything is extracted. Other files (the real archive's `.mf` lists) are left out.
    """
    selected = []
    try:
        members = tar.getmembers()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
        raise FetchError(f"{archive}: not a readable tar archive ({error})") from error
    for member in members:
        problem = _member_problem(member)
        if problem:
            raise UnsafeArchiveError(
                f"{archive}: unsafe member '{member.name}' ({problem}); nothing was extracted"
            )
        parts = [part for part in PurePosixPath(member.name).parts if part != "."]
        if (
            member.isfile()
            and len(parts) == 3
            and parts[0] == "genres"
            and not parts[2].startswith(".")
            and PurePosixPath(parts[2]).suffix.lower() in AUDIO_EXTENSIONS
        ):
            selected.append(member)
    return selected


def extract_genres_archive(archive: Path, raw_dir: Path) -> int:
    """Extract the audio of a genres.tar.gz into `raw_dir/genres/<genre>/`; returns the count."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = audio_members(tar, archive)
            if not members:
                raise FetchError(f"{archive}: no audio files under genres/<genre>/ in it")
            # filter="data" is a second guard: tarfile itself refuses anything unsafe.
            tar.extractall(raw_dir, members=members, filter="data")
    except tarfile.FilterError as error:
        raise UnsafeArchiveError(f"{archive}: unsafe member ({error})") from error
    except (tarfile.TarError, EOFError, zlib.error) as error:
        raise FetchError(f"{archive}: not a readable tar archive ({error})") from error
    log.info("extracted %d audio files from %s", len(members), archive)
    return len(members)


class _AttemptFailed(Exception):
    """One download attempt broke off in a way worth retrying (dropped, short, timed out, 5xx)."""


class _MirrorRefused(Exception):
    """The mirror answered with a client error (e.g. 404): retrying it cannot help."""


def _content_range_start(header: str | None) -> int | None:
    """The first byte of a `Content-Range: bytes <start>-<end>/<total>` header."""
    if not header or not header.startswith("bytes "):
        return None
    first = header[len("bytes ") :].split("-", 1)[0]
    return int(first) if first.isdigit() else None


def _reason(error: BaseException) -> str:
    """The innermost cause of a requests/urllib3 error in a few words ("timed out", "[Errno
    111] Connection refused"), not the nested reprs of every wrapper."""
    while True:
        nested = getattr(error, "reason", None)
        if not isinstance(nested, BaseException):
            nested = error.__cause__ or next(
                (arg for arg in error.args if isinstance(arg, BaseException)), None
            )
        if nested is None:
            break
        error = nested
    if isinstance(error, TimeoutError | urllib3.exceptions.TimeoutError | requests.Timeout):
        return "timed out"
    return str(error) or type(error).__name__


def _transfer(url: str, part: Path, timeout_s: float, show_progress: bool) -> None:
    """One attempt: append to `part` from where it ends (HTTP Range), or restart it on a 200."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    with requests.get(url, headers=headers, stream=True, timeout=timeout_s) as response:
        status = response.status_code
        if status == 416 and have:
            # The range starts at or past the end: complete already, or a stale longer .part.
            total = (response.headers.get("Content-Range") or "").rpartition("/")[2]
            if total.isdigit() and int(total) == have:
                return
            part.unlink()
            raise _AttemptFailed(f"server refused to resume at byte {have} (HTTP 416)")
        if status >= 400:
            reason = f"HTTP {status} {response.reason}"
            if status < 500 and status not in (408, 429):
                raise _MirrorRefused(reason)
            raise _AttemptFailed(reason)
        if status == 206:
            start = _content_range_start(response.headers.get("Content-Range"))
            if start != have:
                part.unlink()
                raise _AttemptFailed(f"server resumed at byte {start}, not {have}; restarting")
            log.info("%s: resuming at byte %d (HTTP 206 Partial Content)", url, have)
            mode = "ab"
        else:
            if have:
                log.info("%s: server sent the whole file (HTTP %d); restarting at 0", url, status)
            have, mode = 0, "wb"
        length = response.headers.get("Content-Length", "")
        expected_total = have + int(length) if length.isdigit() else None
        received = have
        progress = tqdm(
            total=expected_total,
            initial=have,
            unit="B",
            unit_scale=True,
            desc=part.name.removesuffix(".part"),
            disable=progress_off(show_progress),
        )
        with open(part, mode) as handle, progress:
            try:
                # Raw bytes: a server labelling the .tar.gz `Content-Encoding: gzip` must not
                # have it unzipped on the way. read1 hands over what has arrived, so bytes
                # received before a timeout are written, not lost with a half-full buffer.
                while chunk := response.raw.read1(_CHUNK_BYTES, decode_content=False):
                    handle.write(chunk)
                    received += len(chunk)
                    progress.update(len(chunk))
            except (urllib3.exceptions.HTTPError, requests.RequestException) as error:
                raise _AttemptFailed(
                    f"transfer broke off after {received} of {expected_total or '?'} bytes "
                    f"({_reason(error)})"
                ) from error
    if expected_total is not None and received < expected_total:
        raise _AttemptFailed(f"connection closed after {received} of {expected_total} bytes")


def download_file(
    url: str,
    target: Path,
    expected_md5: str,
    retries: int,
    timeout_s: float,
    retry_backoff_s: float,
    show_progress: bool = True,
) -> Path:
    """Download `url` to `target` through `<target>.part`, renamed only once its md5 matches.

    A broken transfer (dropped connection, short read, timeout, server error) is retried up to
    `retries` times, waiting `retry_backoff_s`, then twice as long each time, and resumes where
    it stopped when the server honours the Range header (206). A .part left by an interrupted
    run is resumed the same way. Raises DownloadError, or ChecksumError (the .part deleted).
    """
    part = target.with_name(f"{target.name}.part")
    errors: list[str] = []
    for attempt in range(retries + 1):
        if attempt:
            delay = retry_backoff_s * 2 ** (attempt - 1)
            log.warning(
                "%s: %s; retry %d of %d in %.2g s", url, errors[-1], attempt, retries, delay
            )
            time.sleep(delay)
        try:
            _transfer(url, part, timeout_s, show_progress)
            break
        except _MirrorRefused as error:
            raise DownloadError(f"{url}: {error}") from error
        except _AttemptFailed as error:
            errors.append(str(error))
        except (requests.RequestException, urllib3.exceptions.HTTPError) as error:
            errors.append(_reason(error))
    else:
        raise DownloadError(f"{url}: failed after {retries + 1} attempts; last: {errors[-1]}")
    try:
        verify_md5(part, expected_md5, label=url)
    except ChecksumError:
        part.unlink()
        raise
    part.replace(target)
    log.info("downloaded %s to %s (md5 verified)", url, target)
    return target


@dataclass(frozen=True)
class GtzanSettings:
    """The `data.gtzan` section, paths resolved against the repository root."""

    folder: Path | None
    archive: Path | None
    md5: str
    mirrors: tuple[str, ...]
    download_dir: Path
    retries: int
    timeout_s: float
    retry_backoff_s: float

    @classmethod
    def from_params(cls, params: dict[str, Any], root: Path) -> GtzanSettings:
        gtzan = section(params, "data.gtzan")
        folder, archive = gtzan.get("folder"), gtzan.get("archive")
        mirrors = gtzan.get("mirrors") or []
        md5 = str(gtzan.get("md5") or "")
        if len(md5) != 32 or any(c not in "0123456789abcdefABCDEF" for c in md5):
            raise ConfigError(f"params.yaml: data.gtzan.md5 must be 32 hex digits, got {md5!r}")
        if not isinstance(mirrors, list) or not all(isinstance(url, str) for url in mirrors):
            raise ConfigError("params.yaml: data.gtzan.mirrors must be a list of URLs")
        return cls(
            folder=resolve_path(folder, root) if folder else None,
            archive=resolve_path(archive, root) if archive else None,
            md5=md5.lower(),
            mirrors=tuple(mirrors),
            download_dir=resolve_path(gtzan.get("download_dir") or "data/download", root),
            retries=_number(gtzan, "retries", "data.gtzan", int, minimum=0),
            timeout_s=_number(gtzan, "timeout_s", "data.gtzan", float, minimum=0.001),
            retry_backoff_s=_number(
                {"retry_backoff_s": 2.0, **gtzan}, "retry_backoff_s", "data.gtzan", float, 0
            ),
        )


def download_archive(settings: GtzanSettings, show_progress: bool = True) -> Path:
    """`genres.tar.gz` in the download folder: the cached copy if its md5 matches, else
    downloaded from the first mirror that delivers it intact."""
    target = settings.download_dir / ARCHIVE_NAME
    if target.is_file():
        try:
            verify_md5(target, settings.md5)
            log.info("using the downloaded archive %s (md5 verified)", target)
            return target
        except ChecksumError as error:
            log.warning("%s; downloading it again", error)
            target.unlink()
    if not settings.mirrors:
        raise ConfigError("params.yaml: data.gtzan.mirrors is empty: nowhere to download from")
    settings.download_dir.mkdir(parents=True, exist_ok=True)
    failures = []
    for url in settings.mirrors:
        try:
            return download_file(
                url,
                target,
                settings.md5,
                settings.retries,
                settings.timeout_s,
                settings.retry_backoff_s,
                show_progress,
            )
        except FetchError as error:
            log.warning("%s", error)
            failures.append(f"  {error}")
    raise DownloadError(
        f"could not download {ARCHIVE_NAME} from any mirror:\n" + "\n".join(failures)
    )


# --------------------------------------------------------------------------------------------
# the manifest


@dataclass(frozen=True)
class ManifestGates:
    """What a clip must pass to be usable: its folder among params `genres`, and the quality
    gates the served model applies too (`data.min_duration_s`, `data.silence_peak`)."""

    genres: tuple[str, ...]
    min_duration_s: float
    silence_peak: float

    @property
    def quality(self) -> QualityGates:
        return QualityGates(self.min_duration_s, self.silence_peak)


def clip_status(path: Path, genre: str, gates: ManifestGates) -> tuple[AudioInfo | None, str]:
    """(AudioInfo or None when undecodable, `ok` or `<problem>: <detail>`) for one file."""
    if path.stat().st_size == 0:
        return None, "empty: 0 bytes"
    truncation = find_truncation(path)
    try:
        info = inspect_audio(path)
    except AudioError as error:
        if truncation is not None:
            return None, quality_problems(math.inf, math.inf, truncation, gates.quality)[0].message
        reason = str(error).removeprefix(f"{path}: ")
        return None, f"undecodable: {reason}"
    problems = quality_problems(info.duration_s, info.peak, truncation, gates.quality)
    if problems:
        return info, problems[0].message
    if genre not in gates.genres:
        return info, f"unknown genre: folder '{genre}' is not in params genres"
    return info, OK


def inspect_file(path: Path, gates: ManifestGates) -> dict[str, Any]:
    """The manifest row of one file (path absolute); sha256 is filled whenever it is readable."""
    genre = path.parent.name
    try:
        info, status = clip_status(path, genre, gates)
        sha256 = file_digest(path, "sha256")
    except OSError as error:
        info, status, sha256 = None, f"unreadable: {error.strerror or error}", ""
    return {
        "path": path,
        "genre": genre,
        "track_id": path.stem,
        "duration_s": round(info.duration_s, 6) if info else math.nan,
        "sample_rate": info.sample_rate if info else None,
        "channels": info.channels if info else None,
        "sha256": sha256,
        "status": status,
    }


def build_manifest(
    raw_dir: Path,
    root: Path,
    source: str,
    gates: ManifestGates,
    workers: int = 1,
    show_progress: bool = True,
) -> pd.DataFrame:
    """One row per audio file under `raw_dir/genres/<genre>/`, sorted by genre then track id.

    A bad file gets its reason in `status`, never an exception. Files are inspected by `workers`
    threads: reading, decoding (libsndfile), hashing and numpy release the GIL, so threads
    overlap them without a process pool's start-up, which costs more than it saves at GTZAN's
    size (a 30 s clip takes about 5 ms to inspect).
    """
    paths = genre_audio_files(raw_dir / "genres")
    inspect = partial(inspect_file, gates=gates)
    rows = []
    with (
        ThreadPoolExecutor(max(1, workers)) as pool,
        tqdm(
            total=len(paths), desc="manifest", unit="clip", disable=progress_off(show_progress)
        ) as bar,
    ):
        for row in pool.map(inspect, paths):
            rows.append(row)
            bar.update()
    for row in rows:
        path = row["path"]
        row["path"] = (
            path.relative_to(root).as_posix() if path.is_relative_to(root) else path.as_posix()
        )
        row["source"] = source
        if row["status"] != OK:
            log.warning("unusable clip %s: %s", path, row["status"])
    manifest = pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))
    manifest = manifest.sort_values(["genre", "track_id"], kind="stable", ignore_index=True)
    for column in ("sample_rate", "channels"):
        manifest[column] = manifest[column].astype("Int64")
    manifest["duration_s"] = manifest["duration_s"].astype(float)
    return manifest


def status_counts(manifest: pd.DataFrame) -> dict[str, int]:
    """Clips per status kind (`ok`, `truncated`, `silent`, ...: the status before its colon)."""
    kinds = manifest["status"].astype(str).str.split(":", n=1).str[0]
    return dict(sorted(Counter(kinds).items(), key=lambda item: (item[0] != OK, item[0])))


# --------------------------------------------------------------------------------------------
# the stage


def _number(
    mapping: dict[str, Any],
    key: str,
    where: str,
    kind: Callable[[Any], Any],
    minimum: float | None = None,
) -> Any:
    """mapping[key] as `kind` (int or float), with an error naming `where.key`."""
    if key not in mapping:
        raise ConfigError(f"params.yaml: missing setting '{where}.{key}'")
    value = mapping[key]
    try:
        if isinstance(value, bool) or (kind is int and float(value) != int(value)):
            raise ValueError
        number = kind(value)
        if not math.isfinite(number):
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(
            f"params.yaml: {where}.{key} must be {'an integer' if kind is int else 'a number'}, "
            f"got {value!r}"
        ) from None
    if minimum is not None and number < minimum:
        raise ConfigError(f"params.yaml: {where}.{key} must be at least {minimum}, got {value!r}")
    return number


def _genres(params: dict[str, Any]) -> tuple[str, ...]:
    genres = section(params, "genres")
    if (
        not isinstance(genres, list)
        or not genres
        or not all(isinstance(genre, str) and genre for genre in genres)
        or len(set(genres)) != len(genres)
    ):
        raise ConfigError(f"params.yaml: genres must be a list of distinct names, got {genres!r}")
    return tuple(genres)


def _outside(path: Path, raw_dir: Path, setting: str) -> Path:
    """`path`, unless wiping `raw_dir` at the start of the stage would delete it."""
    resolved, raw = path.resolve(), raw_dir.resolve()
    if resolved.is_relative_to(raw) or raw.is_relative_to(resolved):
        raise ConfigError(
            f"params.yaml: {setting}: {path} overlaps the stage's output folder {raw_dir}, "
            f"which is emptied at every run"
        )
    return path


def _plan_source(
    params: dict[str, Any], root: Path, raw_dir: Path, show_progress: bool
) -> tuple[str, Callable[[], object]]:
    """(manifest source label, the step writing the audio into raw_dir), config checked first."""
    data = section(params, "data")
    source = data.get("source")
    if source not in SOURCES:
        raise ConfigError(
            f"params.yaml: data.source is {source!r}; expected one of: {', '.join(SOURCES)}"
        )
    genres = _genres(params)
    if source == "demo":
        demo = section(params, "data.demo")
        clips = _number(demo, "clips_per_genre", "data.demo", int, minimum=1)
        duration_s = _number(demo, "duration_s", "data.demo", float, minimum=0.01)
        sample_rate = _number(demo, "sample_rate", "data.demo", int, minimum=1000)
        seed = _number(demo, "seed", "data.demo", int, minimum=0)
        return SYNTHETIC_SOURCE, partial(
            generate_synthetic_demo, genres, raw_dir, clips, duration_s, sample_rate, seed
        )
    if source == "local":
        local_dir = data.get("local_dir")
        if not local_dir:
            raise ConfigError("params.yaml: data.local_dir must be set when data.source is local")
        folder = find_genres_folder(resolve_path(local_dir, root), "data.local_dir")
        _outside(folder, raw_dir, "data.local_dir")
        return "local", partial(copy_genre_folder, folder, raw_dir)
    gtzan = GtzanSettings.from_params(params, root)
    if gtzan.folder is not None:
        folder = _outside(
            find_genres_folder(gtzan.folder, "data.gtzan.folder"), raw_dir, "data.gtzan.folder"
        )
        return "gtzan", partial(copy_genre_folder, folder, raw_dir)
    if gtzan.archive is not None:
        archive = _outside(gtzan.archive, raw_dir, "data.gtzan.archive")
        if not archive.is_file():
            raise ConfigError(f"params.yaml: data.gtzan.archive: {archive}: no such file")

        def from_archive() -> None:
            verify_md5(archive, gtzan.md5)
            extract_genres_archive(archive, raw_dir)

        return "gtzan", from_archive
    if gtzan.download_dir.resolve().is_relative_to(raw_dir.resolve()):
        raise ConfigError(
            f"params.yaml: data.gtzan.download_dir: {gtzan.download_dir} is inside the stage's "
            f"output folder {raw_dir}, which is emptied at every run"
        )
    if not gtzan.mirrors and not (gtzan.download_dir / ARCHIVE_NAME).is_file():
        raise ConfigError(
            "params.yaml: data.gtzan sets no folder, no archive and no mirrors, and "
            f"{gtzan.download_dir / ARCHIVE_NAME} does not exist: nowhere to get GTZAN from"
        )

    def from_mirrors() -> None:
        extract_genres_archive(download_archive(gtzan, show_progress), raw_dir)

    return "gtzan", from_mirrors


def run(params: dict[str, Any], root: Path, show_progress: bool = True) -> dict[str, Any]:
    """Write data/raw and data/manifest.csv from `data.source`; returns the summary counts.

    Raises ConfigError or FetchError when the stage as a whole cannot run; bad clips are only
    reported in the manifest.
    """
    raw_dir = root / RAW_DIR
    manifest_path = root / MANIFEST
    data = section(params, "data")
    gates = ManifestGates(
        genres=_genres(params),
        min_duration_s=_number(data, "min_duration_s", "data", float, minimum=0),
        silence_peak=_number(data, "silence_peak", "data", float, minimum=0),
    )
    workers = _number({"workers": 0, **data}, "workers", "data", int, minimum=0) or (
        os.cpu_count() or 1
    )
    source, write_audio = _plan_source(params, root, raw_dir, show_progress)

    # A fresh output every run: a changed source leaves no stale clips or manifest behind.
    shutil.rmtree(raw_dir, ignore_errors=True)
    manifest_path.unlink(missing_ok=True)
    raw_dir.mkdir(parents=True)
    write_audio()

    manifest = build_manifest(raw_dir, root, source, gates, workers, show_progress)
    staged = manifest_path.with_name(f".{manifest_path.name}.tmp")
    manifest.to_csv(staged, index=False)
    staged.replace(manifest_path)  # a manifest is either complete or absent
    counts = status_counts(manifest)
    log.info(
        "manifest: %d clips from %s (%s) -> %s",
        len(manifest),
        source,
        ", ".join(f"{kind} {count}" for kind, count in counts.items()) or "none",
        manifest_path,
    )
    ok = counts.get(OK, 0)
    return {
        "source": data["source"],
        "clips": len(manifest),
        "ok": ok,
        "unusable": len(manifest) - ok,
    }


def main(argv: list[str] | None = None) -> int:
    return stage_main("fetch", __doc__, run, argv, errors=(FetchError,))
