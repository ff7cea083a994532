"""Helpers for the tests of evaluation, promotion and serving: a throwaway MLflow store and
small classifiers to put in it."""

from __future__ import annotations

import atexit
import contextlib
import functools
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from gtzan_mlops.features.handcrafted import FEATURE_NAMES, REFERENCE_SETTINGS
from gtzan_mlops.serving.limits import read_served_config
from gtzan_mlops.serving.packaging import log_serving_model
from gtzan_mlops.serving.spec import ServingSpec
from gtzan_mlops.settings.loading import load_settings
from gtzan_mlops.settings.schema import ServedConfig

GENRES = ["blues", "classical", "country", "disco", "hiphop"]
GENRES += ["jazz", "metal", "pop", "reggae", "rock"]


@functools.cache
def _empty_store_template() -> Path:
    """An empty, fully migrated MLflow sqlite database, made once per test session: creating
    the schema takes seconds, copying the file does not."""
    folder = Path(tempfile.mkdtemp(prefix="mlflow-template-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    database = folder / "mlflow.db"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{database}").search_experiments()
    return database


@contextlib.contextmanager
def sqlite_store(folder: Path) -> Iterator[str]:
    """A fresh sqlite tracking store and registry in `folder`, active (also through the
    MLFLOW_TRACKING_URI variable, for code that resolves the URI itself) until the block ends."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_empty_store_template(), folder / "mlflow.db")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.delenv("MLFLOW_REGISTRY_URI", raising=False)
        mlflow.set_tracking_uri(uri)
        # Artifacts next to the database, never in the working directory's ./mlruns.
        experiment = mlflow.create_experiment(
            "tests", artifact_location=(folder / "artifacts").as_uri()
        )
        mlflow.set_experiment(experiment_id=experiment)
        try:
            yield uri
        finally:
            mlflow.set_tracking_uri(None)


def reference_classifier(reference_table: Path) -> Pipeline:
    """Logistic regression on the real 57-feature reference table (1000 GTZAN clips), labels as
    indices into GENRES: a small real classifier for real audio."""
    table = pd.read_csv(reference_table)
    labels = table["label"].map({genre: index for index, genre in enumerate(GENRES)})
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=300))
    return model.fit(table[list(FEATURE_NAMES)], labels.to_numpy())


def synthetic_features(
    n_per_genre: int, seed: int, separation: float = 3.0, genres: list[str] = GENRES
) -> pd.DataFrame:
    """Synthetic 57-feature rows: each genre's rows scatter around its own random centre."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(1234).normal(scale=separation, size=(len(genres), 57))
    rows, labels = [], []
    for index, genre in enumerate(genres):
        rows.append(centres[index] + rng.normal(size=(n_per_genre, 57)))
        labels += [genre] * n_per_genre
    frame = pd.DataFrame(np.vstack(rows), columns=list(FEATURE_NAMES))
    frame.insert(0, "genre", labels)
    return frame


def fit_synthetic(frame: pd.DataFrame, shuffle_seed: int | None = None) -> Pipeline:
    """A classifier of synthetic rows; with `shuffle_seed` it learns shuffled labels (a worse
    model). Labels are indices into GENRES, so probability columns follow GENRES."""
    labels = frame["genre"].map({genre: index for index, genre in enumerate(GENRES)}).to_numpy()
    if shuffle_seed is not None:
        labels = np.random.default_rng(shuffle_seed).permutation(labels)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=300))
    return model.fit(frame[list(FEATURE_NAMES)], labels)


def log_sklearn(model: Pipeline, name: str = "model") -> str:
    """Log a native sklearn model in its own run; returns its model URI."""
    with mlflow.start_run(run_name=f"native-{name}"):
        # Explicit requirements: inferring them would load the model in a subprocess (seconds).
        return mlflow.sklearn.log_model(
            model, name=name, pip_requirements=["scikit-learn"]
        ).model_uri


def serving_limits(**overrides) -> ServedConfig:
    """The project's served config (params.yaml), with `overrides` (checked)."""
    settings = load_settings(Path(__file__).resolve().parents[1] / "params.yaml")
    config = ServedConfig.of(settings.serving, settings.data)
    return read_served_config({**config.model_dump(), **overrides})


def log_served(
    classifier_uri: str,
    level: str = "segment",
    family: str = "logreg",
    input_example: bool = False,
    **limits,
) -> str:
    """Log the serving pyfunc around a native sklearn model, with the project's serving limits
    changed by `limits`; returns its model URI."""
    spec = ServingSpec(
        family=family,
        flavor="sklearn",
        level=level,
        classes=tuple(GENRES),
        feature_settings=REFERENCE_SETTINGS.to_dict(),
    )
    with mlflow.start_run(run_name=f"serving-{family}"):
        info = log_serving_model(
            spec, classifier_uri, serving_limits(**limits), input_example=input_example
        )
    return info.model_uri


