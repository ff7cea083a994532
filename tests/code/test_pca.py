"""The PCA stage: plot data, PNG and explained variance from a synthetic clip table."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow_helpers import sqlite_store
from project_params import project_params

from gtzan_mlops.features.handcrafted import FEATURE_NAMES
from gtzan_mlops.features.projection import project
from gtzan_mlops.stages import pca

GENRES = ["blues", "classical", "metal"]


def _synthetic_clip_table(clips_per_genre: int = 5) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for index, genre in enumerate(GENRES):
        for clip in range(clips_per_genre):
            values = rng.normal(loc=5.0 * index, scale=1.0, size=len(FEATURE_NAMES))
            rows.append(
                {
                    "track_id": f"{genre}.{clip:05d}",
                    "genre": genre,
                    "length": 661794,
                    **dict(zip(FEATURE_NAMES, values, strict=True)),
                }
            )
    return pd.DataFrame(rows)


def test_pca_stage_writes_plot_data_png_and_summary(tmp_path):
    table = tmp_path / "data/features/features_30_sec.csv"
    table.parent.mkdir(parents=True)
    _synthetic_clip_table().to_csv(table, index=False)
    params = project_params({"genres": GENRES, "features.n_mfcc": 20, "pca.seed": 0})
    with sqlite_store(tmp_path / "store"):
        summary = pca.run(params, tmp_path)
        # The same scatter is an artifact of a `pca` run beside the training runs.
        runs = mlflow.search_runs(
            search_all_experiments=True, filter_string="tags.`gtzan.stage` = 'pca'"
        )
        assert len(runs) == 1
        artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(runs.run_id[0])}
        assert artifacts == {"pca_30_sec.png", "pca_30_sec.csv"}

    points = pd.read_csv(tmp_path / "reports/pca/pca_30_sec.csv")
    assert points.columns.tolist() == ["track_id", "genre", "pc1", "pc2"]
    assert len(points) == 15
    # Genres drawn 5 standard deviations apart must separate along the first component.
    centroids = points.groupby("genre")["pc1"].mean()
    assert abs(centroids["blues"] - centroids["metal"]) > 10
    assert summary["explained_variance_ratio"][0] > 0.5
    assert json.loads((tmp_path / "reports/pca/pca_30_sec.json").read_text()) == summary
    assert (tmp_path / "reports/pca/pca_30_sec.png").read_bytes()[:4] == b"\x89PNG"


def test_pca_needs_two_clips():
    with pytest.raises(ValueError, match="at least 2 clips"):
        project(_synthetic_clip_table().head(1), n_mfcc=20, seed=0)
