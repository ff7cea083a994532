"""The feature-set comparison (comparison.py) and its place in the reproduction report."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from mlflow_helpers import GENRES
from project_params import project_params

from gtzan_mlops.evaluation import comparison
from gtzan_mlops.features import feature_sets, musicnn
from gtzan_mlops.features.handcrafted import FEATURE_NAMES
from gtzan_mlops.reports.reproduction import display_path
from gtzan_mlops.settings.loading import resolve_path
from gtzan_mlops.settings.schema import FeatureSetComparison

CLIPS_PER_GENRE = 7


def _write_tables(folder, informative: str, clips_per_genre: int = CLIPS_PER_GENRE) -> None:
    """Synthetic clip tables (generated here): the `informative` set separates the genres, the
    other is noise. Rows of the musicnn table are shuffled: the comparison must align them."""
    rng = np.random.default_rng(0)
    track_ids = [f"{g}.{i:05d}" for g in GENRES for i in range(clips_per_genre)]
    genres = [tid.split(".")[0] for tid in track_ids]
    labels = np.array([GENRES.index(g) for g in genres])
    for base, names in (
        (feature_sets.HANDCRAFTED, list(FEATURE_NAMES)),
        (feature_sets.MUSICNN, list(musicnn.EMBEDDING_NAMES)),
    ):
        values = rng.normal(size=(len(track_ids), len(names)))
        if base == informative:
            # Each genre shifts its own four columns: clear to both classifiers among 200.
            values[:, : 4 * len(GENRES)] += 4 * np.repeat(np.eye(len(GENRES))[labels], 4, axis=1)
        table = pd.DataFrame(values, columns=names)
        table.insert(0, "length", 661500)
        table.insert(0, "genre", genres)
        table.insert(0, "track_id", track_ids)
        if base == feature_sets.MUSICNN:
            table = table.sample(frac=1.0, random_state=1)
        table.to_csv(folder / feature_sets.TABLES[base]["clip"], index=False)


def _folds(n_splits: int, n_repeats: int, seed: int) -> FeatureSetComparison:
    return FeatureSetComparison(
        features_dir=None, n_splits=n_splits, n_repeats=n_repeats, seed=seed
    )


def test_every_feature_set_is_scored_on_the_same_folds(tmp_path):
    _write_tables(tmp_path, informative=feature_sets.MUSICNN)
    table = comparison.compare_feature_sets(tmp_path, 20, _folds(7, 1, 0))
    assert list(table["feature_set"]) == ["handcrafted"] * 2 + ["musicnn"] * 2 + ["both"] * 2
    assert (table["folds"] == 7).all() and (table["clips"] == 70).all()
    assert (table["split"] == "clip-kfold").all()
    scores = table.set_index(["feature_set", "classifier"])["mean_accuracy"]
    for classifier in comparison.CLASSIFIERS:
        assert scores[("handcrafted", classifier)] < 0.4  # noise: near chance
        assert scores[("musicnn", classifier)] > 0.9  # aligned by track id despite the shuffle
        assert scores[("both", classifier)] > 0.8
    lines = comparison.markdown_table(table)
    assert lines[0] == "| feature set | logistic_regression | svm_rbf |"
    assert len(lines) == 5


def test_too_few_clips_for_the_folds_is_a_clear_error(tmp_path):
    _write_tables(tmp_path, informative=feature_sets.HANDCRAFTED, clips_per_genre=3)
    with pytest.raises(comparison.ComparisonError, match="has 3 clips, fewer than the 7 folds"):
        comparison.compare_feature_sets(tmp_path, 20, _folds(7, 3, 0))


def test_report_section_says_why_it_was_skipped(tmp_path):
    params = project_params(
        {"report.families": ["knn"], "report.feature_sets.features_dir": str(tmp_path)}
    )
    folds = params.report.feature_sets
    features_dir = resolve_path(folds.features_dir, tmp_path)

    def feature_set_section():
        shown = display_path(features_dir, tmp_path)
        return comparison.feature_set_section(features_dir, shown, params.features.n_mfcc, folds)

    table, lines = feature_set_section()
    assert table is None
    assert lines[0] == "## Feature sets: hand-crafted, musicnn, both"
    assert "Skipped:" in lines[2] and "features_30_sec.csv: no such file" in lines[2]

    _write_tables(tmp_path, informative=feature_sets.HANDCRAFTED)
    table, lines = feature_set_section()
    assert len(table) == 6
    assert any("RepeatedStratifiedKFold(n_splits=7, n_repeats=3" in line for line in lines)
    assert "| both |" in "\n".join(lines)
