"""`gtzan-mlops score-catalog` on a real two-node Ray cluster (tests/ray_cluster.py): an actor per
node, the model shipped to them through the object store (the nodes never see the tracking
store), the files read by path; the same scores, value for value, as on a Ray started for the
run, and a bad file reported the same way; a node lost mid-run loses no file."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from mlflow_helpers import GENRES, log_served, log_sklearn, reference_classifier, sqlite_store
from project_params import project_params
from ray_cluster import RayTestCluster, kill_worker_node

from gtzan_mlops.serving.catalog import WORKER_DIED

pytestmark = [pytest.mark.slow, pytest.mark.network]

MODEL_NAME = "gtzan-catalog-cluster"
SONGS = ["blues.00000", "classical.00001", "country.00002", "disco.00000", "jazz.00002"]


@pytest.fixture(scope="module")
def store(tmp_path_factory, reference_table):
    """A registered served model, its champion alias set, in a throwaway SQLite store."""
    with sqlite_store(tmp_path_factory.mktemp("catalog-store")) as uri:
        served = log_served(log_sklearn(reference_classifier(reference_table)), level="segment")
        version = mlflow.register_model(served, MODEL_NAME)
        mlflow.MlflowClient().set_registered_model_alias(MODEL_NAME, "champion", version.version)
        yield uri


@pytest.fixture(scope="module")
def project(tmp_path_factory, gtzan_mini) -> Path:
    """A params.yaml naming the model, and a catalog: real clips and a file that is not audio."""
    folder = tmp_path_factory.mktemp("catalog-project")
    params = project_params({"genres": GENRES, "promote.model_name": MODEL_NAME}, validate=False)
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    catalog = folder / "catalog"
    for song in SONGS:
        genre = song.split(".")[0]
        (catalog / genre).mkdir(parents=True)
        shutil.copyfile(
            gtzan_mini / "genres" / genre / f"{song}.wav", catalog / genre / f"{song}.wav"
        )
    (catalog / "broken.wav").write_text("not audio")
    return folder


def score(project: Path, output: Path, env: dict[str, str], *settings: str) -> str:
    argv = [sys.executable, "-m", "gtzan_mlops", "score-catalog", str(project / "catalog")]
    argv += ["--output", str(output), "--params", str(project / "params.yaml")]
    for setting in settings:
        argv += ["--set", setting]
    result = subprocess.run(argv, cwd=project, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 1, result.stdout + result.stderr[-4000:]  # the broken file
    assert f"{project / 'catalog' / 'broken.wav'}: FAILED: not decodable as audio" in (
        result.stderr
    )
    return result.stdout.strip()


def test_the_cluster_scores_the_catalog_as_a_local_ray_does(
    ray_cluster: RayTestCluster, store, project, tmp_path
):
    env = {**ray_cluster.env, "MLFLOW_TRACKING_URI": store}
    on_cluster = tmp_path / "cluster.parquet"
    summary = score(
        project,
        on_cluster,
        env,
        "resources.engine=ray",
        f"resources.ray.address={ray_cluster.address}",
        "resources.catalog.actors=0",  # one per CPU: one on each node
        "resources.catalog.batch_size=2",
    )
    assert summary.endswith(f"on 2 actors -> {on_cluster}"), summary
    assert f"{len(SONGS) + 1} files, {len(SONGS)} scored, 0 skipped" in summary

    local = tmp_path / "local.parquet"
    score(project, local, env, "resources.catalog.actors=1")

    cluster_rows = pd.read_parquet(on_cluster).sort_values("path", ignore_index=True)
    local_rows = pd.read_parquet(local).sort_values("path", ignore_index=True)
    assert len(cluster_rows) == len(SONGS) + 1
    pd.testing.assert_frame_equal(cluster_rows, local_rows, check_exact=True)
    ray_cluster.wait_for_nodes(2, timeout_s=10)  # the run only attached

    # Again on the cluster: nothing left to score but the broken file.
    again = score(project, on_cluster, env, f"resources.ray.address={ray_cluster.address}")
    assert f"0 scored, {len(SONGS)} skipped (already scored), 1 failed" in again


def test_a_node_lost_mid_run_loses_no_file(
    ray_cluster: RayTestCluster, store, project, tmp_path, gtzan_mini
):
    """The second node killed while its actor scores: its batches are scored again on the
    node left (or, one file at a time, reported), the run ends, every file has one row. Last in
    the module: the cluster is down to its head afterwards."""
    catalog = tmp_path / "catalog"
    shutil.copytree(gtzan_mini / "genres", catalog)
    files = sorted(catalog.rglob("*.wav"))[:40]
    for extra in sorted(catalog.rglob("*.wav"))[40:]:
        extra.unlink()
    output = tmp_path / "scores.parquet"
    log = tmp_path / "score-catalog.log"
    argv = [sys.executable, "-m", "gtzan_mlops", "score-catalog", str(catalog)]
    argv += ["--output", str(output), "--params", str(project / "params.yaml")]
    argv += ["--set", f"resources.ray.address={ray_cluster.address}"]
    argv += ["--set", "resources.catalog.batch_size=2"]
    env = {**ray_cluster.env, "MLFLOW_TRACKING_URI": store}
    with log.open("w") as sink:
        process = subprocess.Popen(argv, cwd=project, env=env, stdout=sink, stderr=sink)
        try:
            # Ray Data logs its progress every 10 s: kill the node once some, not all, are done.
            done = re.compile(r"MapBatches\(CatalogScorer\): (\d+)/(\d+)")
            deadline = time.monotonic() + 300
            while process.poll() is None and time.monotonic() < deadline:
                progress = [tuple(map(int, m)) for m in done.findall(log.read_text())]
                if any(0 < finished < total for finished, total in progress):
                    break
                time.sleep(0.5)
            assert process.poll() is None, "the run ended before the node could be killed"
            kill_worker_node(ray_cluster)
            returncode = process.wait(timeout=600)
        finally:
            if process.poll() is None:
                process.kill()
    output_log = log.read_text()
    assert returncode in (0, 1), output_log[-4000:]
    rows = pd.read_parquet(output)
    assert sorted(rows["path"]) == sorted(map(str, files))  # each file once
    died = rows[rows["error"].notna()]
    assert set(died["error"]) <= {WORKER_DIED}, died
    assert returncode == (1 if len(died) else 0)
    print(f"{len(files)} files, {len(died)} reported lost with the node")
