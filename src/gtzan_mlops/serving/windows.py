"""Whole songs: which excerpts of a song are analysed, and the genre probabilities of each.

A song is cut into excerpts of `clip_seconds` (GTZAN's 30 s clips), each turned into features
exactly as the pipeline does a clip (`feature_sets.extract_sets`, the function the pipeline
trained on, so serving cannot drift from training); a segment-level model classifies every
segment, a clip-level one every excerpt, and the served answer is their mean. Beyond
`max_segments` segments, evenly spaced excerpts cover the song instead of all of them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gtzan_mlops.features import feature_sets, handcrafted
from gtzan_mlops.features.handcrafted import FeatureError, segment_bounds
from gtzan_mlops.features.musicnn import MusicnnError
from gtzan_mlops.serving.limits import RequestTimeout
from gtzan_mlops.serving.spec import GENRE_COLUMN, ServingSpec
from gtzan_mlops.settings.schema import FeatureSettings


@dataclass(frozen=True)
class SegmentResult:
    """One analysed stretch of a song: a segment (segment-level model) or an excerpt."""

    start_s: float
    end_s: float
    probabilities: np.ndarray  # (n_classes,)


def song_windows(
    n_samples: int, file_rate: int, settings: FeatureSettings, level: str, max_segments: int
) -> list[tuple[int, int]]:
    """Sample ranges (at `file_rate`) of the excerpts of a song that are classified.

    Back to back `clip_seconds` excerpts cover the song, each processed as the pipeline
    processes a clip. A tail shorter than one segment belongs to the excerpt before it (so a
    30.01 s GTZAN clip is one excerpt, as in the pipeline); a longer tail is an excerpt of its
    own, for a clip-level model one ending at the song's end (overlapping its neighbour, as the
    last segment of a clip does). When the excerpts hold more than `max_segments` segments,
    `max_segments // segments per clip` excerpts evenly spaced over the song are classified."""
    window = round(settings.clip_seconds * file_rate)
    segment = round(settings.segment_seconds * file_rate)
    starts = list(range(0, n_samples, window))
    if len(starts) > 1 and n_samples - starts[-1] < segment:
        starts.pop()
    windows = [(start, min(start + window, n_samples)) for start in starts]
    windows[-1] = (windows[-1][0], n_samples)
    if level == "clip" and len(windows) > 1:
        windows[-1] = (n_samples - window, n_samples)
    most = max(1, max_segments // handcrafted.max_segments(settings))
    if len(windows) > most:
        spaced = np.linspace(0, n_samples - window, most).round().astype(int)
        windows = [(int(start), int(start) + window) for start in spaced]
    return windows


def classify_song(
    classifier: Any,
    spec: ServingSpec,
    waveform: np.ndarray,
    file_rate: int,
    max_segments: int,
    musicnn_weights: Path | None,
    musicnn_batch_size: int,
    deadline: float | None,
) -> list[SegmentResult]:
    """The probabilities of every analysed segment (or excerpt) of one mono song at
    `file_rate`, in time order (see song_windows). A model on musicnn embeddings needs
    `musicnn_weights`, run `musicnn_batch_size` patches at a time. Past `deadline`
    (time.monotonic(); None: no deadline) it stops with RequestTimeout."""
    settings = spec.settings
    bases = feature_sets.base_sets(spec.feature_set)
    if feature_sets.MUSICNN in bases and musicnn_weights is None:
        raise MusicnnError(f"a model on the {spec.feature_set} feature set needs musicnn weights")
    columns = feature_sets.columns(spec.feature_set, settings.n_mfcc)
    results: list[SegmentResult] = []
    for begin, end in song_windows(len(waveform), file_rate, settings, spec.level, max_segments):
        if deadline is not None and time.monotonic() > deadline:
            raise RequestTimeout("the song took longer than the server's request timeout")
        extracted = feature_sets.extract_sets(
            waveform[begin:end],
            file_rate,
            settings,
            musicnn_weights if feature_sets.MUSICNN in bases else None,
            include_clip=spec.level == "clip",
            handcrafted=feature_sets.HANDCRAFTED in bases,
            batch_size=musicnn_batch_size,
        )
        offset = begin / file_rate
        if spec.level == "segment":
            rows = extracted.segment_rows(spec.feature_set)
            spans = [
                (offset + start / settings.sample_rate, offset + stop / settings.sample_rate)
                for start, stop in segment_bounds(extracted.length, settings)
            ]
        else:
            rows = extracted.clip_row(spec.feature_set)[np.newaxis, :]
            spans = [(offset, end / file_rate)]
        if len(rows) == 0:
            continue
        probabilities = np.asarray(
            classifier.predict_proba(pd.DataFrame(rows, columns=columns)), dtype=np.float64
        )
        if probabilities.shape != (len(rows), len(spec.classes)):
            raise RuntimeError(
                f"the classifier returned probabilities of shape {probabilities.shape}, "
                f"expected ({len(rows)}, {len(spec.classes)})"
            )
        results += [SegmentResult(a, b, p) for (a, b), p in zip(spans, probabilities, strict=True)]
    if not results:
        raise FeatureError("no complete segment to classify")
    return results


def timeline_records(song: list[SegmentResult], classes: tuple[str, ...]) -> list[dict[str, Any]]:
    """The JSON of a song's timeline: per segment its span, genre and probabilities."""
    return [
        {
            "start_s": round(segment.start_s, 3),
            "end_s": round(segment.end_s, 3),
            GENRE_COLUMN: classes[int(segment.probabilities.argmax())],
            "probabilities": dict(zip(classes, segment.probabilities.tolist(), strict=True)),
        }
        for segment in song
    ]
