"""Benchmark of the musicnn feature set: what it costs and what it buys.

On the real clips (default: the 70 in ../shared/data/gtzan_mini), in one run:
  1. embedding time: MSD_musicnn embeddings of every clip's ten 3 s segments in this process
     (`musicnn.MusicnnEmbedder.embed`, after one warm-up call), seconds per 30 s clip;
  2. the features stage's extraction (`features_stage.extract_all`, a pool of --workers processes,
     empty cache) before (hand-crafted features only) and after (both feature sets), wall time
     and the peak RSS of any pool worker (sampled every 0.1 s);
  3. accuracy: the stage's clip tables from run 2, logistic regression and an RBF SVM on the
     same RepeatedStratifiedKFold(7, 3, random_state=0) folds for every feature set
     (`comparison.compare_feature_sets`): hand-crafted vs musicnn vs both.
Targets (issue 10): embedding <= 0.4 s per clip, worker peak < 2 GiB, both >= hand-crafted +
0.08 mean accuracy; the script prints each figure and whether it meets its target.

    python benchmarks/feature_sets.py
    python benchmarks/feature_sets.py --clips-dir DIR --limit 20 --workers 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

if TYPE_CHECKING:
    from gtzan_mlops.settings.schema import Settings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CLIPS = REPO_ROOT.parent / "shared" / "data" / "gtzan_mini"
MIB = 2**20


def list_clips(clips_dir: Path, limit: int | None) -> list[Path]:
    from gtzan_mlops.data.audio import AUDIO_EXTENSIONS

    paths = sorted(p for p in clips_dir.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS)
    if not paths:
        raise SystemExit(f"{clips_dir}: no audio files found")
    return paths[:limit] if limit else paths


class WorkerPeak:
    """The largest RSS any child process of this one reaches while it runs."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            for child in me.children(recursive=True):
                try:
                    self.peak = max(self.peak, child.memory_info().rss)
                except psutil.Error:
                    continue  # ended between listing and reading
            self._stop.wait(0.1)

    def __enter__(self) -> WorkerPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def project_params() -> Settings:
    """The repository's params.yaml, validated: the batch size and the folds of the report."""
    from gtzan_mlops.settings.loading import load_settings

    return load_settings(REPO_ROOT / "params.yaml")


def embedding_seconds(paths: list[Path]) -> tuple[list[float], float]:
    """Per clip, the seconds `embed` takes for its segments (decoding excluded); and the
    seconds building the model and loading its weights took."""
    from gtzan_mlops.data.audio import load_waveform
    from gtzan_mlops.features import musicnn
    from gtzan_mlops.features.handcrafted import REFERENCE_SETTINGS, segment_bounds

    settings = REFERENCE_SETTINGS
    start = time.perf_counter()
    batch_size = project_params().resources.features.musicnn_batch_size
    embedder = musicnn.MusicnnEmbedder(musicnn.weights_dir(None), batch_size)
    build = time.perf_counter() - start
    timings = []
    for index, path in enumerate(paths):
        waveform = load_waveform(path, musicnn.SAMPLE_RATE)
        # The segments of the hand-crafted features, as the features stage cuts them.
        length = len(load_waveform(path, settings.sample_rate))
        starts = [begin / settings.sample_rate for begin, _ in segment_bounds(length, settings)]
        if index == 0:
            embedder.embed(waveform, starts)  # the first call traces the model
        start = time.perf_counter()
        embedder.embed(waveform, starts)
        timings.append(time.perf_counter() - start)
    return timings, build


def stage_run(paths: list[Path], workers: int, with_musicnn: bool, cache: Path):
    """The stage's extraction of every clip; (seconds, worker peak bytes, results)."""
    from gtzan_mlops.features import musicnn
    from gtzan_mlops.features.extraction import ClipJob, extract_all
    from gtzan_mlops.features.feature_sets import ExtractionSettings
    from gtzan_mlops.features.handcrafted import REFERENCE_SETTINGS

    settings = ExtractionSettings(
        REFERENCE_SETTINGS,
        musicnn.weights_dir(None) if with_musicnn else None,
        project_params().resources.features.musicnn_batch_size if with_musicnn else None,
    )
    jobs = [
        ClipJob(p.stem, p.parent.name, p, cache / f"{int(with_musicnn)}-{p.stem}.npz")
        for p in paths
    ]
    with WorkerPeak() as peak:
        start = time.perf_counter()
        results = list(extract_all(jobs, settings, workers, chunksize=2))
        seconds = time.perf_counter() - start
    failed = [result.error for result in results if result.error]
    if failed:
        raise SystemExit("; ".join(failed))
    return seconds, peak.peak, results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clips-dir", type=Path, default=DEFAULT_CLIPS)
    parser.add_argument("--limit", type=int, default=None, help="use at most this many clips")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    from gtzan_mlops.evaluation import comparison
    from gtzan_mlops.features.handcrafted import REFERENCE_SETTINGS
    from gtzan_mlops.features.tables import build_tables

    paths = list_clips(args.clips_dir, args.limit)
    print(f"{len(paths)} clips from {args.clips_dir}, {os.cpu_count()} cores\n")

    timings, build = embedding_seconds(paths)
    per_clip = statistics.median(timings)
    print("1. musicnn embedding, one process, ten 3 s segments per clip")
    print(f"   model built and weights loaded in {build:.1f} s")
    print(
        f"   per clip: median {per_clip:.3f} s, mean {statistics.mean(timings):.3f} s, "
        f"max {max(timings):.3f} s  (target <= 0.4 s: {'met' if per_clip <= 0.4 else 'MISSED'})"
    )

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        before = stage_run(paths, args.workers, False, folder)
        after = stage_run(paths, args.workers, True, folder)
        print(f"\n2. features stage extraction, pool of {args.workers}, empty cache")
        print(f"   {'':<34}{'seconds':>9}{'clips/s':>9}{'worker peak MiB':>17}")
        for label, (seconds, peak, _) in (
            ("before: hand-crafted only", before),
            ("after: hand-crafted + musicnn", after),
        ):
            print(f"   {label:<34}{seconds:>9.1f}{len(paths) / seconds:>9.2f}{peak / MIB:>17.0f}")
        print(
            f"   after / before: {after[0] / before[0]:.2f}x the time; worker peak "
            f"{after[1] / MIB:.0f} MiB (target < 2048 MiB: "
            f"{'met' if after[1] < 2 * 1024 * MIB else 'MISSED'})"
        )

        tables = build_tables(after[2], REFERENCE_SETTINGS)
        for name, table in tables.items():
            table.to_csv(folder / name, index=False)
        folds = project_params().report.feature_sets
        scores = comparison.compare_feature_sets(folder, REFERENCE_SETTINGS.n_mfcc, folds)
    print(f"\n3. accuracy, clip-level vectors, split {comparison.SPLIT_LABEL} (whole clips,")
    print("   artists not kept apart), 21 folds, the same folds for every row")
    print("   " + "\n   ".join(comparison.markdown_table(scores)))
    mean = scores.set_index(["feature_set", "classifier"])["mean_accuracy"]
    for classifier in comparison.CLASSIFIERS:
        gain = mean[("both", classifier)] - mean[("handcrafted", classifier)]
        verdict = "met" if gain >= 0.08 else "MISSED"
        print(f"   {classifier}: both - handcrafted = {gain:+.3f} (target >= +0.08: {verdict})")


if __name__ == "__main__":
    main()
