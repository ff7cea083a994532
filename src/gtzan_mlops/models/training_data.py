"""The rows a model family trains, validates and is tested on: the feature tables of one feature
set, divided by the active split (`paths.split`) at its level (whole clips, or 3 s segments voted
per song), checked against params (genres, feature settings), with what identifies them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gtzan_mlops.data.splits import (
    SUBSETS,
    load_split,
    split_fingerprint,
    split_label,
    unit_of_track,
)
from gtzan_mlops.evaluation.scoring import EvaluationError
from gtzan_mlops.evaluation.test_data import split_rows
from gtzan_mlops.features import feature_sets
from gtzan_mlops.settings.loading import ConfigError, resolve_path
from gtzan_mlops.settings.schema import Settings


@dataclass(frozen=True)
class TrainingData:
    """The rows of each subset at the split's level, and what identifies them."""

    level: str
    subsets: dict[str, pd.DataFrame]  # train / valid / test
    classes: list[str]
    feature_set: str
    columns: list[str]  # the model's input columns, in order
    summary: dict[str, Any]  # the split's summary.json
    features_sha256: str
    split_sha256: str
    feature_settings: dict[str, Any]  # FeatureSettings of the tables, stored with the model
    units: dict[str, str] = field(default_factory=dict)  # track -> the split's unit

    @property
    def label(self) -> str:
        return split_label(self.summary)

    @property
    def leaky(self) -> bool:
        return bool(self.summary.get("leaky", False))

    def xy(self, subset: str) -> tuple[pd.DataFrame, np.ndarray]:
        rows = self.subsets[subset]
        index = {genre: number for number, genre in enumerate(self.classes)}
        return rows[self.columns], rows["genre"].map(index).to_numpy()

    def train_and_valid(self) -> tuple[pd.DataFrame, np.ndarray]:
        train_x, train_y = self.xy("train")
        valid_x, valid_y = self.xy("valid")
        return pd.concat([train_x, valid_x], ignore_index=True), np.concatenate([train_y, valid_y])

    def train_and_valid_rows(self) -> pd.DataFrame:
        """The train then valid rows, in the order of `train_and_valid`."""
        return pd.concat([self.subsets["train"], self.subsets["valid"]], ignore_index=True)


def load_training_data(
    settings: Settings, root: Path, feature_set: str = feature_sets.HANDCRAFTED
) -> TrainingData:
    """The tables of `feature_set` (`paths.features`) divided by the split (`paths.split`); every
    genre must be one of params `genres`, every subset must hold rows, and the tables must have
    been made with params `features` (feature_sets.made_with)."""
    folder = resolve_path(settings.paths.split, root)
    assignments, summary = load_split(folder)
    level = summary["level"]
    features = resolve_path(settings.paths.features, root)
    path = features / feature_sets.TABLES[feature_sets.HANDCRAFTED][level]
    table = split_rows(features, assignments, feature_set, level)
    classes = list(settings.genres)
    unknown = sorted(set(table["genre"]) - set(classes))
    if unknown:
        raise ConfigError(f"{path}: genres {unknown} are not in params genres {classes}")
    subsets = {
        subset: table[table["subset"] == subset].reset_index(drop=True) for subset in SUBSETS
    }
    for subset, rows in subsets.items():
        if rows.empty:
            raise EvaluationError(f"the {split_label(summary)} split has no {subset} rows")
    return TrainingData(
        level=level,
        subsets=subsets,
        classes=classes,
        feature_set=feature_set,
        columns=feature_sets.columns(feature_set, settings.features.n_mfcc),
        summary=summary,
        features_sha256=feature_sets.tables_digest(features, feature_set, level),
        split_sha256=split_fingerprint(folder),
        # What made the tables, checked against what params ask for.
        feature_settings=feature_sets.made_with(features, settings.features).to_dict(),
        units=unit_of_track(assignments),
    )
