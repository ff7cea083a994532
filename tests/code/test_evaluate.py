"""The evaluate stage on a tiny synthetic setup: scores with intervals, song-level votes, the
winner chosen by selection scores (never by the test set), DVC files."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from mlflow_helpers import (
    GENRES,
    SEGMENTS_PER_SONG,
    TEST_SONGS,
    fit_confusing,
    log_sklearn,
    sqlite_store,
    synthetic_test_data,
    training_record,
)

from gtzan_mlops.data.splits import split_label
from gtzan_mlops.evaluation.model_evaluation import key_metrics
from gtzan_mlops.evaluation.records import load_family_record
from gtzan_mlops.evaluation.scoring import (
    EvaluationError,
    score_classifier,
    song_probabilities,
)
from gtzan_mlops.evaluation.selection import choose_winner
from gtzan_mlops.features.handcrafted import FEATURE_NAMES
from gtzan_mlops.settings.schema import Selection, Uncertainty
from gtzan_mlops.stages.evaluate import evaluate_records

RULE = Selection(source="validation", metric="song_macro_f1", folds=5, seed=0)
BOOTSTRAP = Uncertainty(level=0.95, n_resamples=500, seed=0)


def _evaluate(records, data, candidates, output_dir, rule=RULE):
    return evaluate_records(records, data, candidates, rule, BOOTSTRAP, GENRES, output_dir)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Three families logged in a throwaway store: a good segment-level candidate, a worse
    clip-level candidate, and a non-candidate 'classic' model that is better than both. Their
    selection scores (what their studies recorded on validation data) are made up: the worse
    test candidate has the better selection score, so a winner chosen on the test set shows."""
    data, train = synthetic_test_data()
    with sqlite_store(tmp_path_factory.mktemp("evaluate-store")):
        models = {
            "fnn": (fit_confusing(train["segment"], 2), "segment", 0.70),
            "xgboost": (fit_confusing(train["clip"], 5), "clip", 0.75),
            "svm": (fit_confusing(train["segment"], 0), "segment", 0.99),
        }
        records = {
            family: training_record(family, log_sklearn(model, family), level, data, selection)
            for family, (model, level, selection) in models.items()
        }
        yield data, records, {family: model for family, (model, _, _) in models.items()}


def test_scores_every_model_and_the_selection_score_chooses(setup, tmp_path):
    data, records, _ = setup
    summary = _evaluate(
        {**records, "fnn_simple": None}, data, ["fnn", "fnn_simple", "xgboost"], tmp_path
    )
    written = json.loads((tmp_path / "evaluation.json").read_text())
    assert written == summary
    assert summary["split"] == "synthetic-by-track" and summary["leaky"] is False
    families = summary["families"]
    assert set(families) == {"fnn", "xgboost", "svm"}
    assert summary["skipped"] == {"fnn_simple": "no training record"}
    for name, scores in families.items():
        assert scores["split"] == "synthetic-by-track"
        assert scores["candidate"] is (name != "svm")
        for key in ("accuracy", "macro_f1", "song_accuracy", "song_macro_f1"):
            assert 0.0 <= scores[f"test_{key}"] <= 1.0
    # The classic model is the best, but not a candidate. fnn does better on the test set than
    # xgboost, but xgboost has the better selection score: the test set chooses nothing.
    assert families["svm"]["test_song_macro_f1"] > families["fnn"]["test_song_macro_f1"]
    assert families["fnn"]["test_song_macro_f1"] > families["xgboost"]["test_song_macro_f1"]
    assert summary["winner"] == "xgboost"
    assert summary["selection"] == "validation song_macro_f1"
    assert summary["winner_selection"]["value"] == pytest.approx(0.75)
    reported = summary["winner_test"]["test_song_macro_f1"]
    assert reported["value"] == families["xgboost"]["test_song_macro_f1"]
    # Every test score carries its interval, around the score, over the 20 test songs.
    for scores in families.values():
        for name, interval in scores["test_intervals"].items():
            assert interval["low"] <= scores[name] <= interval["high"], name
            assert interval["level"] == 0.95
        assert scores["test_intervals"]["test_song_accuracy"]["n_units"] == scores["test_songs"]
    fnn = families["fnn"]["test_intervals"]["test_song_accuracy"]
    assert 0 < fnn["high"] - fnn["low"] < 0.6  # 20 songs at 0.8: about +-0.18
    assert families["fnn"]["test_song_accuracy"] == pytest.approx(0.8)
    assert families["xgboost"]["test_accuracy"] == pytest.approx(0.5)

    songs = len(GENRES) * len(TEST_SONGS)
    assert families["fnn"]["test_items"] == songs * SEGMENTS_PER_SONG
    assert families["fnn"]["test_songs"] == songs
    # For a clip-level model a song is a clip: its song metrics are its clip metrics.
    assert families["xgboost"]["test_items"] == families["xgboost"]["test_songs"] == songs
    assert families["xgboost"]["test_song_accuracy"] == families["xgboost"]["test_accuracy"]

    confusion = pd.read_csv(tmp_path / "confusion.csv")
    assert list(confusion.columns) == ["actual", "predicted"]
    assert len(confusion) == songs
    # The winner's (xgboost: 5 of 10 genres right).
    assert (confusion["actual"] == confusion["predicted"]).mean() == pytest.approx(0.5)
    table = pd.read_csv(tmp_path / "models.csv").set_index("model")
    assert set(table.index) == {"fnn", "xgboost", "svm"}
    assert (table["feature_set"] == "handcrafted").all()
    assert table.loc["fnn", "test_song_accuracy"] == pytest.approx(0.8)
    assert table.loc["fnn", "test_song_accuracy_low"] == pytest.approx(fnn["low"])
    assert table["winner"].tolist() == [name == "xgboost" for name in table.index]
    assert table.loc["xgboost", "selection_value"] == pytest.approx(0.75)
    assert (table["selection"] == "validation song_macro_f1").all()
    report = (tmp_path / "models.md").read_text()
    assert "chosen by **validation song_macro_f1** (never a test score)" in report
    assert "| **xgboost** (winner) | yes | 0.750 [0.650, 0.850] |" in report
    metrics = key_metrics(summary)
    assert metrics["winner"] == "xgboost" and metrics["selection"] == "validation song_macro_f1"
    assert set(metrics["winner_test_song_macro_f1"]) == {"value", "low", "high"}
    assert "winner_test_song_accuracy" not in metrics  # dvc exp show stays readable
    per_class = pd.read_csv(tmp_path / "per_class_f1.csv")
    assert list(per_class["genre"]) == GENRES
    assert per_class.set_index("genre").loc["rock", "f1"] == pytest.approx(1.0)


