"""The features stage's tables, from the extracted clips: per feature set its clip and segment
tables (feature_sets.TABLES), the clips' mean MSD tag probabilities and the failures, each sorted
by track (and segment)."""

from __future__ import annotations

from typing import Any

import pandas as pd

from gtzan_mlops.features import feature_sets, musicnn
from gtzan_mlops.features.extraction import ClipResult
from gtzan_mlops.features.handcrafted import feature_names, segment_samples
from gtzan_mlops.settings.schema import FeatureSettings

CLIP_TABLE = feature_sets.TABLES[feature_sets.HANDCRAFTED]["clip"]
SEGMENT_TABLE = feature_sets.TABLES[feature_sets.HANDCRAFTED]["segment"]
FAILURES_TABLE = "failures.csv"


def build_tables(results: list[ClipResult], settings: FeatureSettings) -> dict[str, pd.DataFrame]:
    """Every table of the stage by file name: per feature set its clip and segment tables, the
    clip's mean MSD tag probabilities and the failures; sorted by track (and segment)."""
    hand_names = list(feature_names(settings.n_mfcc))
    rows: dict[str, list[dict[str, Any]]] = {
        name: [] for level in feature_sets.TABLES.values() for name in level.values()
    }
    tags: list[dict[str, Any]] = []
    failures: list[dict[str, str]] = []
    for result in sorted(results, key=lambda item: item.job.track_id):
        job, extracted = result.job, result.features
        if extracted is None:
            failures.append({"track_id": job.track_id, "path": job.label, "reason": result.error})
            continue
        clip_key = {"track_id": job.track_id, "genre": job.genre, "length": result.clip_length}
        for base, names in (
            (feature_sets.HANDCRAFTED, hand_names),
            (feature_sets.MUSICNN, list(musicnn.EMBEDDING_NAMES)),
        ):
            tables = feature_sets.TABLES[base]
            rows[tables["clip"]].append(
                {**clip_key, **dict(zip(names, extracted.clip_row(base), strict=True))}
            )
            for index, values in enumerate(extracted.segment_rows(base)):
                rows[tables["segment"]].append(
                    {
                        "track_id": job.track_id,
                        "segment": index,
                        "genre": job.genre,
                        "length": segment_samples(settings),
                        **dict(zip(names, values, strict=True)),
                    }
                )
        mean_tags = extracted.musicnn_tags.mean(axis=0)
        tags.append({**clip_key, **dict(zip(musicnn.MSD_TAGS, mean_tags, strict=True))})

    def frame(name: str, level: str, features: list[str]) -> pd.DataFrame:
        keys = feature_sets.KEY_COLUMNS[level]
        return pd.DataFrame(rows[name], columns=[*keys, "genre", "length", *features])

    tables: dict[str, pd.DataFrame] = {}
    for base, features in (
        (feature_sets.HANDCRAFTED, hand_names),
        (feature_sets.MUSICNN, list(musicnn.EMBEDDING_NAMES)),
    ):
        for level, name in feature_sets.TABLES[base].items():
            tables[name] = frame(name, level, features)
    tables[feature_sets.TAGS_TABLE] = pd.DataFrame(
        tags, columns=["track_id", "genre", "length", *musicnn.MSD_TAGS]
    )
    tables[FAILURES_TABLE] = pd.DataFrame(failures, columns=["track_id", "path", "reason"])
    return tables
