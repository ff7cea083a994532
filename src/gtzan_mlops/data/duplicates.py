"""Copies of one recording among the clips, however they were copied: identical decoded
samples, or Chromaprint fingerprints that agree (params `duplicates`), and the groups they form.

- **identical samples**: the sha256 of the decoded samples (mono float32 at the file's rate),
  equal for a WAV and its FLAC copy;
- **the same recording**: Chromaprint fingerprints (`fpcalc -raw`, about 8 items of 32 bits per
  second, robust to re-encoding, resampling and gain) whose bits agree on at least
  `min_similarity` of a `window_s` stretch at some offset up to `max_offset_s`; unrelated music
  agrees on about half the bits (at most 0.62 among the 70 real clips in ../shared), copies on
  0.97 and more.

Fingerprints are compared only in the candidate pairs of an inverted index of their sub-words
(data/fingerprint_index.py, params `duplicates.index`), each exactly, both ways, at every offset:
the same pairs as comparing all of them, in time and memory that grow with the clips, not with
the pairs. Clips linked by a match form a duplicate group, named after its first track id.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gtzan_mlops.data.audio import AudioError, decode_mono
from gtzan_mlops.data.fingerprint_index import candidate_pairs, compare_pairs
from gtzan_mlops.data.splits import GROUP_COLUMN, connected_components
from gtzan_mlops.reports import markdown
from gtzan_mlops.settings.loading import resolve_path
from gtzan_mlops.settings.schema import Duplicates

log = logging.getLogger(__name__)

CLIP_COLUMNS = ("track_id", "genre", "path", "samples_sha256", "fingerprint_items", "problem")
PAIR_COLUMNS = ("track_a", "track_b", "match", "similarity", "offset_s")
# Chromaprint's default algorithm: 11025 Hz, frames of 4096 samples every 4096/3.
ITEM_SECONDS = 4096 / 3 / 11025


class DuplicatesError(RuntimeError):
    """The stage cannot run (no fingerprinter, no manifest)."""


def items(seconds: float) -> int:
    """The fingerprint items covering `seconds` of audio."""
    return round(seconds / ITEM_SECONDS)


def window_items(settings: Duplicates) -> int:
    """The items of the compared stretch (`window_s`)."""
    return items(settings.window_s)


def max_offset_items(settings: Duplicates) -> int:
    """The items one copy may start after the other (`max_offset_s`)."""
    return items(settings.max_offset_s)


def fpcalc_path() -> str:
    found = shutil.which("fpcalc")
    if found is None:
        raise DuplicatesError(
            "fpcalc (Chromaprint) is not installed: on Debian/Ubuntu `apt install "
            "libchromaprint-tools` (.ci/system-packages.sh does), on macOS "
            "`brew install chromaprint`"
        )
    return found


def fingerprint(path: Path, seconds: float, fpcalc: str | None = None) -> np.ndarray:
    """The raw Chromaprint fingerprint of the first `seconds` of a file (uint32 items)."""
    command = [fpcalc or fpcalc_path(), "-raw", "-json", "-length", str(round(seconds)), str(path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    # fpcalc exits 3 for a decoding error at the very end of many files, with a full
    # fingerprint; what counts is whether it printed one.
    try:
        items = json.loads(result.stdout)["fingerprint"]
    except (json.JSONDecodeError, KeyError, TypeError):
        reason = " ".join(result.stderr.split())[:200] or f"exit status {result.returncode}"
        raise AudioError(f"{path}: fpcalc could not fingerprint it ({reason})") from None
    return np.asarray(items, dtype=np.uint32)


def samples_digest(path: Path) -> str:
    """sha256 of the decoded samples: equal for the same audio in any lossless container."""
    waveform, rate = decode_mono(path)
    digest = hashlib.sha256(str(rate).encode())
    digest.update(waveform.tobytes())
    return digest.hexdigest()


def find_pairs(
    clips: pd.DataFrame, fingerprints: dict[str, np.ndarray], settings: Duplicates
) -> pd.DataFrame:
    """Every pair of clips with identical samples or matching fingerprints (PAIR_COLUMNS).

    Fingerprints are compared only where the inverted index of their sub-words
    (data/fingerprint_index.py) finds a candidate pair, each candidate both ways at every
    offset: a match where either way reaches `min_similarity`. The work and the memory grow
    with the number of fingerprints (and of chance candidates), not with the number of pairs."""
    pairs: dict[tuple[str, str], dict[str, Any]] = {}
    for _, same in clips.groupby("samples_sha256"):
        ids = sorted(same["track_id"])
        for index, first in enumerate(ids):
            for second in ids[index + 1 :]:
                pairs[(first, second)] = {
                    "match": "identical samples", "similarity": 1.0, "offset_s": 0.0
                }  # fmt: skip
    window, max_offset = window_items(settings), max_offset_items(settings)
    ids = sorted(
        track for track, items in fingerprints.items() if len(items) >= window + max_offset
    )
    prints = [fingerprints[track] for track in ids]
    candidates = candidate_pairs(prints, window, max_offset, settings.index)
    similarity, offset = compare_pairs(prints, candidates, window, max_offset)
    # In float32, as the similarities are (and as the all-pairs matrix compared them).
    matched = similarity.max(axis=1) >= np.float32(settings.min_similarity)
    for (i, j), (forward, backward), (ahead, behind) in zip(
        candidates[matched], similarity[matched], offset[matched], strict=True
    ):
        # j starts `ahead` items into i, or i starts `behind` items into j
        value, shift = (forward, int(ahead)) if forward >= backward else (backward, -int(behind))
        if (ids[i], ids[j]) not in pairs:
            pairs[(ids[i], ids[j])] = {
                "match": "fingerprint",
                "similarity": round(float(value), 4),
                "offset_s": round(shift * ITEM_SECONDS, 2),
            }
    rows = [{"track_a": a, "track_b": b, **match} for (a, b), match in sorted(pairs.items())]
    return pd.DataFrame(rows, columns=list(PAIR_COLUMNS))


def group_ids(track_ids: list[str], pairs: pd.DataFrame) -> dict[str, str]:
    """The duplicate group of every track in a pair (connected components of the pairs), named
    after its first track id: `dup:<track_id>`. Tracks without a duplicate are absent."""
    links = list(zip(pairs["track_a"], pairs["track_b"], strict=True))
    component = connected_components(track_ids, links)
    linked = set(pairs["track_a"]) | set(pairs["track_b"])
    return {track: f"dup:{component[track]}" for track in sorted(linked)}


def _inspect(path: Path, settings: Duplicates, fpcalc: str) -> dict[str, Any]:
    """A clip's fingerprint and samples' sha256, each on its own: a clip fpcalc cannot read is
    still compared by its samples, and the other way round."""
    found: dict[str, Any] = {"items": None, "samples_sha256": "", "problem": ""}
    problems = []
    try:
        found["items"] = fingerprint(path, settings.fingerprint_seconds, fpcalc)
    except (AudioError, OSError, subprocess.TimeoutExpired) as error:
        problems.append(str(error))
    try:
        found["samples_sha256"] = samples_digest(path)
    except (AudioError, OSError) as error:
        problems.append(str(error))
    found["problem"] = "; ".join(problems)
    return found


def analyse(
    manifest: pd.DataFrame, root: Path, settings: Duplicates, workers: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the clips table with their duplicate groups, the matched pairs) of a manifest's usable
    clips, fingerprinted by `workers` fpcalc processes at once. A clip that cannot be
    fingerprinted is reported in `problem` and matched by its samples only, if at all."""
    fpcalc = fpcalc_path()
    usable = manifest[manifest["status"] == "ok"].reset_index(drop=True)
    paths = [resolve_path(path, root) for path in usable["path"]]
    with ThreadPoolExecutor(workers) as pool:
        found = list(pool.map(lambda path: _inspect(path, settings, fpcalc), paths))
    clips = usable[["track_id", "genre", "path"]].copy()
    clips["samples_sha256"] = [entry["samples_sha256"] for entry in found]
    clips["fingerprint_items"] = [
        len(entry["items"]) if entry["items"] is not None else 0 for entry in found
    ]
    clips["problem"] = [entry["problem"] for entry in found]
    for track, entry in zip(clips["track_id"], found, strict=True):
        if entry["problem"]:
            log.warning("duplicates: %s not fingerprinted: %s", track, entry["problem"])
    short = clips["fingerprint_items"].between(
        1, window_items(settings) + max_offset_items(settings) - 1
    )
    clips.loc[short, "problem"] = (
        f"shorter than window_s + max_offset_s ({settings.window_s + settings.max_offset_s:g} s): "
        "compared by its samples only"
    )
    fingerprints = {
        track: entry["items"]
        for track, entry in zip(clips["track_id"], found, strict=True)
        if entry["items"] is not None
    }
    hashed = clips[clips["samples_sha256"] != ""]
    pairs = find_pairs(hashed, fingerprints, settings)
    groups = group_ids(list(clips["track_id"]), pairs)
    clips[GROUP_COLUMN] = [groups.get(track, "") for track in clips["track_id"]]
    return clips[[*CLIP_COLUMNS, GROUP_COLUMN]], pairs


