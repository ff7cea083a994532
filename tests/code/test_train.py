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
from live_services import small_project

from gtzan_mlops import tracking
from gtzan_mlops.evaluation.scoring import METRICS
from gtzan_mlops.features import feature_sets
from gtzan_mlops.features.handcrafted import FEATURE_NAMES
from gtzan_mlops.models import zoo
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
    more = train.run(
        train.with_options(params, "naive_bayes", n_trials=3, workers=0), project, "naive_bayes"
    )
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
    """`--workers 2`: two processes write trials to one journal file and one MLflow store at
    once; every trial is recorded exactly once in Optuna and once in MLflow."""
    for name in ("MLFLOW_TRACKING_URI", "OPTUNA_STORAGE", "DVC_ROOT"):
        monkeypatch.delenv(name, raising=False)
    folder = make_project(tmp_path / "parallel", repo_root, n_trials=10)
    params = load_settings(folder / "params.yaml")
    record = train.run(train.with_options(params, "knn", n_trials=0, workers=2), folder, "knn")

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
