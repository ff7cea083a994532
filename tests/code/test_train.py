"""The training stage: every family tunes, logs nested trials and a loadable model; studies resume,
are shared safely by parallel workers, and give the same model for the same seed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pandas as pd
import pytest
import ray
from live_services import free_port, small_project

from gtzan_mlops import tracking
from gtzan_mlops.evaluation.scoring import METRICS
from gtzan_mlops.features import feature_sets
from gtzan_mlops.features.handcrafted import FEATURE_NAMES
from gtzan_mlops.models import zoo
from gtzan_mlops.models.ray_workers import WorkerError, sampler_streams, tuning_cluster
from gtzan_mlops.models.study import StudySettings
from gtzan_mlops.models.training_data import load_training_data
from gtzan_mlops.settings.loading import ConfigError, load_settings, read_params, validate_settings
from gtzan_mlops.stages import train


def make_project(folder: Path, repo_root: Path, n_trials: int = 2) -> Path:
    """A project with every family, the default stores (mlruns/, optuna-journals/) inside it."""
    return small_project(folder, repo_root, list(zoo.FAMILIES), n_trials)


@pytest.fixture(scope="module")
def project(tmp_path_factory, repo_root):
    """One project for the module, with the default stores (mlruns/, optuna-journals/) inside it."""
    folder = make_project(tmp_path_factory.mktemp("train") / "project", repo_root)
    with pytest.MonkeyPatch.context() as patch:
        for name in ("MLFLOW_TRACKING_URI", "OPTUNA_STORAGE", "DVC_ROOT", "DVC_EXP_NAME"):
            patch.delenv(name, raising=False)
        yield folder
    mlflow.set_tracking_uri(None)


def _nested_runs(parent_run_id: str) -> pd.DataFrame:
    return mlflow.search_runs(
        search_all_experiments=True, filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'"
    )


@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_every_family_tunes_logs_trials_and_a_loadable_model(project, family):
    params = load_settings(project / "params.yaml")
    record = train.run(params, project, family)

    # The record evaluate reads, and the DVC metrics file naming its split.
    assert json.loads((project / "data/train" / f"{family}-handcrafted.json").read_text()) == record
    metrics = json.loads(
        (project / "reports/train" / f"{family}-handcrafted" / "metrics.json").read_text()
    )
    assert metrics["split"] == "song-grouped" and metrics["leaky"] is False
    # Genres are well apart in the synthetic data: every family must beat chance (0.1) clearly.
    assert metrics["test_accuracy"] > 0.3, metrics
    assert record["level"] == "segment" and record["flavor"] == zoo.flavor_of(family)
    # The selection score: the best trial's validation metric (params' selection), not a test
    # score; every score with its interval.
    assert set(record["val_metrics"]) == {f"valid_{name}" for name in METRICS}
    selection = record["selection"]
    assert selection["source"] == "validation"
    assert selection["value"] == pytest.approx(
        record["val_metrics"][f"valid_{selection['metric']}"]
    )
    assert set(record["test_intervals"]) == {f"test_{name}" for name in METRICS}
    for name in record["test_intervals"]:
        assert metrics[f"{name}_low"] <= metrics[name] <= metrics[f"{name}_high"]

    # One parent run with one nested run per trial, all with the same metric names.
    assert mlflow.get_tracking_uri() == f"sqlite:///{project / 'mlruns' / 'mlflow.db'}"
    parent = mlflow.get_run(record["run_id"])
    assert parent.info.run_name == f"train-{family} [handcrafted features, song-grouped split]"
    assert parent.data.tags["split"] == "song-grouped"
    assert "git_commit" in parent.data.tags
    assert {
        "test_accuracy",
        "test_song_accuracy",
        "test_song_accuracy_low",
        "test_song_accuracy_high",
        "best_valid_accuracy",
        f"selection_{selection['metric']}",
    } <= set(parent.data.metrics)
    trials = _nested_runs(record["run_id"])
    assert len(trials) == 2
    assert (trials["experiment_id"] == parent.info.experiment_id).all()
    complete = trials[trials["tags.optuna.state"] == "COMPLETE"]
    assert complete["metrics.valid_accuracy"].notna().all()
    assert complete["metrics.valid_song_macro_f1"].notna().all()
    artifacts = {item.path for item in mlflow.MlflowClient().list_artifacts(record["run_id"])}
    assert {"confusion_test.png", "per_class_test.csv", "optuna_history.png", "history.csv"} <= (
        artifacts
    )
    assert (project / "reports/train" / f"{family}-handcrafted" / "optuna_history.png").is_file()

    # The logged model loads and gives probabilities over the ten genres.
    model = zoo.load_classifier(record["model_uri"], record["flavor"])
    rows = pd.read_csv(project / "data/features/features_3_sec.csv").head(7)
    probabilities = model.predict_proba(rows[list(FEATURE_NAMES)])
    assert probabilities.shape == (7, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    info = mlflow.models.get_model_info(record["model_uri"])
    assert info.signature is not None and info.saved_input_example_info is not None


def test_first_trial_is_the_source_studys_settings(project):
    params = load_settings(project / "params.yaml")
    record = train.run(params, project, "knn")  # resumes the study if it already exists
    settings = params.train.knn
    study = optuna.load_study(
        study_name=record["study"], storage=tracking.optuna_storage("knn", project)
    )
    assert study.trials[0].params == settings.defaults


def test_rerun_resumes_the_study_and_more_trials_extend_it(project):
    params = load_settings(project / "params.yaml")
    first = train.run(params, project, "naive_bayes")
    again = train.run(params, project, "naive_bayes")
    assert again["study"] == first["study"] and again["run_id"] == first["run_id"]
    assert len(_nested_runs(first["run_id"])) == 2  # no trial ran twice
    more_trials = load_settings(project / "params.yaml", ["train.naive_bayes.n_trials=3"])
    more = train.run(more_trials, project, "naive_bayes")
    assert more["run_id"] == first["run_id"] and more["n_trials"] == 3
    assert len(_nested_runs(first["run_id"])) == 3
    # Another search space is another study, under a new parent run.
    raw = read_params(project / "params.yaml")
    raw["train"]["naive_bayes"]["space"]["var_smoothing"]["high"] = 1.0e-3
    changed = train.run(validate_settings(raw), project, "naive_bayes")
    assert changed["study"] != first["study"] and changed["run_id"] != first["run_id"]


@pytest.mark.parametrize("family", ["fnn_simple", "xgboost", "random_forest"])
def test_same_seed_gives_the_same_model(tmp_path, repo_root, monkeypatch, family):
    """Two fresh projects (separate stores and studies): identical trials and predictions."""
    for name in ("MLFLOW_TRACKING_URI", "OPTUNA_STORAGE", "DVC_ROOT"):
        monkeypatch.delenv(name, raising=False)
    predictions = []
    for copy in ("a", "b"):
        folder = make_project(tmp_path / copy, repo_root, n_trials=2)
        record = train.run(load_settings(folder / "params.yaml"), folder, family)
        model = zoo.load_classifier(record["model_uri"], record["flavor"])
        rows = pd.read_csv(folder / "data/features/features_3_sec.csv")
        predictions.append((record["best_params"], model.predict_proba(rows[list(FEATURE_NAMES)])))
        mlflow.set_tracking_uri(None)
    assert predictions[0][0] == predictions[1][0]
    np.testing.assert_array_equal(predictions[0][1], predictions[1][1])


def test_two_worker_processes_share_the_study_and_lose_no_trial(tmp_path, repo_root, monkeypatch):
    """`resources.train.workers: 2`: two processes write trials to one journal file and one
    MLflow store at once; every trial is recorded exactly once in Optuna and once in MLflow."""
    for name in ("MLFLOW_TRACKING_URI", "OPTUNA_STORAGE", "DVC_ROOT"):
        monkeypatch.delenv(name, raising=False)
    folder = make_project(tmp_path / "parallel", repo_root, n_trials=10)
    params = load_settings(folder / "params.yaml", ["resources.train.workers=2"])
    record = train.run(params, folder, "knn")

    study = optuna.load_study(
        study_name=record["study"], storage=tracking.optuna_storage("knn", folder)
    )
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len(finished) >= 10  # workers stop at 10; a trial each may already be under way
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in finished)
    run_ids = [t.user_attrs["mlflow_run_id"] for t in finished]
    assert len(set(run_ids)) == len(run_ids)
    nested = _nested_runs(record["run_id"])
    assert sorted(nested["run_id"]) == sorted(run_ids)
    assert sorted(nested["tags.optuna.trial"].astype(int)) == sorted(t.number for t in finished)


def test_joining_a_study_that_does_not_exist_is_a_clear_error(project):
    params = load_settings(project / "params.yaml")
    with pytest.raises(ConfigError, match="start the stage first"):
        train.join(params, project, "svm", feature_sets.HANDCRAFTED, "svm-no-such-study", None)


def test_pruning_hook_stops_keras_and_xgboost(project):
    data = load_training_data(load_settings(project / "params.yaml"), project)

    def prune_at_two(step: int, value: float) -> None:
        if step >= 2:
            raise optuna.TrialPruned()

    space = {"learning_rate": 0.01, "batch_size": 64, "epochs": 10, "patience": 5, "dropout": 0.2}
    with pytest.raises(optuna.TrialPruned):
        zoo.fit_family(
            "fnn_simple", space, data.xy("train"), 10, 0, data.xy("valid"), None, prune_at_two
        )
    rounds = {"n_estimators": 100, "early_stopping_rounds": 100, "learning_rate": 0.1}
    seen = []
    with pytest.raises(optuna.TrialPruned):
        zoo.fit_family(
            "xgboost",
            rounds,
            data.xy("train"),
            10,
            0,
            data.xy("valid"),
            None,
            lambda step, value: (seen.append(step), prune_at_two(len(seen), value)),
        )
    assert seen == [10, 20]


def test_search_space_entries(project):
    def space_of(written: dict) -> dict:
        """A search space as params.yaml's schema reads it (`train.<family>.space`)."""
        raw = read_params(project / "params.yaml")
        raw["train"]["knn"]["space"] = written
        return validate_settings(raw).train.knn.space

    trial = optuna.trial.FixedTrial({"n": 3, "rate": 0.01, "kind": "b"})
    space = space_of(
        {
            "n": {"type": "int", "low": 1, "high": 5},
            "rate": {"type": "float", "low": 1e-4, "high": 1.0, "log": True},
            "kind": {"type": "categorical", "choices": ["a", "b"]},
            "fixed": 7,
        }
    )
    assert zoo.suggest(trial, space) == {"n": 3, "rate": 0.01, "kind": "b", "fixed": 7}
    assert zoo.tunable(space) == ["n", "rate", "kind"] and zoo.fixed(space) == {"fixed": 7}
    # A malformed entry is refused when params.yaml is read, before any trial.
    with pytest.raises(ConfigError, match="type int, float or categorical"):
        zoo.suggest(trial, space_of({"n": {"type": "integer", "low": 1, "high": 2}}))
    with pytest.raises(ConfigError, match=r"missing setting 'train\.knn\.space\.n\.high'"):
        zoo.suggest(trial, space_of({"n": {"type": "int", "low": 1}}))
    # The SVM's calibration reads one decision value per genre: one-vs-one is refused at load.
    raw = read_params(project / "params.yaml")
    raw["train"]["svm"]["space"]["decision_function_shape"] = "ovo"
    with pytest.raises(ConfigError, match="decision_function_shape must be 'ovr'"):
        validate_settings(raw)
    assert zoo.hidden_layers("512-256") == (512, 256)
    with pytest.raises(ConfigError, match="hidden_layers"):
        zoo.hidden_layers("wide")


