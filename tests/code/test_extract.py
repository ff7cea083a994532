"""The features stage: tables from a manifest, failures skipped, the per-clip cache, the pool,
and the Ray engine on a small local Ray (one CPU)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile
import yaml
from project_params import project_params

from gtzan_mlops.cluster import ray_session
from gtzan_mlops.features import ray_extraction
from gtzan_mlops.features.extraction import WorkerCrashError, extract_all, jobs_from_manifest
from gtzan_mlops.features.feature_sets import ExtractionSettings
from gtzan_mlops.features.handcrafted import FEATURE_NAMES
from gtzan_mlops.settings.loading import validate_settings
from gtzan_mlops.stages import features as features_stage

SAMPLE_RATE = 22050


def _manifest_row(path: Path, root: Path, genre: str, status: str = "ok") -> dict:
    return {
        "path": str(path.relative_to(root)),
        "genre": genre,
        "track_id": path.stem,
        "duration_s": 0.0,
        "sample_rate": SAMPLE_RATE,
        "channels": 1,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "",
        "status": status,
        "source": "test",
    }


@pytest.fixture()
def stage_repo(tmp_path, gtzan_mini):
    """A repository folder with params and a manifest of three real 6 s excerpts (kept short for
    speed), a clip that fails in extraction and a clip the manifest already excludes."""
    raw = tmp_path / "data" / "raw" / "genres"
    rows = []
    for genre in ("blues", "metal", "pop"):
        source = gtzan_mini / "genres" / genre / f"{genre}.00001.wav"
        samples, rate = soundfile.read(source, dtype="int16")
        target = raw / genre / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(target, samples[: 6 * rate + 100], rate, subtype="PCM_16")
        rows.append(_manifest_row(target, tmp_path, genre))
    broken = raw / "jazz" / "jazz.00054.wav"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"RIFF....WAVEfmt garbage that is not audio")
    rows.append(_manifest_row(broken, tmp_path, "jazz"))
    rows.append(_manifest_row(raw / "rock" / "rock.00009.wav", tmp_path, "rock", "empty file"))
    (tmp_path / "data").mkdir(exist_ok=True)
    pd.DataFrame(rows).to_csv(tmp_path / "data" / "manifest.csv", index=False)
    params = project_params(
        {
            "features.sample_rate": SAMPLE_RATE,
            "resources.features.workers": 1,
            "resources.features.chunksize": 1,
        },
        validate=False,
    )
    return tmp_path, params


def test_stage_writes_tables_and_skips_failures(stage_repo):
    root, raw = stage_repo
    params = validate_settings(raw)
    counts = features_stage.run(params, root, show_progress=False)
    assert counts == {
        "clips": 3,
        "segments": 6,
        "failed": 1,
        "from_cache": 0,
        "excluded_by_manifest": 1,
    }
    clips = pd.read_csv(root / "data/features/features_30_sec.csv")
    segments = pd.read_csv(root / "data/features/features_3_sec.csv")
    assert clips.columns.tolist() == ["track_id", "genre", "length", *FEATURE_NAMES]
    assert segments.columns.tolist() == ["track_id", "segment", "genre", "length", *FEATURE_NAMES]
    assert clips["track_id"].tolist() == ["blues.00001", "metal.00001", "pop.00001"]
    assert segments.groupby("track_id")["segment"].apply(list).tolist() == [[0, 1]] * 3
    assert (clips["length"] == 6 * SAMPLE_RATE + 100).all()
    assert np.isfinite(clips[list(FEATURE_NAMES)].to_numpy()).all()
    failures = pd.read_csv(root / "data/features/failures.csv")
    assert failures["track_id"].tolist() == ["jazz.00054"]
    assert "jazz.00054.wav" in failures.loc[0, "reason"]
    assert "not decodable" in failures.loc[0, "reason"]
    # What made the tables travels with them: train, promote and serving read it from there.
    made = json.loads((root / "data/features/settings.json").read_text())
    assert made["features"] == params.features.to_dict()
    assert "musicnn" not in made["features"]  # its checkpoint is recorded by its sha256
    assert made["code"]["source"] and made["code"]["librosa"]


def test_rerun_reads_the_cache_and_extracts_only_new_clips(stage_repo, gtzan_mini):
    root, raw = stage_repo
    params = validate_settings(raw)
    features_stage.run(params, root, show_progress=False)
    first = pd.read_csv(root / "data/features/features_30_sec.csv")

    assert features_stage.run(params, root, show_progress=False)["from_cache"] == 3
    pd.testing.assert_frame_equal(pd.read_csv(root / "data/features/features_30_sec.csv"), first)

    added = root / "data/raw/genres/disco/disco.00002.wav"
    added.parent.mkdir(parents=True)
    shutil.copy(gtzan_mini / "genres/disco/disco.00002.wav", added)
    manifest = pd.read_csv(root / "data/manifest.csv")
    manifest.loc[len(manifest)] = _manifest_row(added, root, "disco")
    manifest.to_csv(root / "data/manifest.csv", index=False)
    counts = features_stage.run(params, root, show_progress=False)
    assert (counts["clips"], counts["segments"], counts["from_cache"]) == (4, 16, 3)


def test_changed_settings_do_not_reuse_cached_values(stage_repo):
    root, raw = stage_repo
    features_stage.run(validate_settings(raw), root, show_progress=False)
    raw["features"]["n_mfcc"] = 13
    counts = features_stage.run(validate_settings(raw), root, show_progress=False)
    assert counts["from_cache"] == 0
    clips = pd.read_csv(root / "data/features/features_30_sec.csv")
    assert clips.columns[-1] == "mfcc13_var"


def test_a_truncated_cache_entry_is_extracted_again(stage_repo):
    root, raw = stage_repo
    params = validate_settings(raw)
    features_stage.run(params, root, show_progress=False)
    entry = next((root / "data/features/cache").rglob("*.npz"))
    entry.write_bytes(entry.read_bytes()[:100])  # as an interrupted write would leave it
    assert features_stage.run(params, root, show_progress=False)["from_cache"] == 2


def test_process_pool_gives_the_same_tables(stage_repo):
    root, raw = stage_repo
    features_stage.run(validate_settings(raw), root, show_progress=False)
    single = pd.read_csv(root / "data/features/features_3_sec.csv")
    shutil.rmtree(root / "data/features")
    raw["resources"]["features"]["workers"] = 2
    features_stage.run(validate_settings(raw), root, show_progress=False)
    pd.testing.assert_frame_equal(pd.read_csv(root / "data/features/features_3_sec.csv"), single)


def test_a_worker_that_dies_ends_the_stage_with_the_unfinished_clips(stage_repo):
    """A worker killed mid-stage (as a crash in a native decoder would) must not leave the stage
    waiting for it forever: the error names the clips not finished."""
    import psutil

    root, raw = stage_repo
    manifest = pd.read_csv(root / "data/manifest.csv", dtype={"track_id": str, "sha256": str})
    jobs = jobs_from_manifest(manifest, root, root / "cache", "key")
    # The hand-crafted features only (no musicnn weights, no batch size).
    settings = ExtractionSettings(validate_settings(raw).features, None, None)
    results = extract_all(jobs, settings, workers=2, chunksize=1)
    finished = [next(results)]
    for child in psutil.Process().children():
        if "resource_tracker" not in " ".join(child.cmdline()):  # the pool's workers only
            child.kill()
    with pytest.raises(WorkerCrashError) as raised:
        finished.extend(results)
    message = str(raised.value)
    assert "a worker process of the features stage died" in message
    unfinished = {job.label for job in jobs} - {result.job.label for result in finished}
    assert unfinished, "every clip finished before the kill: nothing left to report"
    assert all(label in message for label in unfinished), message
    assert "resources.features.workers: 1" in message


def test_missing_manifest_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump(project_params({"resources.features.workers": 1}, validate=False))
    )
    assert features_stage.main(["--params", str(tmp_path / "params.yaml")]) == 1
    error = capsys.readouterr().err
    assert f"{tmp_path / 'data' / 'manifest.csv'}: manifest not found" in error
    assert "run the fetch stage first" in error


# Runs the features stage's extract_all with argv[1] workers (1: in this process) on the clips
# named after it and prints the features of the first clip as JSON on its last line.
_EXTRACT_SCRIPT = """
import json, sys, tempfile
from pathlib import Path
from gtzan_mlops.features.extraction import ClipJob, extract_all
from gtzan_mlops.features.feature_sets import ExtractionSettings
from gtzan_mlops.features.handcrafted import REFERENCE_SETTINGS
if __name__ == "__main__":
    cache = Path(tempfile.mkdtemp())
    workers, paths = int(sys.argv[1]), [Path(arg) for arg in sys.argv[2:]]
    jobs = [ClipJob(p.stem, p.parent.name, p, cache / (p.stem + ".npz")) for p in paths]
    # Hand-crafted only (no musicnn weights, no batch size): numba's cache is the point.
    settings = ExtractionSettings(REFERENCE_SETTINGS, None, None)
    results = {r.job.track_id: r for r in extract_all(jobs, settings, workers, chunksize=1)}
    first = results[paths[0].stem]
    assert not first.error, first.error
    print(json.dumps(first.features.handcrafted.clip.tolist()))
