"""How the duplicates stage finds its pairs at scale, and what it sees on the real clips.

1. The pair finding (data/duplicates.find_pairs: the candidates of the inverted index of
   fingerprint sub-words, each compared exactly at every offset) on synthetic fingerprints made
   here: 5 % of them planted copies of others with 10 % of their bits flipped (similarity about
   0.90; real copies score 0.95 and more), starting up to 5 s into their original or it into
   them. Wall time (best of --repeats), peak memory (tracemalloc, in a run of its own), the
   candidates, and the planted copies found. Up to 2,000 fingerprints also the all-pairs
   comparison the stage made before the index (one n x n matrix product per offset), and whether
   both give the same pairs; at 10,000 its matrices alone would take 1.6 GiB.
2. The 70 real clips of ../shared: the largest similarity between two different clips, the
   candidates of the index among them, and the stage on copies of one real clip (a FLAC copy, a
   16 kHz re-encode at -6 dB, the same recording starting 2 s later) beside another song of the
   same artist, made in a temporary folder.

    python benchmarks/duplicates.py [--sizes 1000 10000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import librosa
import numpy as np
import pandas as pd
import soundfile

from gtzan_mlops.data import duplicates
from gtzan_mlops.data.fingerprint_index import candidate_pairs, compare_pairs
from gtzan_mlops.data.manifest import ManifestGates, build_manifest
from gtzan_mlops.settings.loading import load_settings
from gtzan_mlops.settings.schema import Settings
from gtzan_mlops.stages import duplicates as duplicates_stage

REPO_ROOT = Path(__file__).resolve().parents[1]
GENRES_DIR = REPO_ROOT.parent / "shared" / "data" / "gtzan_mini" / "genres"
ALL_PAIRS_UP_TO = 2000  # fingerprints: beyond, the all-pairs matrices take too long and too much
PLANTED_SHARE, BIT_ERROR = 0.05, 0.10


def _fingerprint_helpers() -> ModuleType:
    """tests/fingerprint_helpers.py: the synthetic fingerprints and the all-pairs comparison
    the tests check the index against."""
    tests = str(REPO_ROOT / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import fingerprint_helpers

    return fingerprint_helpers


def _measure(work: Callable[[], Any], repeats: int) -> tuple[Any, tuple[float, float], int]:
    """(result, (wall, CPU) seconds of the fastest of `repeats`, peak traced bytes of one more
    run). The CPU time tells what a busy machine's wall time hides."""
    seconds = []
    for _ in range(repeats):
        start, cpu = time.perf_counter(), time.process_time()
        result = work()
        seconds.append((time.perf_counter() - start, time.process_time() - cpu))
    tracemalloc.start()
    try:
        work()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return result, min(seconds), peak


def _all_pairs(prints: list[np.ndarray], window: int, max_offset: int, bar: float) -> set:
    """The pairs the stage matched before the index: every pair's similarity matrix."""
    similarity, _ = _fingerprint_helpers().all_pairs_product(prints, window, max_offset)
    either = np.maximum(similarity, similarity.T) >= np.float32(bar)
    return {(int(i), int(j)) for i, j in np.argwhere(np.triu(either, k=1))}


def scaling(params: Settings, count: int, repeats: int) -> None:
    settings = params.duplicates
    window = duplicates.window_items(settings)
    max_offset = duplicates.max_offset_items(settings)
    copies = round(count * PLANTED_SHARE)
    prints, planted = _fingerprint_helpers().synthetic_fingerprints(
        count - copies, copies, BIT_ERROR, window, max_offset
    )
    ids = [f"synthetic.{index:05d}" for index in range(count)]
    clips = pd.DataFrame({"track_id": ids, "samples_sha256": ids})  # no identical samples
    fingerprints = dict(zip(ids, prints, strict=True))
    pairs, (seconds, cpu), peak = _measure(
        lambda: duplicates.find_pairs(clips, fingerprints, settings), repeats
    )
    candidates = len(candidate_pairs(prints, window, max_offset, settings.index))
    found = set(zip(pairs["track_a"], pairs["track_b"], strict=True))
    hits = sum((ids[original], ids[copy]) in found for original, copy, _ in planted)
    print(
        f"{count:>6} synthetic fingerprints: index + exact comparison {seconds:6.2f} s "
        f"({cpu:.2f} s CPU, {cpu / count * 1e6:.0f} µs each), peak {peak / 2**20:.0f} MiB; "
        f"{candidates} candidates; planted copies found {hits}/{len(planted)}, "
        f"other pairs {len(found) - hits}"
    )
    if count > ALL_PAIRS_UP_TO:
        return
    matched, (seconds, cpu), peak = _measure(
        lambda: _all_pairs(prints, window, max_offset, settings.min_similarity), repeats
    )
    index_of = {track: index for index, track in enumerate(ids)}
    same = matched == {(index_of[a], index_of[b]) for a, b in found}
    print(
        f"{count:>6} synthetic fingerprints: all pairs (before)      {seconds:6.2f} s "
        f"({cpu:.2f} s CPU), peak {peak / 2**20:.0f} MiB; {len(matched)} pairs, "
        f"{'the same' if same else 'NOT the same'} as the index's"
    )


def real_clips(params: Settings) -> None:
    settings = params.duplicates
    window = duplicates.window_items(settings)
    max_offset = duplicates.max_offset_items(settings)
    paths = sorted(GENRES_DIR.glob("*/*.wav"))
    prints = [duplicates.fingerprint(path, settings.fingerprint_seconds) for path in paths]
    every = np.array(list(itertools.combinations(range(len(prints)), 2)))
    similarity, _ = compare_pairs(prints, every, window, max_offset)
    either = similarity.max(axis=1)
    first, second = every[either.argmax()]
    candidates = candidate_pairs(prints, window, max_offset, settings.index)
    print(
        f"{len(paths)} real clips: largest similarity between two different clips "
        f"{either.max():.3f} ({paths[first].stem}, {paths[second].stem}); a match needs "
        f"{settings.min_similarity}; {len(candidates)} of their {len(every)} pairs are "
        "candidates of the index"
    )

    gates = ManifestGates.of(params)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        folder = root / "data/raw/genres/blues"
        folder.mkdir(parents=True)
        for name in ("blues.00000", "blues.00001"):  # two John Lee Hooker songs
            shutil.copyfile(GENRES_DIR / f"blues/{name}.wav", folder / f"{name}.wav")
        samples, rate = soundfile.read(GENRES_DIR / "blues/blues.00000.wav", dtype="float32")
        soundfile.write(folder / "blues.90000.flac", samples, rate)
        quieter = librosa.resample(samples, orig_sr=rate, target_sr=16000) * 10 ** (-6 / 20)
        soundfile.write(folder / "blues.90001.wav", quieter, 16000)
        soundfile.write(folder / "blues.90002.wav", samples[2 * rate :], rate)
        manifest = build_manifest(root / "data/raw", root, "copies", gates, 2, False)
        manifest.to_csv(root / "data/manifest.csv", index=False)
        print(duplicates_stage.describe(duplicates_stage.run(params, root)))
        print(pd.read_csv(root / params.paths.duplicate_pairs).to_string(index=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    params = load_settings(REPO_ROOT / "params.yaml")
    for count in args.sizes:
        scaling(params, count, args.repeats)
    real_clips(params)


if __name__ == "__main__":
    main()