def test_a_genre_missing_from_training_is_a_clear_error(project):
    data = load_training_data(load_settings(project / "params.yaml"), project)
    features, labels = data.xy("train")
    keep = labels != 3
    with pytest.raises(ValueError, match=r"lack genre indices \[3\]"):
        zoo.fit_family("knn", {}, (features[keep], labels[keep]), 10, 0)


def test_stores_follow_dvc_root_and_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    real, temporary = tmp_path / "repo", tmp_path / "repo/.dvc/tmp/exps/run/abc"
    temporary.mkdir(parents=True)
    # `dvc exp run` in a temporary copy: DVC_ROOT names the real repository.
    monkeypatch.setenv("DVC_ROOT", str(real))
    assert tracking.tracking_uri(temporary) == f"sqlite:///{real / 'mlruns' / 'mlflow.db'}"
    assert tracking.artifact_location(tracking.tracking_uri(temporary)) == (
        (real / "mlruns" / "artifacts").as_uri()
    )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri(temporary) == "http://127.0.0.1:5000"
    assert tracking.artifact_location("http://127.0.0.1:5000") is None
    monkeypatch.setenv("OPTUNA_STORAGE", "postgresql+psycopg2://localhost/optuna")
    assert tracking.optuna_storage("knn", temporary) == "postgresql+psycopg2://localhost/optuna"
    monkeypatch.setenv("DVC_EXP_NAME", "sunny-day")
    assert tracking.run_tags(temporary)["dvc.exp_name"] == "sunny-day"
    shutil.rmtree(real)


