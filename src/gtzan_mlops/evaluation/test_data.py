"""The test rows a model is scored on: the active split's test subset of the feature tables the
models trained on, and the hashes that tie a score to those tables."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from gtzan_mlops.data.splits import (
    TEST_SUBSET,
    attach_subsets,
    load_split,
    split_fingerprint,
    unit_of_track,
)
from gtzan_mlops.evaluation.scoring import EvaluationError
from gtzan_mlops.features import feature_sets
from gtzan_mlops.settings.loading import resolve_path
from gtzan_mlops.settings.schema import Paths


def split_rows(
    features_dir: Path, assignments: pd.DataFrame, feature_set: str, level: str
) -> pd.DataFrame:
    """The feature table of `feature_set` at `level`, each row with its `subset` (empty for rows
    the split does not assign)."""
    try:
        table = feature_sets.read_table(features_dir, feature_set, level)
    except FileNotFoundError as error:
        raise EvaluationError(str(error)) from error
    return attach_subsets(table, assignments)


@dataclass
class TestData:
    """The test rows of the active split per (feature set, level), and the sha256 of the tables
    they come from. Read from `features_dir` when first asked for, unless given in `tables` and
    `digests` (in memory)."""

    summary: dict[str, Any]
    split_sha256: str
    tables: dict[tuple[str, str], pd.DataFrame] = field(default_factory=dict)
    digests: dict[tuple[str, str], str] = field(default_factory=dict)
    features_dir: Path | None = None
    assignments: pd.DataFrame | None = None

    @property
    def units(self) -> dict[str, str]:
        """track_id -> unit of the split (empty without assignments: each track its own)."""
        return {} if self.assignments is None else unit_of_track(self.assignments)

    def rows(self, level: str, feature_set: str = feature_sets.HANDCRAFTED) -> pd.DataFrame:
        key = (feature_set, level)
        if key not in self.tables:
            if self.features_dir is None or self.assignments is None:
                raise EvaluationError(f"no {feature_set} test rows at the {level} level")
            table = split_rows(self.features_dir, self.assignments, feature_set, level)
            self.tables[key] = table[table["subset"] == TEST_SUBSET].reset_index(drop=True)
        return self.tables[key]

    def features_sha256(self, level: str, feature_set: str = feature_sets.HANDCRAFTED) -> str:
        """sha256 of the table(s) a model of this feature set and level reads ("" if absent)."""
        key = (feature_set, level)
        if key not in self.digests:
            folder = self.features_dir
            paths = feature_sets.table_paths(folder, feature_set, level) if folder else []
            present = bool(paths) and all(path.is_file() for path in paths)
            digest = feature_sets.tables_digest(folder, feature_set, level) if present else ""
            self.digests[key] = digest
        return self.digests[key]


def load_test_data(paths: Paths, root: Path) -> TestData:
    """The test subset of the active split (`paths.split`), from the feature tables the models
    trained on (`paths.features`)."""
    folder = resolve_path(paths.split, root)
    assignments, summary = load_split(folder)
    return TestData(
        summary=summary,
        split_sha256=split_fingerprint(folder),
        features_dir=resolve_path(paths.features, root),
        assignments=assignments,
    )
