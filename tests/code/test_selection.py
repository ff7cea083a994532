"""Honest selection: scores with their rows and units, the validation and cross-validated
selection scores of the train stage, and the intervals beside every score it reports."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pandas as pd
import pytest
from live_services import small_project

from gtzan_mlops import tracking
from gtzan_mlops.evaluation import uncertainty
from gtzan_mlops.evaluation.scoring import (
    EvaluationError,
    FamilyEvaluation,
    score_classifier,
    score_intervals,
)
from gtzan_mlops.models.selection_score import best_configuration, cross_validate, selection_folds
from gtzan_mlops.models.study import StudySettings
from gtzan_mlops.models.training_data import load_training_data
from gtzan_mlops.models.trials import VALID_OUTCOMES_ATTR
from gtzan_mlops.settings.loading import ConfigError, read_params, validate_settings
from gtzan_mlops.settings.schema import Settings, Uncertainty
from gtzan_mlops.stages import train

SETTINGS = Uncertainty(level=0.95, n_resamples=500, seed=0)
FAMILIES = ["naive_bayes", "logistic_regression"]
SONGS_PER_GENRE = 6  # 2 test, 1 valid, 3 train: 40 train+valid songs


class ColumnClassifier:
    """Predicts genre b with the probability in column `p`: outcomes chosen by hand."""

    def predict_proba(self, rows: pd.DataFrame) -> np.ndarray:
        p = rows["p"].to_numpy()
        return np.column_stack([1 - p, p])


def clustered_table(n_songs: int = 20, segments: int = 5, wrong: int = 6) -> pd.DataFrame:
    """`n_songs` songs of two genres, `segments` rows each; the first `wrong` songs entirely
    misclassified, the others entirely right: the errors cluster by song."""
    rows = []
    for song in range(n_songs):
        genre = "ab"[song % 2]
        right = song >= wrong
        p = 0.9 if (genre == "b") == right else 0.1
        rows += [(f"t{song:02d}", genre, p)] * segments
    return pd.DataFrame(rows, columns=["track_id", "genre", "p"])


def test_score_intervals_are_aligned_with_tracks_and_resample_units():
    table = clustered_table().sample(frac=1.0, random_state=0).reset_index(drop=True)
    evaluation = score_classifier(ColumnClassifier(), "segment", ["a", "b"], ["p"], table, "hand")
    assert evaluation.row_tracks == table["track_id"].tolist()
    assert evaluation.song_tracks == sorted(table["track_id"].unique())
    assert evaluation.metrics["test_accuracy"] == evaluation.metrics["test_song_accuracy"] == 0.7

    intervals = score_intervals(evaluation, {}, SETTINGS)
    assert set(intervals) == {
        "test_accuracy",
        "test_macro_f1",
        "test_song_accuracy",
        "test_song_macro_f1",
    }
    for name, interval in intervals.items():
        assert interval["value"] == pytest.approx(evaluation.metrics[name])
        assert interval["low"] <= interval["value"] <= interval["high"]
        assert interval["n_units"] == 20 and interval["n_resamples"] == 500
    # Every song right or wrong as a whole, with as many rows each: resampling songs, the row
    # accuracy of each resample is its song accuracy, so the intervals coincide ...
    row, song = intervals["test_accuracy"], intervals["test_song_accuracy"]
    assert (row["low"], row["high"]) == pytest.approx((song["low"], song["high"]))
    # ... while resampling rows as if independent would claim five times the evidence.
    naive = uncertainty.metric_interval(
        evaluation.actual, evaluation.predicted, list(range(len(table))), "accuracy", SETTINGS
    )
    assert naive.high - naive.low < 0.7 * (row["high"] - row["low"])


def test_units_join_tracks_and_unknown_tracks_stand_alone():
    table = clustered_table()
    evaluation = score_classifier(
        ColumnClassifier(), "segment", ["a", "b"], ["p"], table, "hand", subset="valid"
    )
    # Two songs of one unit, the rest unnamed: 19 units.
    intervals = score_intervals(evaluation, {"t00": "g", "t01": "g"}, SETTINGS)
    assert set(intervals) == {
        "valid_accuracy",
        "valid_macro_f1",
        "valid_song_accuracy",
        "valid_song_macro_f1",
    }
    assert {interval["n_units"] for interval in intervals.values()} == {19}

    untracked = FamilyEvaluation("hand", "segment", {}, actual=["a"], predicted=["a"])
    with pytest.raises(EvaluationError, match="1 rows with 0 tracks"):
        score_intervals(untracked, {}, SETTINGS)


# --- the train stage ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def project(tmp_path_factory, repo_root):
    folder = small_project(
        tmp_path_factory.mktemp("selection") / "project",
        repo_root,
        FAMILIES,
        n_trials=2,
        songs_per_genre=SONGS_PER_GENRE,
        updates={"uncertainty.n_resamples": 500},
    )
    with pytest.MonkeyPatch.context() as patch:
        for name in ("MLFLOW_TRACKING_URI", "OPTUNA_STORAGE", "DVC_ROOT", "DVC_EXP_NAME"):
            patch.delenv(name, raising=False)
        yield folder
    mlflow.set_tracking_uri(None)


def _params(project: Path, **selection) -> Settings:
    raw = read_params(project / "params.yaml")
    raw["selection"].update(selection)
    return validate_settings(raw)


def test_validation_selection_is_the_best_trials_valid_score(project):
    params = _params(project, source="validation", metric="song_macro_f1")
    record = train.run(params, project, "naive_bayes")
    data = load_training_data(params, project)
    valid_songs = data.subsets["valid"]["track_id"].nunique()

    # All four validation metrics of the best trial; the objective is one of them.
    assert set(record["val_metrics"]) == {
        "valid_accuracy",
        "valid_macro_f1",
        "valid_song_accuracy",
        "valid_song_macro_f1",
    }
    study = optuna.load_study(
        study_name=record["study"], storage=tracking.optuna_storage("naive_bayes", project)
    )
    assert record["val_metrics"]["valid_accuracy"] == study.best_value  # train.objective
    stored = study.best_trial.user_attrs[VALID_OUTCOMES_ATTR]
    assert len(stored["song_tracks"]) == valid_songs
    assert len(stored["row_song"]) == len(stored["row_predicted"]) == len(data.subsets["valid"])

    selection = record["selection"]
    assert list(selection) == [
        "source",
        "metric",
        "subset",
        "value",
        "low",
        "high",
        "level",
        "n_units",
        "n_resamples",
        "folds",
    ]
    assert selection["source"] == "validation" and selection["subset"] == "valid"
    assert selection["metric"] == "song_macro_f1" and selection["folds"] is None
    assert selection["value"] == pytest.approx(record["val_metrics"]["valid_song_macro_f1"])
    assert selection["low"] <= selection["value"] <= selection["high"]
    assert selection["n_units"] == valid_songs
    assert (selection["level"], selection["n_resamples"]) == (0.95, 500)

    # The test scores carry their intervals, over the test songs.
    test_songs = data.subsets["test"]["track_id"].nunique()
    for name, interval in record["test_intervals"].items():
        assert interval["value"] == pytest.approx(record["test_metrics"][name])
        assert interval["n_units"] == test_songs
    metrics = json.loads(
        (project / "reports/train/naive_bayes-handcrafted/metrics.json").read_text()
    )
    assert metrics["selection_source"] == "validation"
    assert metrics["selection_song_macro_f1"] == selection["value"]
    assert metrics["selection_song_macro_f1_low"] == selection["low"]
    for name in record["test_intervals"]:
        assert metrics[f"{name}_low"] <= metrics[name] <= metrics[f"{name}_high"]
    logged = mlflow.get_run(record["run_id"]).data
    assert {"selection_song_macro_f1_high", "test_song_accuracy_low", "test_accuracy_high"} <= set(
        logged.metrics
    )
    assert logged.tags["selection.source"] == "validation"
    line = train.describe(record)
    assert "selection song_macro_f1 " in line and " (valid), test song accuracy " in line


def test_cross_validation_folds_keep_units_apart_and_pool_every_row_once(project):
    params = _params(project, source="cross_validation", folds=5)
    data = load_training_data(params, project)
    rows = data.train_and_valid_rows()
    # Pairs of songs of a genre as units (as duplicates or an artist would make them).
    tracks = rows.drop_duplicates("track_id").sort_values(["genre", "track_id"])
    units = {
        track: f"{genre}-{number // 2}"
        for genre, group in tracks.groupby("genre")
        for number, track in enumerate(group["track_id"])
    }
    folds = selection_folds(rows, units, 5, 0)
    assert len(folds) == 5 and all(len(fold) for fold in folds)
    np.testing.assert_array_equal(np.sort(np.concatenate(folds)), np.arange(len(rows)))
    fold_of_row = np.empty(len(rows), dtype=int)
    for number, fold in enumerate(folds):
        fold_of_row[fold] = number
    fold_of_unit = pd.Series(fold_of_row).groupby(rows["track_id"].map(units)).nunique()
    assert (fold_of_unit == 1).all()

    choice = params.selection
    settings = StudySettings.of(params, "logistic_regression")
    result = cross_validate(settings, data, {"C": 1.0, "max_iter": 500}, None, choice)
    pooled = np.sort(np.concatenate(result.folds))
    np.testing.assert_array_equal(pooled, np.arange(len(rows)))
    assert not np.isnan(result.probabilities).any()
    np.testing.assert_allclose(result.probabilities.sum(axis=1), 1.0)
    metrics = result.evaluation.metrics
    assert metrics["cv_items"] == len(rows) and metrics["cv_songs"] == rows["track_id"].nunique()
    assert result.evaluation.row_tracks == rows["track_id"].tolist()


def test_fewer_units_than_folds_is_a_clear_error_before_any_trial(project):
    params = _params(project, source="cross_validation", folds=41)
    rows = load_training_data(params, project).train_and_valid_rows()
    with pytest.raises(ConfigError, match=r"selection\.folds is 41 but train\+valid holds only 40"):
        selection_folds(rows, {}, 41, 0)
    journals = set((project / tracking.OPTUNA_DIR).glob("*"))
    with pytest.raises(ConfigError, match="holds only 40 units"):
        train.run(params, project, "svm")
    assert set((project / tracking.OPTUNA_DIR).glob("*")) == journals  # no study started


def test_cross_validation_selection_record(project):
    params = _params(project, source="cross_validation", folds=5, metric="song_accuracy")
    record = train.run(params, project, "logistic_regression")
    selection = record["selection"]
    assert selection["source"] == "cross_validation" and selection["folds"] == 5
    assert selection["subset"] == "train+valid, 5 folds" and selection["metric"] == "song_accuracy"
    data = load_training_data(params, project)
    assert selection["n_units"] == data.train_and_valid_rows()["track_id"].nunique() == 40
    assert selection["low"] <= selection["value"] <= selection["high"]
    # The same configuration cross-validated again gives the same pooled score.
    settings = StudySettings.of(params, "logistic_regression")
    study = optuna.load_study(
        study_name=record["study"], storage=tracking.optuna_storage("logistic_regression", project)
    )
    _, hyperparameters, budget = best_configuration(study, settings)
    choice = params.selection
    again = cross_validate(settings, data, hyperparameters, budget, choice)
    assert again.evaluation.metrics["cv_song_accuracy"] == selection["value"]
    logged = mlflow.get_run(record["run_id"]).data
    assert logged.metrics["selection_folds"] == 5
    assert logged.metrics["selection_song_accuracy"] == pytest.approx(selection["value"])
    assert "(train+valid, 5 folds)" in train.describe(record)