def test_tables_made_with_other_settings_are_refused(project):
    """A run asking for other feature settings than the tables were made with (a `--set` outside
    DVC) must not train on them under a record that claims the asked-for settings."""
    params = load_settings(project / "params.yaml")
    params = params.model_copy(
        update={"features": params.features.model_copy(update={"sample_rate": 16000})}
    )
    with pytest.raises(
        feature_sets.FeatureSetError, match=r"sample_rate 22050 \(tables\) vs 16000"
    ):
        load_training_data(params, project)
    record = load_training_data(load_settings(project / "params.yaml"), project)
    assert record.feature_settings["sample_rate"] == 22050  # read from the tables' record


# --- tuning on Ray (resources.engine: ray) -------------------------------------------------------


def on_ray(project: Path, address: str | None, workers: int = 2, *more: str):
    """The project's settings with the Optuna workers on Ray (`address` None: a local Ray)."""
    overrides = ["resources.engine=ray", f"resources.train.workers={workers}", *more]
    if address is not None:
        overrides.append(f"resources.ray.address={address}")
    return load_settings(project / "params.yaml", overrides)


@pytest.mark.parametrize(
    ("optuna_storage", "tracking_uri", "message"),
    [
        (None, "http://127.0.0.1:5000", r"Optuna study in a journal file.*set train\.optuna_stor"),
        ("sqlite:///optuna.db", "http://127.0.0.1:5000", r"Optuna study in sqlite:///optuna\.db"),
        ("postgresql+psycopg2://db/optuna", None, r"MLflow store sqlite:///.*MLFLOW_TRACKING_URI"),
        ("postgresql+psycopg2://db/optuna", "/srv/mlruns", r"MLflow store /srv/mlruns of this"),
    ],
    ids=["journal-file", "sqlite-study", "sqlite-mlflow", "mlflow-folder"],
)
def test_a_cluster_needs_stores_every_node_reaches(
    project, monkeypatch, optuna_storage, tracking_uri, message
):
    """With a cluster's address, a study or MLflow store in a file of this machine is refused
    before any work: before even connecting (nothing answers at the address, which would be a
    ClusterError), and with the setting to change."""
    for name, value in (("OPTUNA_STORAGE", optuna_storage), ("MLFLOW_TRACKING_URI", tracking_uri)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    address = f"127.0.0.1:{free_port()}"
    with pytest.raises(ConfigError, match=message) as error:
        train.run(on_ray(project, address), project, "svm")
    assert f"resources.ray.address {address} runs the trials on other machines" in str(error.value)
    assert "resources.ray.address: null" in str(error.value)
    assert "\n" not in str(error.value)
    assert not ray.is_initialized()


def test_an_unreachable_cluster_is_one_line_before_any_work(project, monkeypatch, capsys):
    """Stores every node could reach (never contacted), a cluster address nobody answers at:
    the command prints one line and exits 2 (configuration) before loading data or making a
    run."""
    monkeypatch.setenv("OPTUNA_STORAGE", f"postgresql+psycopg2://nobody@127.0.0.1:{free_port()}/o")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    address = f"127.0.0.1:{free_port()}"
    records = sorted((project / "data/train").glob("*.json"))
    argv = ["--family", "svm", "--params", str(project / "params.yaml")]
    argv += ["--set", "resources.train.workers=2", "--set", "resources.engine=ray"]
    argv += ["--set", f"resources.ray.address={address}"]
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"gtzan-mlops train: train svm: no Ray cluster answers at {address}")
    assert "\n" not in err, err
    assert sorted((project / "data/train").glob("*.json")) == records
    assert not ray.is_initialized()