"""


@pytest.mark.slow
def test_pool_workers_on_a_fresh_jit_cache_leave_it_usable(tmp_path, gtzan_mini):
    """librosa compiles some functions with numba and caches the code on disk; two fresh workers
    compiling at once left a cache that crashed every later process (segmentation fault in the
    pitch tracking behind chroma). Each cache file must be written once, by one process, and a
    later process must load it and give the pool's values."""
    env = {
        **os.environ,
        "NUMBA_CACHE_DIR": str(tmp_path / "numba-cache"),  # fresh: nothing compiled yet
        "NUMBA_DEBUG_CACHE": "1",  # numba prints every cache file it saves
        "PYTHONUNBUFFERED": "1",  # so the workers' lines reach us before the pool ends them
    }
    clips = [str(gtzan_mini / "genres" / g / f"{g}.00000.wav") for g in ("blues", "rock")]
    pool = subprocess.run(
        [sys.executable, "-c", _EXTRACT_SCRIPT, "2", *clips],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert pool.returncode == 0, pool.stderr[-3000:]
    lines = pool.stdout.splitlines()
    saves = Counter(line for line in lines if line.startswith("[cache] data saved to"))
    assert saves, "numba reported no cache writes: the test no longer observes the cache"
    twice = sorted(line for line, count in saves.items() if count > 1)
    assert not twice, f"cache files written by more than one process: {twice}"

    later = subprocess.run(
        [sys.executable, "-c", _EXTRACT_SCRIPT, "1", clips[0]],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert later.returncode == 0, f"exit {later.returncode}: {later.stderr[-3000:]}"
    # Equal but for float32 rounding: the workers run single-threaded BLAS, this process not.
    np.testing.assert_allclose(
        json.loads(later.stdout.splitlines()[-1]), json.loads(lines[-1]), rtol=1e-6
    )


@pytest.mark.parametrize("stop", ["SIGKILL", "SIGTERM"])
def test_stopping_the_stage_ends_its_workers(tmp_path, gtzan_mini, stop):
    """However the features stage is stopped, its pool's workers end with it."""
    import signal
    import time

    import psutil
    import yaml

    rows = []
    for source in sorted((gtzan_mini / "genres").glob("*/*.wav"))[:24]:
        link = tmp_path / "data/raw/genres" / source.parent.name / source.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(source)
        rows.append(_manifest_row(link, tmp_path, source.parent.name))
    pd.DataFrame(rows).to_csv(tmp_path / "data/manifest.csv", index=False)
    params = project_params(
        {
            "features.sample_rate": SAMPLE_RATE,
            "resources.features.workers": 2,
            "resources.features.chunksize": 1,
        },
        validate=False,
    )
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    command = [sys.executable, "-m", "gtzan_mlops", "features", "--params", "params.yaml"]
    stage = subprocess.Popen(
        command,
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        workers: list[psutil.Process] = []
        while len(workers) < 2:
            assert time.monotonic() < deadline and stage.poll() is None, "no workers started"
            workers = [
                child
                for child in psutil.Process(stage.pid).children()
                if "spawn_main" in " ".join(child.cmdline())
            ]
            time.sleep(0.2)
        time.sleep(1.0)  # the workers are extracting
        stage.send_signal(getattr(signal, stop))
        stage.wait(timeout=30)
        _, alive = psutil.wait_procs(workers, timeout=15)
        assert not alive, f"workers left after {stop} of the stage: {[p.pid for p in alive]}"
    finally:
        if stage.poll() is None:
            stage.kill()


# --- the Ray engine (resources.engine: ray) on a local Ray of one CPU ---------------------------


def _jobs_and_settings(
    root: Path, raw: dict, musicnn: bool = True
) -> tuple[list, ExtractionSettings]:
    """The stage's jobs and settings (with musicnn, as the stage; without: hand-crafted only,
    where the model is beside the point and each new worker process would import TensorFlow)."""
    manifest = pd.read_csv(root / "data/manifest.csv", dtype={"track_id": str, "sha256": str})
    settings = validate_settings(raw)
    extraction = (
        ExtractionSettings.of(settings, root)
        if musicnn
        else ExtractionSettings(settings.features, None, None)
    )
    return jobs_from_manifest(manifest, root, root / "cache", "key"), extraction


def _tables(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.glob("*.csv"))}


@pytest.mark.slow
@pytest.mark.network
def test_the_ray_engine_writes_the_local_engines_tables(stage_repo):
    """The stage with `resources.engine: ray` (a local Ray of `workers` CPUs) against the local
    engine in this process: failures.csv and the musicnn tables are the same files; hand-crafted
    values equal but for float32 rounding (about 1e-6 relative), as this process runs
    multi-threaded BLAS and each Ray worker one thread, like the pool's workers. (Against the
    local pool every table is the same file: tests/integration/test_ray_features.py.)"""
    root, raw = stage_repo
    features_stage.run(validate_settings(raw), root, show_progress=False)
    local = _tables(root / "data/features")
    shutil.rmtree(root / "data/features")  # the tables and the cache

    raw["resources"]["engine"] = "ray"
    raw["resources"]["features"]["workers"] = 1  # a local Ray of one CPU, one clip in flight
    counts = features_stage.run(validate_settings(raw), root, show_progress=False)
    assert (counts["clips"], counts["failed"], counts["from_cache"]) == (3, 1, 0)
    on_ray = _tables(root / "data/features")
    assert on_ray.keys() == local.keys()
    handcrafted = {"features_30_sec.csv", "features_3_sec.csv"}
    assert [name for name in local if name not in handcrafted and on_ray[name] != local[name]] == []
    for name in handcrafted:  # compared as test_process_pool_gives_the_same_tables does
        pd.testing.assert_frame_equal(
            pd.read_csv(io.BytesIO(on_ray[name])), pd.read_csv(io.BytesIO(local[name]))
        )
    failures = pd.read_csv(root / "data/features/failures.csv")
    assert failures["track_id"].tolist() == ["jazz.00054"]
    assert "not decodable" in failures.loc[0, "reason"]


@pytest.mark.slow
@pytest.mark.network
def test_ray_workers_build_musicnn_once_and_the_driver_keeps_the_cache(stage_repo):
    """Ray reuses a worker process for many clips: the model is built once per process, not
    per clip. The cache is written by the driver as results arrive, so a second run submits
    only the clip that failed."""
    root, raw = stage_repo
    jobs, settings = _jobs_and_settings(root, raw)
    extracted = {job.track_id: job for job in jobs if job.track_id != "jazz.00054"}
    with ray_session(None, purpose="test", num_cpus=1):
        first = ray_extraction.RayExtraction(jobs, settings, in_flight=2)
        results = {result.job.track_id: result for result in first}
        again = ray_extraction.RayExtraction(jobs, settings, in_flight=2)
        rerun = list(again)
    assert sorted(results) == sorted(job.track_id for job in jobs)
    assert all(results[track].features is not None for track in extracted)
    assert "not decodable" in results["jazz.00054"].error
    print(f"worker processes and their musicnn builds: {first.workers}")
    assert first.workers and set(first.workers.values()) == {1}
    assert len(first.workers) < len(extracted), "a process per clip: nothing was reused"
    assert all(job.cache_path.is_file() for job in extracted.values())
    # Only the clip that failed is extracted again (a failure is not cached, as locally).
    assert sorted(r.job.track_id for r in rerun if r.from_cache) == sorted(extracted)
    assert [r.job.track_id for r in rerun if not r.from_cache] == ["jazz.00054"]


def _kill_task_workers(times: int, stop: threading.Event, killed: list[int]) -> None:
    """SIGKILL the worker process of this test's Ray (a descendant of this process) running
    `extract_on_worker`, `times` times (each time a new process: the retry's), as a crash in a
    native library would."""
    import psutil

    while len(killed) < times and not stop.is_set():
        for process in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                running = " ".join(process.cmdline()).startswith("ray::extract_on_worker")
                if running and process.pid not in killed:
                    process.kill()
                    killed.append(process.pid)
                    break
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.network
def test_a_clip_whose_worker_dies_twice_is_a_failure_row_and_the_rest_go_on(stage_repo):
    """The worker running a clip is killed, then the worker of its retry: the clip comes back
    as a failure saying so, the clips after it are extracted, nothing waits forever."""
    root, raw = stage_repo
    jobs, settings = _jobs_and_settings(root, raw, musicnn=False)
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_task_workers, args=(2, stop, killed), daemon=True)
    started = time.monotonic()
    with ray_session(None, purpose="test", num_cpus=1):
        results = iter(ray_extraction.RayExtraction(jobs, settings, in_flight=1))
        first = next(results)  # blues: then the worker of metal dies twice
        killer.start()
        rest = list(results)
        stop.set()
        killer.join(timeout=10)
    print(f"killed workers {killed}; {time.monotonic() - started:.1f} s")
    assert len(killed) == 2, "the test no longer kills a worker twice"
    by_track = {result.job.track_id: result for result in [first, *rest]}
    assert sorted(by_track) == sorted(job.track_id for job in jobs)
    died = by_track["metal.00001"]
    assert died.features is None
    assert died.error.startswith("data/raw/genres/metal/metal.00001.wav: the worker died twice")
    assert "\n" not in died.error
    assert by_track["pop.00001"].features is not None, "the clip after it was not extracted"
    assert not died.job.cache_path.exists()


@pytest.mark.slow
@pytest.mark.network
def test_a_cluster_that_runs_no_clip_ends_the_extraction(stage_repo, monkeypatch):
    """Tasks no node can run (here: two CPUs asked of a one-CPU Ray) wait for a node forever
    in Ray; the extraction gives up after STALL_TIMEOUT_S, naming the clips in flight."""
    root, raw = stage_repo
    jobs, settings = _jobs_and_settings(root, raw, musicnn=False)
    monkeypatch.setattr(ray_extraction, "STALL_TIMEOUT_S", 3.0)
    monkeypatch.setitem(ray_extraction.TASK_OPTIONS, "num_cpus", 2)
    with (
        ray_session(None, purpose="test", num_cpus=1),
        pytest.raises(ray_extraction.RayExtractionError) as raised,
    ):
        list(ray_extraction.RayExtraction(jobs, settings, in_flight=2))
    message = str(raised.value)
    assert "no clip finished on the Ray cluster within 3 s (2 in flight" in message
    assert all(job.label in message for job in jobs[:2]), message
    assert "\n" not in message


def test_an_unreachable_ray_address_is_one_line_before_any_work(stage_repo, capsys):
    """engine ray with a cluster address nobody answers at: one line naming the address and
    the fix, no traceback, and no clip extracted (no cache, no tables)."""
    from live_services import free_port

    root, raw = stage_repo
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    address = f"127.0.0.1:{free_port()}"
    status = features_stage.main(
        [
            "--params",
            str(root / "params.yaml"),
            "--set",
            "resources.engine=ray",
            "--set",
            f"resources.ray.address={address}",
        ]
    )
    error = capsys.readouterr().err
    assert status == 2  # a cluster it cannot use: configuration
    lines = error.strip().splitlines()
    assert len(lines) == 1, error
    assert lines[0].startswith(
        f"gtzan-mlops features: features stage: no Ray cluster answers at {address}"
    )
    assert "resources.engine: local" in lines[0]
    assert "Traceback" not in error
    assert not (root / "data/features").exists()
