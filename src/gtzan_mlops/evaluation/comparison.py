"""What each feature set is worth on its own: the same cross-validation folds for every row.

Clip-level vectors (the hand-crafted features of the whole clip, the mean musicnn embedding of
its segments, or both side by side) are classified by logistic regression and an RBF SVM, each
behind a scaler fitted inside every fold, on `RepeatedStratifiedKFold` folds shared by all
feature sets. Whole clips are split, so no song is on both sides; GTZAN's artists can be (the
folds are not artist-filtered), which the label `clip-kfold` says wherever it is reported.
Used by `gtzan-mlops report` and benchmarks/feature_sets.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from gtzan_mlops.features import feature_sets
from gtzan_mlops.reports import markdown
from gtzan_mlops.settings.schema import FeatureSetComparison

log = logging.getLogger(__name__)

SPLIT_LABEL = "clip-kfold"  # whole clips per fold; artists are not kept apart
CLASSIFIERS = ("logistic_regression", "svm_rbf")


class ComparisonError(ValueError):
    """Too few clips for the folds."""


def _classifier(name: str, seed: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    if name == "logistic_regression":
        model = LogisticRegression(max_iter=5000, random_state=seed)
    elif name == "svm_rbf":
        model = SVC(kernel="rbf", C=1.0, gamma="scale", random_state=seed)
    else:
        raise ValueError(f"unknown classifier {name!r}; known: {', '.join(CLASSIFIERS)}")
    return make_pipeline(StandardScaler(), model)


def compare_feature_sets(
    features_dir: Path,
    n_mfcc: int,
    settings: FeatureSetComparison,
    sets: tuple[str, ...] = feature_sets.FEATURE_SETS,
) -> pd.DataFrame:
    """One row per feature set and classifier: mean and sample std of the fold accuracies, on
    the folds of `settings` (params `report.feature_sets`: n_splits, n_repeats, seed).

    Every row is scored on the same folds of the same clips (sorted by track id)."""
    from sklearn.model_selection import RepeatedStratifiedKFold, cross_val_score

    tables = {
        name: feature_sets.read_table(features_dir, name, "clip")
        .sort_values("track_id")
        .reset_index(drop=True)
        for name in sets
    }
    first = next(iter(tables.values()))
    for name, table in tables.items():
        if not table["track_id"].equals(first["track_id"]):
            raise feature_sets.FeatureSetError(
                f"the {name} clip table in {features_dir} holds other clips than the others"
            )
    labels = first["genre"].to_numpy()
    fewest = first["genre"].value_counts()
    if fewest.min() < settings.n_splits:
        raise ComparisonError(
            f"{features_dir}: genre {fewest.idxmin()!r} has {fewest.min()} clips, fewer than "
            f"the {settings.n_splits} folds"
        )
    folds = list(
        RepeatedStratifiedKFold(
            n_splits=settings.n_splits, n_repeats=settings.n_repeats, random_state=settings.seed
        ).split(np.zeros(len(labels)), labels)
    )
    rows = []
    for name, table in tables.items():
        values = table[feature_sets.columns(name, n_mfcc)].to_numpy(dtype=np.float64)
        for classifier in CLASSIFIERS:
            scores = cross_val_score(
                _classifier(classifier, settings.seed), values, labels, cv=folds
            )
            rows.append(
                {
                    "feature_set": name,
                    "classifier": classifier,
                    "split": SPLIT_LABEL,
                    "clips": len(labels),
                    "folds": len(folds),
                    "mean_accuracy": float(np.mean(scores)),
                    "std_accuracy": float(np.std(scores, ddof=1)),
                }
            )
    return pd.DataFrame(rows)


def markdown_table(table: pd.DataFrame) -> list[str]:
    """Rows: feature sets; columns: classifiers; cells: mean ± std accuracy."""
    classifiers = list(dict.fromkeys(table["classifier"]))
    rows = []
    for name, scores in table.groupby("feature_set", sort=False):
        by = scores.set_index("classifier")
        rows.append(
            [name]
            + [
                f"{by.loc[c, 'mean_accuracy']:.3f} ± {by.loc[c, 'std_accuracy']:.3f}"
                for c in classifiers
            ]
        )
    return markdown.table(["feature set", *classifiers], rows)


def feature_set_section(
    features_dir: Path, shown_dir: str, n_mfcc: int, settings: FeatureSetComparison
) -> tuple[pd.DataFrame | None, list[str]]:
    """The comparison of the clip tables in `features_dir` (named `shown_dir` in the text) and
    its Markdown section of the reproduction report; where it cannot run (tables missing, fewer
    clips of a genre than folds), the section says why and no table is returned."""
    heading = ["## Feature sets: hand-crafted, musicnn, both", ""]
    try:
        table = compare_feature_sets(features_dir, n_mfcc, settings)
    except (FileNotFoundError, feature_sets.FeatureSetError, ComparisonError) as error:
        log.warning("skipping the feature-set comparison: %s", error)
        return None, [*heading, f"Skipped: {error}", ""]
    lines = [
        *heading,
        f"Clip-level vectors of `{shown_dir}` "
        f"({int(table['clips'].iloc[0])} clips): the 57 hand-crafted features of the whole clip, "
        "the mean MSD_musicnn embedding of its 3 s segments, or both side by side. Test "
        f"accuracy, mean ± std over the {int(table['folds'].iloc[0])} folds of "
        f"RepeatedStratifiedKFold(n_splits={settings.n_splits}, n_repeats={settings.n_repeats}, "
        f"random_state={settings.seed}), the same folds for every cell, the scaler fitted inside "
        f"each fold. Split `{SPLIT_LABEL}`: whole clips, so no song is on both "
        "sides, but artists are not kept apart.",
        "",
        *markdown_table(table),
        "",
    ]
    return table, lines
