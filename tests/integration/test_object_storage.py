"""S3-compatible object storage, for real: moto's standalone S3 server on 127.0.0.1 and a bucket
the test makes. DVC pushes the fetch stage's outputs there through dvc-s3 and pulls them back
byte for byte; an `mlflow server` on PostgreSQL keeps its artifacts there
(`--artifacts-destination s3://...`, proxied: clients need only the tracking URI), the training
stage logs to it, and `gtzan-mlops serve` loads the champion from it and answers a real clip.
Credentials come from the environment only (fake ones: moto takes any); these are the commands
docs/experiments.md shows."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml
from live_services import (
    S3_TEST_ENV,
    clean_env,
    gtzan_serve,
    mlflow_server,
    postgres_server,
    run_command,
    run_stage,
    s3_server,
    set_params,
    small_project,
)

pytestmark = [pytest.mark.slow, pytest.mark.network]

BUCKET = "gtzan-mlops-test"
MODEL_NAME = "gtzan-genre-classifier-s3"


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> Iterator[str]:
    """The endpoint URL of a moto S3 server with an empty bucket BUCKET made by the test."""
    log = tmp_path_factory.mktemp("moto") / "moto-server.log"
    with s3_server(log) as endpoint:
        client = _s3_client(endpoint)
        client.create_bucket(Bucket=BUCKET)
        assert [b["Name"] for b in client.list_buckets()["Buckets"]] == [BUCKET]
        yield endpoint


def _s3_client(endpoint: str):
    """A boto3 S3 client of the moto server, with the fake credentials passed explicitly."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=S3_TEST_ENV["AWS_DEFAULT_REGION"],
        aws_access_key_id=S3_TEST_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=S3_TEST_ENV["AWS_SECRET_ACCESS_KEY"],
    )


def _keys(endpoint: str, prefix: str) -> list[str]:
    paginator = _s3_client(endpoint).get_paginator("list_objects_v2")
    pages = paginator.paginate(Bucket=BUCKET, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def _without_aws(env: dict[str, str]) -> dict[str, str]:
    """`env` without any AWS settings: for clients that must need only the tracking URI."""
    return {key: value for key, value in env.items() if not key.startswith("AWS_")}


def _digests(root: Path, names: list[str]) -> dict[str, str]:
    """sha256 of every file under the given paths of `root`."""
    digests = {}
    for name in names:
        path = root / name
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            digests[str(file.relative_to(root))] = hashlib.sha256(file.read_bytes()).hexdigest()
    return digests


def test_dvc_push_and_pull_of_the_fetch_outputs_through_s3(s3, tmp_path, repo_root):
    """`dvc repro` of the fetch stage (a small synthetic demo set) in a fresh git + DVC repo,
    `dvc push` to s3://BUCKET/dvc, the cache and outputs deleted, `dvc pull`: the same bytes."""
    repo = tmp_path / "repo"
    repo.mkdir()
    env = {**_without_aws(clean_env()), **S3_TEST_ENV}  # credentials: the environment only
    for name in ("DVC_ROOT", "DVC_EXP_NAME"):
        env.pop(name, None)
    shutil.copyfile(repo_root / "params.yaml", repo / "params.yaml")
    set_params(
        repo / "params.yaml",
        {"data.source": "demo", "data.demo.clips_per_genre": 2, "data.demo.duration_s": 4.0},
    )
    # The fetch stage as dvc.yaml has it, without the src/ deps (there is no src/ here).
    fetch = yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]["fetch"]
    del fetch["deps"]
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"fetch": fetch}}, sort_keys=False))

    def run(*command: str) -> str:
        return run_command(list(command), repo, env, timeout_s=300)

    run("git", "init", "-q")
    run("dvc", "init", "-q")
    run("dvc", "config", "core.analytics", "false")  # nothing phones home
    run("dvc", "config", "core.check_update", "false")
    # The commands docs/experiments.md shows.
    run("dvc", "remote", "add", "-d", "s3remote", f"s3://{BUCKET}/dvc")
    run("dvc", "remote", "modify", "s3remote", "endpointurl", s3)
    run("dvc", "repro")
    outputs = ["data/raw", "data/manifest.csv"]
    before = _digests(repo, outputs)
    assert len([name for name in before if name.endswith(".wav")]) == 20, sorted(before)

    pushed = run("dvc", "push")
    assert "pushed" in pushed, pushed
    stored = _keys(s3, "dvc/")
    # DVC 3 keeps content-addressed files under files/md5/; the 20 clips, the manifest and the
    # directory listing at least.
    assert len(stored) >= len(before) + 1, stored
    assert all(key.startswith("dvc/files/md5/") for key in stored), stored
    assert "are in sync" in run("dvc", "status", "--cloud")

    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(repo / "data" / "raw")
    (repo / "data" / "manifest.csv").unlink()
    run("dvc", "pull")
    assert _digests(repo, outputs) == before
    assert "up to date" in run("dvc", "status")