@pytest.mark.parametrize(("engine", "workers"), [("local", 2), ("ray", 0)])
def test_the_local_engine_or_no_workers_start_no_ray(project, engine, workers):
    """The trials run in local processes or in the stage's own: no Ray is started or attached
    to, whatever the address says."""
    settings = load_settings(
        project / "params.yaml",
        [f"resources.engine={engine}", f"resources.train.workers={workers}",
         f"resources.ray.address=127.0.0.1:{free_port()}"],
    )  # fmt: skip
    with tuning_cluster(settings.resources, StudySettings.of(settings, "svm"), project) as cluster:
        assert cluster is None
        assert not ray.is_initialized()


def test_one_ray_worker_samples_the_stages_own_stream():
    """One worker samples what the stage's process would (stream 0), so that it tunes exactly
    as the local engine's single process; several sample 1..N, as local worker processes do."""
    assert sampler_streams(1) == [0]
    assert sampler_streams(3) == [1, 2, 3]


def test_a_failed_local_worker_process_is_named(tmp_path, repo_root, monkeypatch):
    """Every trial fails in the worker processes (more neighbours than training rows): the
    stage ends with a WorkerError naming each worker and its exit status."""
    for name in ("MLFLOW_TRACKING_URI", "OPTUNA_STORAGE", "DVC_ROOT"):
        monkeypatch.delenv(name, raising=False)
    folder = small_project(
        tmp_path / "failing", repo_root, ["knn"], 2, updates={"train.knn.space.n_neighbors": 10**5}
    )
    params = load_settings(folder / "params.yaml", ["resources.train.workers=2"])
    with pytest.raises(WorkerError, match=r"worker 1 exit status 1, worker 2 exit status 1"):
        train.run(params, folder, "knn")
    mlflow.set_tracking_uri(None)


