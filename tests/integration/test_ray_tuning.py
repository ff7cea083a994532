"""Tuning on a real two-node Ray cluster (`resources.engine: ray`): the train stage's Optuna
workers run as Ray tasks on both nodes, sharing a study in PostgreSQL and an MLflow server backed
by PostgreSQL. Every trial is recorded once in Optuna and once in MLflow under the stage's parent
run; the same stage on the local engine gives the same structure, and with one worker the same
trials exactly. A worker that fails on the cluster ends the stage with one line naming it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from live_services import (
    clean_env,
    mlflow_server,
    postgres_server,
    run_stage,
    small_project,
    stop_process,
)
from ray_cluster import RayTestCluster, kill_worker_node

from gtzan_mlops import tracking

pytestmark = [pytest.mark.slow, pytest.mark.network]

FAMILY = "logistic_regression"  # fast trials: the test is about where they run and their records
N_TRIALS = 6
NODE_TAG = "gtzan.ray_node"


@dataclass(frozen=True)
class Servers:
    postgres: str  # postgresql+psycopg2://postgres@127.0.0.1:<port> (add /<database>)
    mlflow: str  # the tracking server's URL
    artifacts: Path  # its artifact store


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    """PostgreSQL (MLflow's store, and a database per Optuna storage the tests use) and an MLflow
    tracking server on it, for the module."""
    folder = tmp_path_factory.mktemp("servers")
    databases = ["mlflow", "optuna_two", "optuna_one", "optuna_failing", "optuna_node_death"]
    with postgres_server(databases) as postgres:
        options = [
            "--backend-store-uri", f"{postgres}/mlflow",
            "--artifacts-destination", str(folder / "artifacts"),
        ]  # fmt: skip
        with mlflow_server("server", options, folder / "mlflow-server.log") as url:
            yield Servers(postgres, url, folder / "artifacts")


def on_ray(cluster: RayTestCluster, workers: int) -> list[str]:
    """The stage's options that run its `workers` Optuna workers as tasks on `cluster`."""
    return [
        "--set", f"resources.train.workers={workers}",
        "--set", "resources.engine=ray",
        "--set", f"resources.ray.address={cluster.address}",
    ]  # fmt: skip


def ray_env(cluster: RayTestCluster, servers: Servers, optuna_database: str) -> dict[str, str]:
    """The cluster's environment (its token settings) with the shared stores."""
    env = {
        **cluster.env,
        "MLFLOW_TRACKING_URI": servers.mlflow,
        "OPTUNA_STORAGE": f"{servers.postgres}/{optuna_database}",
    }
    for name in ("DVC_ROOT", "DVC_EXP_NAME"):
        env.pop(name, None)
    return env


def local_env() -> dict[str, str]:
    """The default stores: a journal file and an SQLite MLflow store inside the project."""
    env = clean_env()
    for name in ("DVC_ROOT", "DVC_EXP_NAME", "RAY_ADDRESS"):
        env.pop(name, None)
    return env


def train(project: Path, env: dict[str, str], options: list[str]) -> tuple[dict[str, Any], float]:
    """Run the stage on FAMILY; its record and how long it took."""
    started = time.monotonic()
    n_trials = f"train.{FAMILY}.n_trials={N_TRIALS}"
    run_stage(["train", "--family", FAMILY, "--set", n_trials, *options], project, env)
    elapsed = time.monotonic() - started
    record = json.loads((project / "data/train" / f"{FAMILY}-handcrafted.json").read_text())
    return record, elapsed


@dataclass(frozen=True)
class Recorded:
    """A stage's study and its trials' nested runs, checked to match one to one."""

    study: Any
    trials: list[Any]  # by number
    runs: dict[int, Any]  # trial number -> its MLflow run
    parent: Any


def recorded(record: dict[str, Any], storage: Any, tracking_uri: str, workers: int) -> Recorded:
    """Every trial of the stage's study finished, recorded once in Optuna and once in MLflow as a
    nested run of the stage's parent run (in its experiment, none elsewhere), numbers 0..n-1."""
    import mlflow
    import optuna
    from optuna.trial import TrialState

    study = optuna.load_study(study_name=record["study"], storage=storage)
    trials = sorted(study.get_trials(deepcopy=False), key=lambda trial: trial.number)
    states = Counter(trial.state.name for trial in trials)
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials), states
    # Workers stop once N_TRIALS have finished; a trial another worker had begun may finish too.
    assert N_TRIALS <= len(trials) <= N_TRIALS + workers - 1, states
    assert [trial.number for trial in trials] == list(range(len(trials)))
    run_of_trial = {trial.number: trial.user_attrs.get("mlflow_run_id") for trial in trials}
    assert None not in run_of_trial.values(), f"trials without a run: {run_of_trial}"
    assert len(set(run_of_trial.values())) == len(trials), "two trials share a run"

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    parent = client.get_run(record["run_id"])
    assert study.user_attrs["mlflow_parent_run_id"] == parent.info.run_id
    every_experiment = [experiment.experiment_id for experiment in client.search_experiments()]
    nested = client.search_runs(
        every_experiment,
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
        max_results=1000,
    )
    assert {run.info.experiment_id for run in nested} == {parent.info.experiment_id}
    runs = {run.info.run_id: run for run in nested}
    assert len(runs) == len(nested) == len(trials), f"{len(nested)} runs for {len(trials)} trials"
    assert set(runs) == set(run_of_trial.values())
    by_trial = {}
    for trial in trials:
        run = runs[run_of_trial[trial.number]]
        assert run.data.tags["optuna.trial"] == str(trial.number)
        assert run.data.tags["optuna.study"] == study.study_name
        assert run.info.status == "FINISHED"
        if trial.state == TrialState.COMPLETE:
            assert run.data.metrics["valid_accuracy"] == pytest.approx(trial.value)
        by_trial[trial.number] = run
    return Recorded(study, trials, by_trial, parent)