def test_song_votes_average_segment_probabilities(setup):
    data, _, models = setup
    model = models["fnn"]
    rows = data.rows("segment")
    evaluation = score_classifier(model, "segment", GENRES, list(FEATURE_NAMES), rows, family="fnn")
    probabilities = model.predict_proba(rows[list(FEATURE_NAMES)])
    by_song = pd.DataFrame(probabilities).groupby(rows["track_id"].to_numpy()).mean()
    expected = np.asarray(GENRES)[by_song.to_numpy().argmax(axis=1)]
    truth = rows.groupby("track_id")["genre"].first().loc[by_song.index]
    assert evaluation.metrics["test_song_accuracy"] == pytest.approx((expected == truth).mean())
    assert evaluation.song_predicted == list(expected)


def test_a_leaky_split_says_so_in_every_score(setup, tmp_path):
    _, records, _ = setup
    leaky, _ = synthetic_test_data(leaky=True)
    record = {**records["fnn"], "split": {"strategy": "random", "label": "random", "leaky": True}}
    summary = _evaluate({"fnn": record}, leaky, ["fnn"], tmp_path)
    assert summary["leaky"] is True
    assert summary["split"] == "random-leaky"
    assert summary["families"]["fnn"]["split"] == "random-leaky"


def test_records_of_other_data_are_skipped_with_the_reason(setup, tmp_path):
    data, records, _ = setup
    other_split = {**records["xgboost"], "split_sha256": "an-older-split"}
    other_features = {**records["fnn"], "features_sha256": "older-features"}
    summary = _evaluate(
        {"fnn": other_features, "xgboost": other_split, "svm": records["svm"]},
        data,
        ["fnn", "xgboost", "svm"],
        tmp_path,
    )
    assert summary["skipped"] == {
        "fnn": "trained on another version of the features",
        "xgboost": "trained on another split",
    }
    assert list(summary["families"]) == ["svm"]
    assert summary["winner"] == "svm"


def test_no_candidate_left_is_an_error(setup, tmp_path):
    data, records, _ = setup
    with pytest.raises(EvaluationError, match="none of the candidate models"):
        _evaluate({"svm": records["svm"]}, data, ["fnn"], tmp_path)


def test_a_selection_score_of_another_rule_or_none_is_refused(setup, tmp_path):
    data, records, _ = setup
    other = Selection(source="cross_validation", metric="song_macro_f1", folds=5, seed=0)
    with pytest.raises(EvaluationError, match="params ask for cross_validation song_macro_f1"):
        _evaluate({"fnn": records["fnn"]}, data, ["fnn"], tmp_path, rule=other)
    older = {key: value for key, value in records["fnn"].items() if key != "selection"}
    with pytest.raises(EvaluationError, match="no selection score"):
        _evaluate({"fnn": older}, data, ["fnn"], tmp_path)


def test_song_probabilities_are_means_per_sorted_track():
    tracks, means = song_probabilities(
        np.array(["b", "a", "b", "a"]), np.array([[1.0, 0.0], [0.2, 0.8], [0.0, 1.0], [0.4, 0.6]])
    )
    assert list(tracks) == ["a", "b"]
    np.testing.assert_allclose(means, [[0.3, 0.7], [0.5, 0.5]])


def test_winner_ties_go_to_the_earlier_candidate():
    scores = {
        name: {"selection": {"value": value}, "test_song_macro_f1": 1.0 - value}
        for name, value in {"a": 0.5, "b": 0.7, "c": 0.7, "d": 0.9}.items()
    }
    assert choose_winner(scores, ["c", "b", "a"]) == "c"
    assert choose_winner(scores, ["b", "c"]) == "b"
    # 0.8 computed two ways differs in the last bit: still a tie.
    scores["b"]["selection"]["value"], scores["c"]["selection"]["value"] = 0.8, 0.7 + 0.1
    assert 0.7 + 0.1 != 0.8
    assert choose_winner(scores, ["b", "c"]) == "b" and choose_winner(scores, ["c", "b"]) == "c"
    with pytest.raises(EvaluationError, match="no selection score"):
        choose_winner({"a": {}}, ["a"])


def test_split_label_and_settings_validation(tmp_path):
    assert split_label({"label": "artist-filtered", "leaky": False}) == "artist-filtered"
    assert split_label({"label": "random segments", "leaky": True}) == "random segments-leaky"
    assert split_label({"label": "leaky-random", "leaky": True}) == "leaky-random"
    path = tmp_path / "fnn.json"
    path.write_text(json.dumps({"family": "fnn", "level": "song"}))
    with pytest.raises(EvaluationError, match="missing flavor"):
        load_family_record(path)
    with pytest.raises(EvaluationError, match="no such file"):
        load_family_record(tmp_path / "absent.json")
