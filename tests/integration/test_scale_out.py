"""Tracking on a real server: the training stage pointed at an `mlflow server` backed by
PostgreSQL, with the server's own artifact store, by setting MLFLOW_TRACKING_URI; its Optuna
study in the same PostgreSQL (OPTUNA_STORAGE), shared by two worker processes. Every trial is
recorded once in Optuna and once in MLflow, under the stage's parent run: nothing lost, nothing
twice."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from live_services import clean_env, mlflow_server, postgres_server, run_stage, small_project

pytestmark = [pytest.mark.slow, pytest.mark.network]

FAMILY = "knn"  # fast trials: the test is about bookkeeping under concurrency, not models
N_TRIALS = 10
WORKERS = 2


def test_two_workers_record_every_trial_once_on_a_postgres_backed_server(tmp_path, repo_root):
    import mlflow
    import optuna
    from optuna.trial import TrialState

    project = small_project(tmp_path / "project", repo_root, [FAMILY], N_TRIALS)
    artifacts = tmp_path / "server-artifacts"
    with postgres_server(["mlflow", "optuna"]) as postgres:
        server_options = [
            "--backend-store-uri", f"{postgres}/mlflow",
            "--artifacts-destination", str(artifacts),
        ]  # fmt: skip
        with mlflow_server("server", server_options, tmp_path / "mlflow-server.log") as url:
            env = clean_env(MLFLOW_TRACKING_URI=url, OPTUNA_STORAGE=f"{postgres}/optuna")
            for name in ("DVC_ROOT", "DVC_EXP_NAME"):
                env.pop(name, None)
            train = ["train", "--family", FAMILY, "--set", f"resources.train.workers={WORKERS}"]
            run_stage([*train, "--set", f"train.{FAMILY}.n_trials={N_TRIALS}"], project, env)
            record = json.loads((project / "data/train" / f"{FAMILY}-handcrafted.json").read_text())

            # Optuna: the study in PostgreSQL holds the finished trials, none failed or stuck.
            # Workers stop once N_TRIALS have finished, so a worker's trial that was already
            # running may finish too: up to WORKERS - 1 more.
            study = optuna.load_study(study_name=record["study"], storage=f"{postgres}/optuna")
            trials = study.get_trials(deepcopy=False)
            states = Counter(trial.state.name for trial in trials)
            finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
            assert len(finished) == len(trials), f"trials not finished: {states}"
            assert N_TRIALS <= len(trials) <= N_TRIALS + WORKERS - 1, states
            assert sorted(t.number for t in trials) == list(range(len(trials)))
            run_of_trial = {t.number: t.user_attrs.get("mlflow_run_id") for t in trials}
            assert None not in run_of_trial.values(), f"trials without a run: {run_of_trial}"
            assert len(set(run_of_trial.values())) == len(trials), "two trials share a run"

            # MLflow, through the server: one nested run per trial under the stage's parent,
            # in the parent's experiment, none anywhere else.
            client = mlflow.MlflowClient(tracking_uri=url)
            parent = client.get_run(record["run_id"])
            assert study.user_attrs["mlflow_parent_run_id"] == parent.info.run_id
            assert parent.info.run_name.startswith(f"train-{FAMILY} [")
            experiment_ids = [e.experiment_id for e in client.search_experiments()]
            nested_anywhere = client.search_runs(
                experiment_ids,
                filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                max_results=1000,
            )
            home = parent.info.experiment_id
            nested = [run for run in nested_anywhere if run.info.experiment_id == home]
            assert len(nested) == len(nested_anywhere), "trial runs outside the parent's experiment"
            runs = {run.info.run_id: run for run in nested}
            assert len(runs) == len(nested) == len(trials), (
                f"{len(nested)} nested runs ({len(runs)} distinct) for {len(trials)} trials"
            )
            assert set(runs) == set(run_of_trial.values())
            for trial in trials:
                run = runs[run_of_trial[trial.number]]
                assert run.data.tags["optuna.trial"] == str(trial.number)
                assert run.data.tags["optuna.study"] == study.study_name
                assert run.info.run_name == f"{FAMILY}-handcrafted-trial-{trial.number:03d}"
                assert run.info.status == "FINISHED"
                if trial.state == TrialState.COMPLETE:
                    assert run.data.metrics["valid_accuracy"] == pytest.approx(trial.value)

            # The two workers really shared the study: their trials overlap in time.
            assert max_concurrent(trials) >= 2, "the trials ran one at a time"

            # Artifacts went through the server to its artifact store, nothing to the project.
            assert parent.info.artifact_uri.startswith("mlflow-artifacts:"), parent.info
            model = client.get_logged_model(record["model_uri"].removeprefix("models:/"))
            assert model.artifact_location.startswith("mlflow-artifacts:"), model
            stored = {path.name for path in artifacts.rglob("*") if path.is_file()}
            assert {"MLmodel", "confusion_test.png", "history.csv"} <= stored, sorted(stored)
    for local_store in ("mlruns", "optuna-journals", "mlartifacts"):
        assert not (project / local_store).exists(), f"{local_store}/ created in the project"


def max_concurrent(trials) -> int:
    """The most trials that were running at the same moment."""
    events = []
    for trial in trials:
        events += [(trial.datetime_start, 1), (trial.datetime_complete, -1)]
    running = peak = 0
    for _, change in sorted(events, key=lambda event: (event[0], event[1])):
        running += change
        peak = max(peak, running)
    return peak