def check_record(record: dict[str, Any], result: Recorded) -> None:
    """The stage's record names a valid best trial of its study, within the search space."""
    best = result.study.best_trial
    assert (record["best_trial"], record["best_params"]) == (best.number, best.params)
    assert record["val_metrics"]["valid_accuracy"] == pytest.approx(best.value)
    assert best.value == max(t.value for t in result.trials if t.value is not None)
    assert 0.0 < best.value <= 1.0
    assert 1.0e-3 <= best.params["C"] <= 100.0
    assert record["n_trials"] == len(result.trials)


def structure(record: dict[str, Any], result: Recorded) -> dict[str, Any]:
    """What the stage's outcome looks like, whichever order its trials ran in."""
    return {
        "study": record["study"],
        "record_keys": sorted(record),
        "parent_run": result.parent.info.run_name,
        # Each trial's run named after it (their number varies: see `recorded`).
        "trial_runs_named": all(
            run.info.run_name == f"{FAMILY}-handcrafted-trial-{number:03d}"
            for number, run in result.runs.items()
        ),
        "params": {name for trial in result.trials for name in trial.params},
        "states": {trial.state.name for trial in result.trials},
    }


@pytest.fixture(scope="module")
def local_engine(
    tmp_path_factory: pytest.TempPathFactory, repo_root: Path
) -> tuple[dict[str, Any], Recorded]:
    """The stage on the local engine, in its own process (one worker), with the project's own
    stores (a journal file, an SQLite MLflow store): what the runs on Ray are compared with."""
    folder = tmp_path_factory.mktemp("local")
    project = small_project(folder / "project", repo_root, [FAMILY], N_TRIALS)
    record, elapsed = train(project, local_env(), ["--set", "resources.train.workers=1"])
    print(f"the local engine: the stage took {elapsed:.1f} s")
    with pytest.MonkeyPatch.context() as patch:
        for name in ("MLFLOW_TRACKING_URI", "OPTUNA_STORAGE", "DVC_ROOT"):
            patch.delenv(name, raising=False)
        storage = tracking.optuna_storage(FAMILY, project)
        return record, recorded(record, storage, tracking.tracking_uri(project), workers=1)


def test_two_workers_on_two_nodes_record_every_trial_once(
    ray_cluster: RayTestCluster,
    servers: Servers,
    local_engine: tuple[dict[str, Any], Recorded],
    tmp_path: Path,
    repo_root: Path,
) -> None:
    project = small_project(tmp_path / "ray", repo_root, [FAMILY], N_TRIALS)
    optuna_url = f"{servers.postgres}/optuna_two"
    env = ray_env(ray_cluster, servers, "optuna_two")
    record, elapsed = train(project, env, on_ray(ray_cluster, 2))
    print(f"two Ray workers: the stage took {elapsed:.1f} s")
    on_cluster = recorded(record, optuna_url, servers.mlflow, workers=2)
    check_record(record, on_cluster)
    # The two tasks ran on the two nodes (one CPU each): each trial's run names its node.
    nodes = Counter(run.data.tags[NODE_TAG] for run in on_cluster.runs.values())
    assert len(nodes) == 2, f"trials per node: {nodes}"
    workers = {run.data.tags["gtzan.worker"] for run in on_cluster.runs.values()}
    assert workers == {"1", "2"}
    # The cluster's stores only: nothing written to the project's default stores.
    for local_store in ("mlruns", "optuna-journals", "mlartifacts"):
        assert not (project / local_store).exists(), f"{local_store}/ created in the project"

    # The local engine: the same study (neither engine nor workers is part of its name) and the
    # same structure. The values after the first trial vary with the order two workers take.
    local_record, here = local_engine
    assert structure(record, on_cluster) == structure(local_record, here)
    assert not any(NODE_TAG in run.data.tags for run in here.runs.values())
    # The first trial is the source study's settings (enqueued) in both.
    assert on_cluster.trials[0].params == here.trials[0].params
    assert on_cluster.trials[0].value == here.trials[0].value