def test_mlflow_server_on_postgres_keeps_artifacts_in_s3_and_serves_the_champion(
    s3, tmp_path, repo_root, reference_table, gtzan_mini, monkeypatch
):
    """`mlflow server --backend-store-uri postgresql+psycopg2://... --artifacts-destination
    s3://BUCKET/mlflow`: the training stage logs its runs and model, the serving pyfunc is
    registered with the alias champion, their artifacts land in the bucket (none in the
    project), and `gtzan-mlops serve --model models:/NAME@champion` answers a real clip."""
    import mlflow
    from mlflow_helpers import GENRES, log_served, log_sklearn, reference_classifier

    from gtzan_mlops.serving.spec import BASE64_COLUMN, GENRE_COLUMN, probability_column

    family = "knn"
    project = small_project(tmp_path / "project", repo_root, [family], n_trials=2)
    server_env = clean_env(MLFLOW_S3_ENDPOINT_URL=s3, **S3_TEST_ENV)
    with postgres_server(["mlflow"]) as postgres:
        server_options = [
            "--backend-store-uri", f"{postgres}/mlflow",
            "--artifacts-destination", f"s3://{BUCKET}/mlflow",
        ]  # fmt: skip
        log = tmp_path / "mlflow-server.log"
        with mlflow_server("server", server_options, log, env=server_env) as url:
            # The training stage, as a client: the tracking URI and nothing about S3.
            client_env = _without_aws(clean_env(MLFLOW_TRACKING_URI=url))
            for name in ("DVC_ROOT", "DVC_EXP_NAME"):
                client_env.pop(name, None)
            n_trials = f"train.{family}.n_trials=2"
            run_stage(["train", "--family", family, "--set", n_trials], project, client_env)
            record = json.loads((project / "data/train" / f"{family}-handcrafted.json").read_text())

            client = mlflow.MlflowClient(tracking_uri=url)
            parent = client.get_run(record["run_id"])
            assert parent.info.artifact_uri.startswith("mlflow-artifacts:"), parent.info
            trained = client.get_logged_model(record["model_uri"].removeprefix("models:/"))
            assert trained.artifact_location.startswith("mlflow-artifacts:"), trained

            # The serving pyfunc around a real classifier, logged from this process (also a
            # client without S3 settings) and registered as the champion.
            for key in [*S3_TEST_ENV, "MLFLOW_S3_ENDPOINT_URL"]:
                monkeypatch.delenv(key, raising=False)
            monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
            mlflow.set_tracking_uri(url)
            try:
                mlflow.set_experiment("s3-serving")
                classifier_uri = log_sklearn(reference_classifier(reference_table))
                served_uri = log_served(classifier_uri, level="segment")
                version = mlflow.register_model(served_uri, MODEL_NAME).version
                client.set_registered_model_alias(MODEL_NAME, "champion", version)
            finally:
                mlflow.set_tracking_uri(None)

            # The artifacts are objects in the bucket under mlflow/: the stage's run files and
            # model, the classifier and the served pyfunc.
            stored = _keys(s3, "mlflow/")
            names = {key.rsplit("/", 1)[-1] for key in stored}
            assert {"MLmodel", "confusion_test.png", "history.csv"} <= names, sorted(stored)
            run_id = parent.info.run_id
            assert any(f"/{run_id}/" in key for key in stored), (run_id, stored)
            for model_uri in (record["model_uri"], classifier_uri, served_uri):
                model_id = model_uri.removeprefix("models:/")
                model_files = [key for key in stored if f"/{model_id}/" in key]
                assert any(key.endswith("/MLmodel") for key in model_files), (model_id, stored)
            for local_store in ("mlruns", "mlartifacts"):
                assert not (project / local_store).exists(), f"{local_store}/ in the project"

            clip = gtzan_mini / "genres" / "jazz" / "jazz.00001.wav"
            audio = base64.b64encode(clip.read_bytes()).decode("ascii")
            body = {"dataframe_split": {"columns": [BASE64_COLUMN], "data": [[audio]]}}
            serve_log = tmp_path / "serve.log"
            champion = f"models:/{MODEL_NAME}@champion"
            # No AWS settings and the system's PATH: the server proxies the artifacts.
            serve_env = _without_aws(clean_env(MLFLOW_TRACKING_URI=url, PATH="/usr/bin:/bin"))
            with gtzan_serve(champion, serve_env, serve_log, cwd=repo_root) as base:
                answer = requests.post(
                    f"{base}/invocations",
                    data=json.dumps(body),
                    headers={"Content-Type": "application/json"},
                    timeout=120,
                )
            assert answer.status_code == 200, answer.text
            [prediction] = answer.json()["predictions"]
            assert prediction[GENRE_COLUMN] in GENRES, prediction
            probabilities = [prediction[probability_column(genre)] for genre in GENRES]
            assert sum(probabilities) == pytest.approx(1.0, abs=1e-6), prediction
            assert "gtzan-mlops serve: models:/" in serve_log.read_text()
