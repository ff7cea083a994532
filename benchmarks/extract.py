"""Benchmark of feature extraction: the naive librosa way against the project's extractor.

Three ways of computing the same 57 features for every clip and each of its 3 s segments:
  1. naive: one librosa call per feature, each recomputing its own STFT (and HPSS through
     scipy's 2-D median filter), one clip at a time -- how most GTZAN projects do it;
  2. project, one process: `gtzan_mlops.features.handcrafted.extract_clip`;
  3. project, all cores: the features stage's process pool
     (`gtzan_mlops.features.extraction.extract_all`).
Each way runs in a fresh interpreter so its peak memory (max RSS, children included) is its own.
Way 3 also runs on half of the clips, to show that peak memory does not grow with the clip count.
Prints clips per second, speed against real time, peak memory, the ratios 2/1 and 3/1, and the
largest difference between the ways' values (they must agree within --rtol).

    python benchmarks/extract.py        # the 70 real clips in ../shared/data/gtzan_mini
    python benchmarks/extract.py --clips-dir DIR --limit 20 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CLIPS = REPO_ROOT.parent / "shared" / "data" / "gtzan_mini"
WAYS = ("naive", "project", "pool")


def list_clips(clips_dir: Path, limit: int | None) -> list[Path]:
    """Audio files under clips_dir (sorted), spread over genres when limited."""
    from gtzan_mlops.data.audio import AUDIO_EXTENSIONS

    paths = sorted(p for p in clips_dir.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS)
    if not paths:
        raise SystemExit(f"{clips_dir}: no audio files found")
    if limit and limit < len(paths):
        # Round-robin over parent folders (genres) so a small limit still covers them all.
        by_folder: dict[Path, list[Path]] = {}
        for path in paths:
            by_folder.setdefault(path.parent, []).append(path)
        queues = list(by_folder.values())
        paths = []
        while len(paths) < limit:
            for queue in queues:
                if queue and len(paths) < limit:
                    paths.append(queue.pop(0))
    return paths


def run_way(way: str, paths: list[Path], workers: int) -> dict[str, np.ndarray]:
    """Features of every clip, keyed by path: row 0 the whole clip, then one row per segment."""
    from gtzan_mlops.data.audio import load_waveform
    from gtzan_mlops.features.handcrafted import (
        REFERENCE_SETTINGS,
        extract_clip,
        naive_features,
        segment_bounds,
    )

    settings = REFERENCE_SETTINGS
    results: dict[str, np.ndarray] = {}
    if way == "naive":
        for path in paths:
            waveform = load_waveform(path, settings.sample_rate)
            excerpts = [waveform] + [
                waveform[a:b] for a, b in segment_bounds(len(waveform), settings)
            ]
            results[str(path)] = np.stack([naive_features(part, settings) for part in excerpts])
    elif way == "project":
        for path in paths:
            features = extract_clip(load_waveform(path, settings.sample_rate), settings)
            results[str(path)] = np.vstack([features.clip, features.segments])
    else:
        from gtzan_mlops.features.extraction import ClipJob, extract_all
        from gtzan_mlops.features.feature_sets import ExtractionSettings

        with tempfile.TemporaryDirectory() as cache:  # empty cache: every clip is extracted
            jobs = [
                ClipJob(path.stem, path.parent.name, path, Path(cache) / f"{index}.npz")
                for index, path in enumerate(paths)
            ]
            # The hand-crafted features only: what ways 1 and 2 compute.
            pool_settings = ExtractionSettings(settings, None, None)
            for result in extract_all(jobs, pool_settings, workers, chunksize=2):
                if result.features is None:
                    raise SystemExit(result.error)
                hand = result.features.handcrafted
                results[str(result.job.audio_path)] = np.vstack([hand.clip, hand.segments])
    return results


def child(args: argparse.Namespace) -> None:
    """Run one way in this (fresh) process and save its values and measurements."""
    paths = list_clips(args.clips_dir, args.limit)
    import librosa

    import gtzan_mlops.features.extraction  # noqa: F401  (imports are not part of the timed work)

    warm = np.random.default_rng(0).normal(0, 0.1, 22050 * 3).astype(np.float32)
    librosa.feature.tempo(y=warm, sr=22050)  # numba compiles on first call; keep it out of timing
    started = time.perf_counter()
    results = run_way(args.way, paths, args.workers)
    seconds = time.perf_counter() - started
    peak_kib = max(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
    )
    import soundfile

    audio_seconds = sum(soundfile.info(str(path)).duration for path in paths)
    np.savez(args.output, **{str(i): results[str(p)] for i, p in enumerate(paths)})
    Path(args.output).with_suffix(".json").write_text(
        json.dumps(
            {
                "seconds": seconds,
                "clips": len(paths),
                "audio_seconds": audio_seconds,
                "peak_mib": peak_kib / 1024,
            }
        )
    )


def measure(way: str, clips_dir: Path, limit: int | None, workers: int, folder: Path) -> dict:
    output = folder / f"{way}-{limit}.npz"
    command = [
        sys.executable,
        __file__,
        "--child",
        way,
        "--clips-dir",
        str(clips_dir),
        "--workers",
        str(workers),
        "--output",
        str(output),
    ]
    if limit:
        command += ["--limit", str(limit)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    subprocess.run(command, check=True, env=environment)
    figures = json.loads(output.with_suffix(".json").read_text())
    with np.load(output) as saved:
        figures["values"] = [saved[str(index)] for index in range(figures["clips"])]
    return figures


def largest_difference(reference: list[np.ndarray], other: list[np.ndarray]) -> tuple[float, float]:
    """Largest absolute and relative difference over all clips, segments and features."""
    absolute = max(float(np.max(np.abs(a - b))) for a, b in zip(reference, other, strict=True))
    relative = max(
        float(np.max(np.abs(a - b) / np.maximum(np.abs(a), 1e-12)))
        for a, b in zip(reference, other, strict=True)
    )
    return absolute, relative


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clips-dir", type=Path, default=DEFAULT_CLIPS)
    parser.add_argument("--limit", type=int, default=None, help="use at most this many clips")
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="processes for way 3"
    )
    parser.add_argument("--rtol", type=float, default=1e-6, help="tolerance for equal values")
    parser.add_argument("--child", choices=WAYS, dest="way", help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.way:
        child(args)
        return

    n_clips = len(list_clips(args.clips_dir, args.limit))
    print(f"{n_clips} clips from {args.clips_dir}, {os.cpu_count()} cores, pool of {args.workers}")
    with tempfile.TemporaryDirectory() as folder:
        runs = {
            way: measure(way, args.clips_dir, n_clips, args.workers, Path(folder)) for way in WAYS
        }
        half = measure("pool", args.clips_dir, max(1, n_clips // 2), args.workers, Path(folder))

    # Peak memory is the max RSS of the largest single process (the parent or one pool worker).
    print(f"\n{'way':<28}{'seconds':>9}{'clips/s':>9}{'x real time':>13}{'peak MiB':>10}")
    labels = {
        "naive": "1 naive librosa",
        "project": "2 project, 1 process",
        "pool": f"3 project, {args.workers} processes",
    }
    rows = [(labels[way], figures) for way, figures in runs.items()]
    for label, figures in [*rows, ("3 on half the clips", half)]:
        seconds = figures["seconds"]
        print(
            f"{label:<28}{seconds:>9.1f}{figures['clips'] / seconds:>9.2f}"
            f"{figures['audio_seconds'] / seconds:>13.1f}{figures['peak_mib']:>10.0f}"
        )
    naive, project, pool = (runs[way]["seconds"] for way in WAYS)
    print(f"\nratio 2/1 (speed-up, one process): {naive / project:.2f}x")
    print(f"ratio 3/1 (speed-up, pool):        {naive / pool:.2f}x")
    print(f"pool scaling 3 vs 2:               {project / pool:.2f}x on {args.workers} processes")
    # The pool's start-up (spawning workers, importing librosa, numba compiling) is a fixed cost
    # inside its timing: the difference between the all-clips and half-clips runs removes it.
    extra_clips = runs["pool"]["clips"] - half["clips"]
    if extra_clips > 0:
        pool_per_clip = (runs["pool"]["seconds"] - half["seconds"]) / extra_clips
        project_per_clip = project / runs["project"]["clips"]
        print(
            f"pool scaling, steady state:        {project_per_clip / pool_per_clip:.2f}x "
            f"({pool_per_clip:.2f} s per extra clip vs {project_per_clip:.2f} s in one process; "
            f"start-up {runs['pool']['seconds'] - runs['pool']['clips'] * pool_per_clip:.1f} s)"
        )
    peaks = f"{half['peak_mib']:.0f} MiB vs {runs['pool']['peak_mib']:.0f} MiB"
    print(f"peak memory, pool, half vs all clips: {peaks}")

    failed = False
    for way in ("project", "pool"):
        absolute, relative = largest_difference(runs["naive"]["values"], runs[way]["values"])
        equal = relative <= args.rtol
        failed |= not equal
        verdict = "equal" if equal else "DIFFERENT"
        print(
            f"values of {way} vs naive: max abs diff {absolute:.3g}, "
            f"max rel diff {relative:.3g} -> {verdict} (rtol {args.rtol:g})"
        )
    if failed:
        raise SystemExit("the extractors disagree beyond the tolerance")


if __name__ == "__main__":
    main()