def test_one_worker_on_the_cluster_tunes_exactly_as_the_local_engine(
    ray_cluster: RayTestCluster,
    servers: Servers,
    local_engine: tuple[dict[str, Any], Recorded],
    tmp_path: Path,
    repo_root: Path,
) -> None:
    """One Ray worker samples the stream the stage's own process does with the local engine:
    the same trials, values, best model and scores."""
    project = small_project(tmp_path / "ray", repo_root, [FAMILY], N_TRIALS)
    env = ray_env(ray_cluster, servers, "optuna_one")
    record, elapsed = train(project, env, on_ray(ray_cluster, 1))
    print(f"one Ray worker: the stage took {elapsed:.1f} s")
    on_cluster = recorded(record, f"{servers.postgres}/optuna_one", servers.mlflow, workers=1)
    check_record(record, on_cluster)
    assert {run.data.tags["gtzan.worker"] for run in on_cluster.runs.values()} == {"0"}
    local_record, here = local_engine
    assert [(t.params, t.value, t.state) for t in on_cluster.trials] == [
        (t.params, t.value, t.state) for t in here.trials
    ]
    for key in ("study", "best_trial", "best_params", "val_metrics", "selection", "test_metrics"):
        assert record[key] == local_record[key], key


def test_a_failing_worker_ends_the_stage_with_one_line_naming_it(
    ray_cluster: RayTestCluster, servers: Servers, tmp_path: Path, repo_root: Path
) -> None:
    """Every trial fails on the workers (more neighbours than training rows, which scikit-learn
    refuses when the model predicts): the stage stops at the first failed task, names the worker
    and the reason on its last line, and the other worker is stopped, not waited for."""
    project = small_project(
        tmp_path / "ray",
        repo_root,
        ["knn"],
        N_TRIALS,
        updates={"train.knn.space.n_neighbors": 100000},
    )
    env = ray_env(ray_cluster, servers, "optuna_failing")
    command = ["train", "--family", "knn", *on_ray(ray_cluster, 2)]
    started = time.monotonic()
    with pytest.raises(AssertionError, match=r"failed \(1\)") as failure:
        run_stage(command, project, env, timeout_s=300)
    print(f"the failing stage ended in {time.monotonic() - started:.1f} s")
    last = str(failure.value).strip().splitlines()[-1]
    print(last)
    assert last.startswith("gtzan-mlops train: train knn: Optuna worker "), last
    assert "(a Ray task) failed: ValueError: " in last and "n_neighbors" in last, last
    assert "Traceback" not in str(failure.value)
    assert not (project / "data/train/knn-handcrafted.json").exists()
    # Nothing left running: the failed trials are recorded as failed, the stopped one too.
    import optuna

    (summary,) = optuna.get_all_study_summaries(f"{servers.postgres}/optuna_failing")
    study = optuna.load_study(
        study_name=summary.study_name, storage=f"{servers.postgres}/optuna_failing"
    )
    states = Counter(trial.state.name for trial in study.get_trials(deepcopy=False))
    assert set(states) == {"FAIL"}, states


def test_a_node_dying_mid_study_ends_the_stage_naming_its_worker(
    ray_cluster: RayTestCluster, servers: Servers, tmp_path: Path, repo_root: Path
) -> None:
    """The second node is killed while both workers run trials of a long study: the stage does
    not wait for the lost task, it ends with one line naming the worker and what happened to
    it, and stops the other worker. Last in the module: the cluster is down to its head
    afterwards."""

    storage = f"{servers.postgres}/optuna_node_death"
    project = small_project(tmp_path / "ray", repo_root, ["knn"], 1000)
    command = [sys.executable, "-m", "gtzan_mlops", "train", "--family", "knn"]
    command += [*on_ray(ray_cluster, 2), "--params", str(project / "params.yaml")]
    stage = subprocess.Popen(
        command,
        cwd=project,
        env=ray_env(ray_cluster, servers, "optuna_node_death"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        # The workers well under way: a few trials complete.
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and stage.poll() is None:
            if completed(storage) >= 4:
                break
            time.sleep(0.5)
        assert stage.poll() is None, stage.communicate()
        killed = time.monotonic()
        kill_worker_node(ray_cluster)
        _, stderr = stage.communicate(timeout=180)
        print(f"the stage ended {time.monotonic() - killed:.1f} s after the node was killed")
    finally:
        stop_process(stage)
    last = stderr.strip().splitlines()[-1]
    print(last)
    assert stage.returncode == 1, stderr[-3000:]
    assert last.startswith("gtzan-mlops train: train knn: Optuna worker "), last
    assert "(a Ray task) failed: " in last and "Traceback" not in stderr, stderr[-3000:]
    assert "NodeDiedError" in last or "WorkerCrashedError" in last, last
    assert 4 <= completed(storage) < 1000


def completed(storage: str) -> int:
    """The complete trials of the one study in `storage` (0 before it exists)."""
    import optuna

    summaries = optuna.get_all_study_summaries(storage)
    if not summaries:
        return 0
    study = optuna.load_study(study_name=summaries[0].study_name, storage=storage)
    return sum(trial.state.name == "COMPLETE" for trial in study.get_trials(deepcopy=False))