# --- a tiny synthetic pipeline: features of songs and segments, a split, training records ------

SEGMENTS_PER_SONG = 3
SONGS_PER_GENRE = 6
TEST_SONGS = (4, 5)  # song indices of each genre in the test subset; the others train


def synthetic_tables(seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Synthetic clip and segment feature tables (track_id, [segment,] genre, 57 features):
    each song scatters around its genre's centre, each segment around its song."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=3.0, size=(len(GENRES), 57))
    clip_rows, segment_rows = [], []
    for index, genre in enumerate(GENRES):
        for song in range(SONGS_PER_GENRE):
            track = f"{genre}.{song:05d}"
            song_centre = centres[index] + rng.normal(scale=0.5, size=57)
            clip_rows.append({"track_id": track, "genre": genre, **_named(song_centre)})
            for segment in range(SEGMENTS_PER_SONG):
                values = song_centre + rng.normal(scale=0.5, size=57)
                segment_rows.append(
                    {"track_id": track, "segment": segment, "genre": genre, **_named(values)}
                )
    return pd.DataFrame(clip_rows), pd.DataFrame(segment_rows)


def _named(values: np.ndarray) -> dict[str, float]:
    return dict(zip(FEATURE_NAMES, values, strict=True))


def is_test_track(track_id: str) -> bool:
    return int(track_id.rsplit(".", 1)[1]) in TEST_SONGS


def synthetic_test_data(
    split_sha256: str = "split-v1", features: str = "features-v1", leaky: bool = False
):
    """TestData of the synthetic tables' test songs (what evaluation.test_data.load_test_data
    returns from real files), plus the training rows of each level."""
    from gtzan_mlops.evaluation.test_data import TestData

    clips, segments = synthetic_tables()
    test = {
        "clip": clips[clips["track_id"].map(is_test_track)].reset_index(drop=True),
        "segment": segments[segments["track_id"].map(is_test_track)].reset_index(drop=True),
    }
    train = {
        "clip": clips[~clips["track_id"].map(is_test_track)].reset_index(drop=True),
        "segment": segments[~segments["track_id"].map(is_test_track)].reset_index(drop=True),
    }
    summary = {
        "strategy": "random" if leaky else "by_track",
        "label": "random" if leaky else "synthetic-by-track",
        "leaky": leaky,
    }
    data = TestData(
        summary=summary,
        split_sha256=split_sha256,
        tables={("handcrafted", level): rows for level, rows in test.items()},
        digests={("handcrafted", level): f"{features}-{level}" for level in test},
    )
    return data, train


def fit_confusing(rows: pd.DataFrame, confused_genres: int) -> Pipeline:
    """A classifier that learned each of the first `confused_genres` genres under the name of
    another of them (a rotation, so all ten classes remain): on well separated data its
    accuracy is 1 - confused_genres / 10, which orders models by quality without chance."""
    labels = rows["genre"].map({genre: index for index, genre in enumerate(GENRES)}).to_numpy()
    if confused_genres:
        labels = np.where(labels < confused_genres, (labels + 1) % confused_genres, labels)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=300))
    return model.fit(rows[list(FEATURE_NAMES)], labels)


SELECTION = {"source": "validation", "metric": "song_macro_f1"}  # params selection


def training_record(
    family: str, model_uri: str, level: str, data, selection_value: float = 0.5
) -> dict:
    """What a training stage writes to data/train/<model>.json, for a synthetic model (named
    `family` here, on the hand-crafted features) whose selection score is `selection_value`."""
    settings = REFERENCE_SETTINGS.to_dict()
    settings.pop("last_segment_min_fraction")
    return {
        "model": family,
        "family": family,
        "feature_set": "handcrafted",
        "flavor": "sklearn",
        "run_id": None,
        "model_uri": model_uri,
        "experiment_id": None,
        "level": level,
        "split": {
            "strategy": data.summary["strategy"],
            "label": data.summary["label"],
            "leaky": data.summary["leaky"],
        },
        "features_sha256": data.features_sha256(level),
        "split_sha256": data.split_sha256,
        "feature_settings": settings,
        "classes": list(GENRES),
        "best_params": {},
        "n_trials": 1,
        "val_metrics": {},
        "test_metrics": {},
        "selection": {
            **SELECTION,
            "subset": "valid",
            "value": selection_value,
            "low": selection_value - 0.1,
            "high": selection_value + 0.1,
            "level": 0.95,
            "n_units": 10,
            "n_resamples": 200,
            "folds": None,
        },
    }