@pytest.mark.slow
@pytest.mark.network
def test_ray_workers_on_a_local_ray_share_the_journal_and_record_every_trial_once(
    tmp_path, repo_root, monkeypatch
):
    """A local Ray (address null) runs on this machine: its two workers share the journal file
    and the SQLite store, every trial once in each, each run naming the node and worker."""
    for name in ("MLFLOW_TRACKING_URI", "OPTUNA_STORAGE", "DVC_ROOT", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    folder = make_project(tmp_path / "ray", repo_root, n_trials=6)
    record = train.run(on_ray(folder, None), folder, "knn")
    assert not ray.is_initialized()

    study = optuna.load_study(
        study_name=record["study"], storage=tracking.optuna_storage("knn", folder)
    )
    trials = study.get_trials(deepcopy=False)
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    assert 6 <= len(trials) <= 7  # a trial the other worker had begun may finish too
    run_ids = [t.user_attrs["mlflow_run_id"] for t in trials]
    nested = _nested_runs(record["run_id"])
    assert sorted(nested["run_id"]) == sorted(run_ids)
    assert sorted(nested["tags.optuna.trial"].astype(int)) == sorted(t.number for t in trials)
    assert nested["tags.gtzan.ray_node"].nunique() == 1  # the one node of a local Ray
    assert set(nested["tags.gtzan.worker"]) <= {"1", "2"}
    assert record["n_trials"] == len(trials)
    mlflow.set_tracking_uri(None)


@pytest.mark.parametrize(
    ("source", "max_trials", "n_trials", "expected"),
    [
        ("demo", 3, 10, 3),  # the demo's own budget
        ("demo", 3, 2, 2),  # a smaller family budget stays
        ("demo", None, 10, 10),  # no demo budget: the family's
        ("local", 3, 10, 10),  # real data: the family's budget, whatever the demo's
        ("gtzan", 3, 10, 10),
    ],
)
def test_the_demo_runs_at_most_its_own_trials_and_real_data_the_familys(
    source, max_trials, n_trials, expected
):
    params = read_params(Path(__file__).resolve().parents[2] / "params.yaml")
    params["data"].update(source=source, local_dir="clips")
    params["train"]["demo_max_trials"] = max_trials
    params["train"]["knn"]["n_trials"] = n_trials
    study = StudySettings.of(validate_settings(params), "knn")
    assert study.tuning.n_trials == expected
    assert params["train"]["knn"]["n_trials"] == n_trials  # the settings themselves unchanged


@pytest.mark.parametrize(
    ("source", "max_epochs", "epochs", "expected"),
    [
        ("demo", 20, 100, 20),  # the demo's own budget
        ("demo", 20, 8, 8),  # fewer epochs in the family's space stay
        (
            "demo",
            20,
            {"type": "int", "low": 10, "high": 50},
            {"type": "int", "low": 10, "high": 20},
        ),
        (
            "demo",
            20,
            {"type": "int", "low": 30, "high": 50},
            {"type": "int", "low": 20, "high": 20},
        ),
        ("demo", None, 100, 100),  # no demo budget: the family's
        ("local", 20, 100, 100),  # real data: the family's budget, whatever the demo's
    ],
)
def test_the_demo_trains_at_most_its_own_epochs_and_real_data_the_familys(
    source, max_epochs, epochs, expected
):
    params = read_params(Path(__file__).resolve().parents[2] / "params.yaml")
    params["data"].update(source=source, local_dir="clips")
    params["train"]["demo_max_epochs"] = max_epochs
    params["train"]["fnn_simple"]["space"]["epochs"] = epochs
    study = StudySettings.of(validate_settings(params), "fnn_simple")
    written = study.tuning.model_dump(mode="python", exclude_unset=True)
    assert written["space"]["epochs"] == expected  # what the study's name is made of
    assert params["train"]["fnn_simple"]["space"]["epochs"] == epochs  # the settings unchanged
    knn = StudySettings.of(validate_settings(params), "knn")  # a family without epochs
    assert knn.tuning.space == validate_settings(params).train.knn.space