def report_markdown(clips: pd.DataFrame, pairs: pd.DataFrame, settings: Duplicates) -> str:
    """The duplicates report: the counts, the clips not fingerprint-compared and why, and each
    group with its matched pairs."""
    grouped = clips[clips[GROUP_COLUMN] != ""]
    lines = [
        "# Duplicate clips",
        "",
        f"{len(clips)} usable clips; {grouped[GROUP_COLUMN].nunique()} duplicate groups holding "
        f"{len(grouped)} clips; {len(pairs)} matched pairs. A match is identical decoded samples, "
        f"or Chromaprint fingerprints agreeing on at least {settings.min_similarity:g} of their "
        f"bits over {settings.window_s:g} s at an offset of up to {settings.max_offset_s:g} s.",
        "",
    ]
    problems = clips[clips["problem"] != ""]
    if not problems.empty:
        lines += ["Not fingerprint-compared:", ""]
        lines += [f"- {row.track_id}: {row.problem}" for row in problems.itertuples()]
        lines.append("")
    # Both clips of a pair are in one group: the pairs go to the group of their first clip.
    group_of = dict(zip(grouped["track_id"], grouped[GROUP_COLUMN], strict=True))
    pairs_of = {
        group: rows for group, rows in pairs.groupby(pairs["track_a"].map(group_of), sort=False)
    }
    for group in sorted(pairs_of):
        matched = [
            [
                pair.track_a,
                pair.track_b,
                pair.match,
                f"{pair.similarity:.3f}",
                f"{pair.offset_s:+.2f}",
            ]
            for pair in pairs_of[group].itertuples()
        ]
        header = ["clip a", "clip b", "match", "similarity", "offset s"]
        lines += [f"## {group}", "", *markdown.table(header, matched, align="lllrr"), ""]
    return "\n".join(lines)
