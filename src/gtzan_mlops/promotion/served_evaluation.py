"""Served models scored on raw audio: what promotion compares and what its gate checks.

Promotion never compares feature tables. Champion and challenger are both the pyfuncs that
`mlflow models serve` runs (raw audio in, one genre per song), so both are scored on the audio
files of the current test clips, song by song, exactly as a client meets them. A champion trained
on other data, another split or other features is therefore still compared on the same clips.
The same clips, transformed (quieter, later, resampled, re-encoded: behaviour.py), are what the
behavioural gate plays to the challenger.

The clips come from the duplicates stage's table (every usable clip with its path and the sha256
of its decoded samples) joined to the split's assignments: a clip is a test clip when all its
rows are in the test subset, a training clip when any row is in train or valid. The samples'
sha256 is the clip's identity across containers (GTZAN's .au and a .wav copy are one clip), so
it is what every registered version records of its training clips.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from gtzan_mlops.data.splits import TEST_SUBSET, load_split, unit_of_track
from gtzan_mlops.evaluation.scoring import EvaluationError
from gtzan_mlops.evaluation.uncertainty import Interval, difference_interval, metric_interval
from gtzan_mlops.promotion.behaviour import Transform, unchanged_fraction
from gtzan_mlops.promotion.behaviour import transforms as gate_transforms
from gtzan_mlops.promotion.rule import BehaviourResult, Comparison
from gtzan_mlops.settings.loading import resolve_path
from gtzan_mlops.settings.schema import Behaviour, Paths, Uncertainty

log = logging.getLogger(__name__)

TRAINING_SUBSETS = ("train", "valid")  # every clip a model's development saw
CLIPS_COLUMNS = ("track_id", "genre", "samples_sha256")  # of a version's training_clips.csv
REFUSED = None  # the genre of a clip the served model refused (counts as wrong and as changed)


@dataclass(frozen=True)
class Clip:
    """One audio file of the data set, as promotion uses it."""

    track_id: str
    genre: str
    path: Path
    unit: str  # what the split keeps on one side: the bootstrap resamples these
    samples_sha256: str


@dataclass(frozen=True)
class SplitClips:
    """The current split's clips: those wholly in test, and those that trained the models."""

    test: tuple[Clip, ...]
    training: pd.DataFrame  # CLIPS_COLUMNS, one row per clip of train or valid

    @property
    def training_digest(self) -> str:
        return clips_digest(self.training["samples_sha256"])


def clips_digest(hashes: Sequence[str] | pd.Series) -> str:
    """sha256 over the sorted, distinct samples' hashes of a set of clips: the same clips give
    the same digest whatever their order, names or containers."""
    joined = "\n".join(sorted(set(map(str, hashes))))
    return hashlib.sha256(joined.encode()).hexdigest()


