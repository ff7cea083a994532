"""The features stage on a real two-node Ray cluster (tests/ray_cluster.py): the tables of
`resources.engine: ray` are those of the local pool, file for file, a corrupt clip in
failures.csv; and a node killed in the middle of a run loses no clip: the stage still ends, with
every usable clip in the tables or in failures.csv."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
import soundfile
import yaml
from live_services import run_stage
from project_params import project_params
from ray_cluster import RayTestCluster, kill_worker_node

pytestmark = [pytest.mark.slow, pytest.mark.network]

CORRUPT = "jazz.00054"
STAGE_TIMEOUT_S = 300  # each run below takes well under a minute on a 2-core machine


def clip_project(folder: Path, gtzan_mini: Path, genres: list[str], seconds: float) -> Path:
    """A project folder for the features stage: params.yaml, the first `seconds` of clip 00002
    of each genre of `genres` (real GTZAN audio), a corrupt file that claims to be a WAV, and a
    manifest listing them all as usable."""
    rows = []
    for genre in genres:
        source = gtzan_mini / "genres" / genre / f"{genre}.00002.wav"
        samples, rate = soundfile.read(source, dtype="int16")
        target = folder / "data/raw/genres" / genre / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(target, samples[: int(seconds * rate)], rate, subtype="PCM_16")
        rows.append((target, genre))
    corrupt = folder / f"data/raw/genres/jazz/{CORRUPT}.wav"
    corrupt.parent.mkdir(parents=True, exist_ok=True)
    corrupt.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt this is not audio at all")
    rows.append((corrupt, "jazz"))
    manifest = pd.DataFrame(
        [
            {
                "path": str(path.relative_to(folder)),
                "genre": genre,
                "track_id": path.stem,
                "duration_s": seconds,
                "sample_rate": 22050,
                "channels": 1,
                "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                "status": "ok",
                "source": "test",
            }
            for path, genre in rows
        ]
    )
    manifest.to_csv(folder / "data/manifest.csv", index=False)
    # Two pool processes locally (one thread each, as each Ray worker): this machine's cores.
    params = project_params({"resources.features.workers": 2}, validate=False)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return folder


def on_ray(cluster: RayTestCluster) -> list[str]:
    """The --set options of a stage on `cluster`, every CPU of it in flight."""
    return [
        "--set",
        "resources.engine=ray",
        "--set",
        f"resources.ray.address={cluster.address}",
        "--set",
        "resources.features.workers=0",
    ]


def tables(project: Path) -> dict[str, bytes]:
    folder = project / "data/features"
    return {path.name: path.read_bytes() for path in sorted(folder.glob("*.csv"))}


def extracting_on(cluster: RayTestCluster, node: str) -> bool:
    """Whether a process of `node` runs a clip's task right now."""
    for pid in cluster.pids(node):
        try:
            if " ".join(psutil.Process(pid).cmdline()).startswith("ray::extract_on_worker"):
                return True
        except psutil.NoSuchProcess:
            continue
    return False


def test_the_ray_engine_writes_the_local_engines_tables(
    ray_cluster: RayTestCluster, tmp_path: Path, gtzan_mini: Path
) -> None:
    genres = ["blues", "classical", "country", "disco", "hiphop", "metal"]
    ray_project = clip_project(tmp_path / "ray", gtzan_mini, genres, seconds=10)
    local_project = tmp_path / "local"
    shutil.copytree(ray_project, local_project)

    started = time.monotonic()
    output = run_stage(
        ["features", *on_ray(ray_cluster)], ray_project, ray_cluster.env, STAGE_TIMEOUT_S
    )
    ray_seconds = time.monotonic() - started
    started = time.monotonic()
    run_stage(["features"], local_project, ray_cluster.env, STAGE_TIMEOUT_S)
    print(f"ray engine {ray_seconds:.1f} s, local pool {time.monotonic() - started:.1f} s")

    assert "features: clips 6, segments 18, failed 1" in output, output
    assert "worker processes on 2 nodes" in output, f"not spread over both nodes:\n{output}"
    ray_tables, local_tables = tables(ray_project), tables(local_project)
    assert ray_tables.keys() == local_tables.keys()
    assert [name for name in ray_tables if ray_tables[name] != local_tables[name]] == []
    settings_file = "data/features/settings.json"
    assert (ray_project / settings_file).read_text() == (local_project / settings_file).read_text()
    failures = pd.read_csv(ray_project / "data/features/failures.csv")
    assert failures["track_id"].tolist() == [CORRUPT]
    assert failures.loc[0, "reason"].startswith(f"data/raw/genres/jazz/{CORRUPT}.wav: ")


def test_a_node_killed_mid_run_loses_no_clip(
    ray_cluster: RayTestCluster, tmp_path: Path, gtzan_mini: Path
) -> None:
    """Once a clip is done and another runs on the second node, that node dies (SIGKILL to
    everything it runs). The stage ends on its own, in bounded time, every usable clip in the
    tables or in failures.csv: Ray runs the lost tasks again on the head. Last in the module:
    the cluster is down to its head afterwards."""
    genres = ["blues", "classical", "country", "disco", "hiphop", "metal", "pop", "reggae"]
    project = clip_project(tmp_path / "project", gtzan_mini, genres, seconds=30)
    cache = project / "data/features/cache"
    command = [sys.executable, "-m", "gtzan_mlops", "features", *on_ray(ray_cluster)]
    log = (tmp_path / "stage.log").open("w")
    stage = subprocess.Popen(
        [*command, "--params", str(project / "params.yaml")],
        cwd=project,
        env=ray_cluster.env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    started = time.monotonic()
    try:
        while not (any(cache.rglob("*.npz")) and extracting_on(ray_cluster, "worker")):
            assert stage.poll() is None, (tmp_path / "stage.log").read_text()
            assert time.monotonic() - started < STAGE_TIMEOUT_S, "no clip done in time"
            time.sleep(0.1)
        done_before = len(list(cache.rglob("*.npz")))
        kill_worker_node(ray_cluster)
        killed_at = time.monotonic() - started
        status = stage.wait(timeout=STAGE_TIMEOUT_S)
    finally:
        if stage.poll() is None:
            stage.kill()
            stage.wait()
        log.close()
    output = (tmp_path / "stage.log").read_text()
    print(
        f"node killed at {killed_at:.1f} s with {done_before} of {len(genres)} clips done; "
        f"stage ended at {time.monotonic() - started:.1f} s\n{output[-2000:]}"
    )
    assert status == 0, output
    usable = {f"{genre}.00002" for genre in genres} | {CORRUPT}
    clips = pd.read_csv(project / "data/features/features_30_sec.csv", dtype={"track_id": str})
    failures = pd.read_csv(project / "data/features/failures.csv", dtype={"track_id": str})
    in_tables, failed = set(clips["track_id"]), set(failures["track_id"])
    assert in_tables | failed == usable
    assert not in_tables & failed
    assert CORRUPT in failed
