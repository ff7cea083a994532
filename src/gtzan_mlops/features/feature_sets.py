"""The feature sets a model can train on, their tables, and the one function that computes them.

- `handcrafted`: the 57 features of the GTZAN feature table (features.py), at 22,050 Hz;
- `musicnn`: the 200-dimensional MSD_musicnn embedding (musicnn.py), at 16 kHz;
- `both`: the two side by side.

Both are computed per 3 s segment with the same segment bounds, so a segment's row in either
table describes the same audio. The features stage writes the tables through `extract_sets`;
the served model calls the same function, from the same decoded audio.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import ValidationError

from gtzan_mlops.data.audio import resample
from gtzan_mlops.features.handcrafted import (
    ClipFeatures,
    extract_clip,
    feature_names,
    normalise_loudness,
    segment_bounds,
)
from gtzan_mlops.settings.loading import resolve_path
from gtzan_mlops.settings.schema import FeatureSettings, Settings

HANDCRAFTED = "handcrafted"
MUSICNN = "musicnn"
BOTH = "both"
FEATURE_SETS = (HANDCRAFTED, MUSICNN, BOTH)
LEVELS = ("clip", "segment")

# The tables of each base set in the features folder, per level.
TABLES = {
    HANDCRAFTED: {"clip": "features_30_sec.csv", "segment": "features_3_sec.csv"},
    MUSICNN: {"clip": "musicnn_30_sec.csv", "segment": "musicnn_3_sec.csv"},
}
SETTINGS_FILE = "settings.json"  # beside the tables: the settings and code that made them
TAGS_TABLE = "musicnn_tags_30_sec.csv"  # the clip's mean MSD tag probabilities: a readable check
KEY_COLUMNS = {"clip": ["track_id"], "segment": ["track_id", "segment"]}


@dataclass(frozen=True)
class ExtractionSettings:
    """What the features stage computes per clip: the feature settings, the MSD_musicnn
    checkpoint folder and the patches per forward pass. The stage always embeds; without
    weights (None, and no batch size) only the hand-crafted features are computed, to measure
    what the embeddings cost (benchmarks)."""

    features: FeatureSettings
    musicnn_weights: Path | None
    musicnn_batch_size: int | None

    @classmethod
    def of(cls, settings: Settings, root: Path) -> ExtractionSettings:
        """`features` and `resources.features.musicnn_batch_size`, the checkpoint folder of
        `features.musicnn.weights_dir` (the musicnn wheel's when null) checked for its files."""
        from gtzan_mlops.features.musicnn import weights_dir

        configured = settings.features.musicnn.weights_dir
        return cls(
            features=settings.features,
            musicnn_weights=weights_dir(resolve_path(configured, root) if configured else None),
            musicnn_batch_size=settings.resources.features.musicnn_batch_size,
        )


class FeatureSetError(ValueError):
    """An unknown feature set, or tables that do not fit together."""


def check_feature_set(name: str) -> str:
    if name not in FEATURE_SETS:
        raise FeatureSetError(f"unknown feature set {name!r}; known: {', '.join(FEATURE_SETS)}")
    return name


def base_sets(feature_set: str) -> tuple[str, ...]:
    """The computed sets a feature set is made of: `both` is handcrafted then musicnn."""
    check_feature_set(feature_set)
    return (HANDCRAFTED, MUSICNN) if feature_set == BOTH else (feature_set,)


def uses_musicnn(feature_set: str) -> bool:
    return MUSICNN in base_sets(feature_set)


def columns(feature_set: str, n_mfcc: int) -> list[str]:
    """The model input columns of a feature set, in order."""
    from gtzan_mlops.features.musicnn import EMBEDDING_NAMES

    names: list[str] = []
    for base in base_sets(feature_set):
        names += list(feature_names(n_mfcc)) if base == HANDCRAFTED else list(EMBEDDING_NAMES)
    return names


def write_settings(
    folder: Path,
    features: FeatureSettings,
    musicnn_weights_sha256: str | None = None,
    code: dict[str, str] | None = None,
) -> None:
    """Record beside the tables what made them: the feature settings, the musicnn checkpoint
    (sha256 of its files) and the extraction code, so that the stages reading the tables use
    those settings rather than params that may have changed since (see `made_with`)."""
    record = {
        "features": features.to_dict(),
        "musicnn_weights_sha256": musicnn_weights_sha256,
        "code": code or {},
    }
    (folder / SETTINGS_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def made_with(
    folder: Path, expected: FeatureSettings, musicnn_weights_sha256: str | None = None
) -> FeatureSettings:
    """The feature settings the tables in `folder` were made with, if they are the ones asked for
    (`expected`, from params; and, when given, the musicnn checkpoint); else FeatureSetError
    naming each difference. A run with `--set features.sample_rate=...` outside DVC cannot train
    or serve on tables made with other settings while its record claims otherwise."""
    path = folder / SETTINGS_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        features = record["features"]
        if not isinstance(features, dict):
            raise TypeError(f"features is a {type(features).__name__}, not a mapping")
        # Tables made before a setting existed came from older code: they are remade.
        missing = [name for name in FeatureSettings.model_fields if name not in features]
        if missing:
            raise FeatureSetError(
                f"{path}: the feature tables were made before the feature settings "
                f"{', '.join(missing)} existed; rerun the features stage (dvc repro)"
            )
        recorded = FeatureSettings.model_validate(features)
    except FileNotFoundError:
        raise FeatureSetError(
            f"{path}: no record of the settings the feature tables were made with (rerun the "
            "features stage)"
        ) from None
    except (json.JSONDecodeError, KeyError, TypeError, ValidationError) as error:
        raise FeatureSetError(f"{path}: not a features settings record ({error})") from None
    made, asked = recorded.to_dict(), expected.to_dict()
    differing = {key: (made[key], asked[key]) for key in made if made[key] != asked[key]}
    weights = record.get("musicnn_weights_sha256")
    if musicnn_weights_sha256 and weights and weights != musicnn_weights_sha256:
        differing["musicnn weights (sha256)"] = (weights[:12], musicnn_weights_sha256[:12])
    if differing:
        shown = ", ".join(f"{key} {a} (tables) vs {b} (asked)" for key, (a, b) in differing.items())
        raise FeatureSetError(
            f"{path}: the feature tables were made with other settings than asked for: "
            f"{shown}; rerun the features stage (dvc repro)"
        )
    return recorded


def table_paths(folder: Path, feature_set: str, level: str) -> list[Path]:
    """The table(s) of a feature set at a level (clip or segment)."""
    if level not in LEVELS:
        raise FeatureSetError(f"level must be one of {LEVELS}, got {level!r}")
    return [folder / TABLES[base][level] for base in base_sets(feature_set)]


def read_table(folder: Path, feature_set: str, level: str) -> pd.DataFrame:
    """The rows of a feature set at a level: for `both`, the two tables joined on the clip (and
    segment); a row missing from either table is an error, not silently dropped."""
    frames = []
    for path in table_paths(folder, feature_set, level):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file (run the features stage)")
        frames.append(pd.read_csv(path, dtype={"track_id": str}))
    table = frames[0]
    keys = KEY_COLUMNS[level]
    for other in frames[1:]:
        extra = [name for name in other.columns if name not in table.columns]
        ours, theirs = table.set_index(keys), other.set_index(keys)
        unmatched = ours.index.symmetric_difference(theirs.index)
        if len(unmatched):
            shown = ", ".join(str(key) for key in unmatched[:5])
            raise FeatureSetError(
                f"the {feature_set} tables in {folder} do not hold the same {level} rows "
                f"(e.g. {shown}): rerun the features stage"
            )
        joined = pd.concat([ours, theirs.loc[ours.index, extra]], axis=1).copy()  # one block
        table = joined.reset_index()
    return table


@dataclass(frozen=True)
class ExtractedSets:
    """Every computed feature set of one clip: whole clip and each segment, in order."""

    handcrafted: ClipFeatures
    length: int  # samples of the clip at the hand-crafted sample rate
    musicnn_segments: np.ndarray | None = None  # (n_segments, 200)
    musicnn_tags: np.ndarray | None = None  # (n_segments, 50) MSD tag probabilities

    def segment_rows(self, feature_set: str) -> np.ndarray:
        parts = [
            self.handcrafted.segments if base == HANDCRAFTED else self._musicnn()
            for base in base_sets(feature_set)
        ]
        return np.hstack(parts)

    def clip_row(self, feature_set: str) -> np.ndarray:
        """The clip's row: handcrafted features of the whole clip, musicnn's segment mean."""
        parts = [
            self.handcrafted.clip if base == HANDCRAFTED else self._musicnn().mean(axis=0)
            for base in base_sets(feature_set)
        ]
        return np.concatenate(parts)

    def _musicnn(self) -> np.ndarray:
        if self.musicnn_segments is None:
            raise FeatureSetError("musicnn embeddings were not computed for this clip")
        return self.musicnn_segments


def extract_sets(
    waveform: np.ndarray,
    file_rate: int,
    settings: FeatureSettings,
    musicnn_weights: Path | None,
    include_clip: bool = True,
    handcrafted: bool = True,
    *,
    batch_size: int | None,
) -> ExtractedSets:
    """The feature sets of one decoded clip (mono, at its own `file_rate`).

    The hand-crafted features see the clip resampled to `settings.sample_rate`; musicnn (when
    `musicnn_weights` is given) sees it resampled to 16 kHz, one patch per segment of the same
    bounds, `batch_size` patches at a time (None without weights). `handcrafted=False` skips the
    hand-crafted features where a model does not use them (the segment bounds are still those of
    the hand-crafted segmentation).

    Both see the clip after loudness normalisation (`features.normalise_loudness`, off when
    `settings.loudness_target_dbfs` is None), done here once for the training tables and for
    every excerpt of a served song alike, so a quieter copy of a song gets the same features.
    """
    # Before resampling: one gain for both sample rates, from the decoded clip as it is.
    waveform = normalise_loudness(waveform, file_rate, settings)
    samples = resample(waveform, file_rate, settings.sample_rate)
    if handcrafted:
        hand = extract_clip(samples, settings, include_clip=include_clip)
    else:
        from gtzan_mlops.features.handcrafted import check_waveform

        check_waveform(samples, settings)
        hand = ClipFeatures(np.empty(0), np.empty((0, 0)))
    if musicnn_weights is None:
        return ExtractedSets(hand, len(samples))
    if batch_size is None or batch_size < 1:
        raise ValueError(f"musicnn needs a batch size of at least 1, got {batch_size!r}")
    from gtzan_mlops.features import musicnn

    starts = [start / settings.sample_rate for start, _ in segment_bounds(len(samples), settings)]
    embedded = musicnn.embedder(musicnn_weights, batch_size).embed(
        resample(waveform, file_rate, musicnn.SAMPLE_RATE), starts
    )
    return ExtractedSets(hand, len(samples), embedded.embeddings, embedded.tags)


def tables_digest(folder: Path, feature_set: str, level: str) -> str:
    """sha256 of the table a model of this feature set reads (of the pair's digests for
    `both`): what training records and registry tags compare to tell stale data."""
    from gtzan_mlops.tracking import file_digest

    digests = [file_digest(path) for path in table_paths(folder, feature_set, level)]
    if len(digests) == 1:
        return digests[0]
    import hashlib

    return hashlib.sha256(" ".join(digests).encode()).hexdigest()


def model_key(family: str, feature_set: str) -> str:
    """The name of a family trained on a feature set: its stage, record and report name."""
    return f"{family}-{check_feature_set(feature_set)}"