def load_split_clips(paths: Paths, root: Path) -> SplitClips:
    """The test and training clips of the active split (`paths.split`), with their audio paths
    and hashes (the duplicates stage's table, `paths.duplicates`)."""
    table_path = resolve_path(paths.duplicates, root)
    try:
        table = pd.read_csv(table_path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise EvaluationError(f"{table_path}: no such file (run the duplicates stage)") from None
    missing = {"track_id", "genre", "path", "samples_sha256"} - set(table.columns)
    if missing:
        raise EvaluationError(f"{table_path}: lacks the columns {sorted(missing)}")
    assignments, _ = load_split(resolve_path(paths.split, root))
    subsets = assignments.groupby("track_id")["subset"].agg(lambda values: set(values))
    units = unit_of_track(assignments)
    table = table[table["track_id"].isin(subsets.index)]
    in_test = table["track_id"].map(lambda track: subsets[track] == {TEST_SUBSET})
    trained = table["track_id"].map(lambda track: bool(subsets[track] & set(TRAINING_SUBSETS)))
    test = tuple(
        Clip(
            track_id=row.track_id,
            genre=row.genre,
            path=resolve_path(row.path, root),
            unit=units.get(row.track_id, row.track_id),
            # A clip whose samples could not be hashed is still itself (by id) for leakage.
            samples_sha256=row.samples_sha256 or f"track:{row.track_id}",
        )
        for row in table[in_test].sort_values("track_id").itertuples()
    )
    training = table.loc[trained, list(CLIPS_COLUMNS)].sort_values("track_id")
    training["samples_sha256"] = [
        digest or f"track:{track}"
        for track, digest in zip(training["track_id"], training["samples_sha256"], strict=True)
    ]
    return SplitClips(test=test, training=training.reset_index(drop=True))


class ServedModel:
    """A loaded served pyfunc and the genre it answers for each clip, as a client would ask."""

    def __init__(self, model: Any, label: str) -> None:
        self.model = model
        self.label = label  # e.g. "challenger" or "champion version 3", for messages
        python_model = model.unwrap_python_model()
        self.classes = tuple(python_model.spec.classes)
        self.max_rows = int(python_model.limits.max_rows)

    def _request(self, payloads: Sequence[bytes]) -> list[str]:
        """The genres of one request of `payloads`, as a client would send them."""
        from gtzan_mlops.serving.spec import BASE64_COLUMN, GENRE_COLUMN

        encoded = [base64.b64encode(data).decode("ascii") for data in payloads]
        answer = self.model.predict(pd.DataFrame({BASE64_COLUMN: encoded}))
        return [str(genre) for genre in answer[GENRE_COLUMN]]

    def _answer(self, payloads: list[bytes], names: list[str]) -> list[str | None]:
        """One request per `max_rows` files; a refused row is answered None with a warning."""
        from mlflow.exceptions import MlflowException

        answers: list[str | None] = []
        for start in range(0, len(payloads), self.max_rows):
            batch = payloads[start : start + self.max_rows]
            try:
                answers += self._request(batch)
            except MlflowException:
                # One bad row fails the request: ask row by row to know which.
                for data, name in zip(batch, names[start : start + len(batch)], strict=True):
                    try:
                        answers += self._request([data])
                    except MlflowException as error:
                        log.warning("%s refused %s: %s", self.label, name, error.message)
                        answers.append(REFUSED)
        return answers

    def genres(
        self, clips: Sequence[Clip], progress: Callable[[int], None] | None = None
    ) -> list[str | None]:
        """The served genre of each clip's file, sent as it is."""
        answers: list[str | None] = []
        for start in range(0, len(clips), self.max_rows):
            batch = clips[start : start + self.max_rows]
            payloads = [_read(clip) for clip in batch]
            answers += self._answer(payloads, [clip.track_id for clip in batch])
            if progress:
                progress(len(batch))
        return answers

    def transformed_genres(
        self,
        clips: Sequence[Clip],
        transforms: Sequence[Transform],
        progress: Callable[[int], None] | None = None,
    ) -> dict[str, list[str | None]]:
        """Per transform, the served genre of each clip after it: every clip is decoded once and
        its transformed files are sent together (one clip's files in memory at a time)."""
        from gtzan_mlops.data.audio import decode_mono

        answers: dict[str, list[str | None]] = {transform.name: [] for transform in transforms}
        for clip in clips:
            samples, rate = decode_mono(clip.path)
            payloads = [transform.apply(samples, rate) for transform in transforms]
            names = [f"{clip.track_id} ({transform.name})" for transform in transforms]
            for transform, genre in zip(transforms, self._answer(payloads, names), strict=True):
                answers[transform.name].append(genre)
            if progress:
                progress(1)
        return answers


def _read(clip: Clip) -> bytes:
    try:
        return clip.path.read_bytes()
    except OSError as error:
        raise EvaluationError(
            f"{clip.path}: test clip {clip.track_id} unreadable ({error.strerror or error}); "
            "rerun the fetch stage"
        ) from None


# --- scores of the answers ------------------------------------------------------------------

SONG_METRICS = {"song_accuracy": "accuracy", "song_macro_f1": "macro_f1"}
REFUSED_LABEL = "<refused>"  # a clip the served model refused: wrong, whatever the genre


def _labels(genres: Sequence[str | None], refused: str = REFUSED_LABEL) -> list[str]:
    return [refused if genre is REFUSED else genre for genre in genres]


def served_scores(
    clips: SplitClips, genres: Sequence[str | None], bootstrap: Uncertainty
) -> dict[str, Interval]:
    """`test_song_accuracy` and `test_song_macro_f1` of one model's answers on the test clips,
    with their intervals over the clips' units."""
    actual = [clip.genre for clip in clips.test]
    units = [clip.unit for clip in clips.test]
    return {
        f"test_{name}": metric_interval(actual, _labels(genres), units, metric, bootstrap)
        for name, metric in SONG_METRICS.items()
    }


def compare(
    clips: SplitClips,
    challenger: Sequence[str | None],
    champion: Sequence[str | None],
    champion_version: str,
    metric: str,
    bootstrap: Uncertainty,
) -> Comparison:
    """Challenger and champion on the same test clips by `metric` (a key of SONG_METRICS), and
    their paired difference."""
    actual = [clip.genre for clip in clips.test]
    units = [clip.unit for clip in clips.test]
    ours, theirs = _labels(challenger), _labels(champion)
    measure = SONG_METRICS[metric]
    return Comparison(
        metric=metric,
        champion_version=champion_version,
        challenger=metric_interval(actual, ours, units, measure, bootstrap),
        champion=metric_interval(actual, theirs, units, measure, bootstrap),
        difference=difference_interval(actual, ours, theirs, units, measure, bootstrap),
    )


def check_behaviour(
    challenger: ServedModel,
    clips: SplitClips,
    reference: Sequence[str | None],
    behaviour: Behaviour,
) -> BehaviourResult:
    """The share of test clips whose served genre each transform leaves as in `reference` (the
    answers to the clips as they are); a clip refused, before or after, counts as changed."""
    from tqdm import tqdm

    from gtzan_mlops.console import progress_off

    checked = gate_transforms(behaviour)
    with tqdm(
        total=len(clips.test), desc="behaviour", unit="clip", disable=progress_off(True)
    ) as bar:
        answers = challenger.transformed_genres(clips.test, checked, bar.update)
    before = _labels(reference)
    unchanged = {
        transform.name: unchanged_fraction(
            before, _labels(answers[transform.name], f"{REFUSED_LABEL} after")
        )
        for transform in checked
    }
    return BehaviourResult(
        behaviour.min_unchanged,
        unchanged,
        {transform.name: transform.description for transform in checked},
    )
