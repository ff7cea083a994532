"""95 % intervals for the reported scores: a cluster bootstrap over the split's units.

Rows are what was classified (songs, or 3 s segments); each row belongs to a unit (a song, or a
duplicate group or artist that the split keeps together). The rows of one unit are not
independent samples: the ten segments of one song share its sound, and copies of a recording or
an artist's songs were kept on one side of the split for that very reason. Resampling rows would
pretend to more evidence than there is and give intervals that are too narrow, so a resample
draws whole units with replacement (as many as there are units) and takes all rows of each
drawn unit, a unit drawn twice counting twice. The interval is the percentile interval of the
metric over the resamples; `value` is the metric on all rows.

Vectorised: one confusion matrix per unit, a matrix of multinomial draw counts, and the
resampled confusions are one matrix product, taken a chunk of resamples at a time.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from gtzan_mlops.settings.schema import Uncertainty

METRIC_NAMES = ("accuracy", "macro_f1")

# Resamples per matrix product, and the most count or confusion cells one chunk may hold, so
# memory stays bounded whatever n_resamples and the number of units are.
_CHUNK_RESAMPLES = 500
_CHUNK_CELLS = 1 << 22


@dataclass(frozen=True)
class Interval:
    """A metric's value on all rows and its bootstrap percentile interval."""

    value: float
    low: float
    high: float
    level: float
    n_units: int
    n_resamples: int

    def to_dict(self) -> dict[str, float | int]:
        return {
            "value": self.value,
            "low": self.low,
            "high": self.high,
            "level": self.level,
            "n_units": self.n_units,
            "n_resamples": self.n_resamples,
        }

    def describe(self, digits: int = 3) -> str:
        """`value [low, high]`, e.g. `0.850 [0.700, 0.950]`."""
        return f"{self.value:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def metric_interval(
    actual: Sequence[str],
    predicted: Sequence[str],
    units: Sequence[str],
    metric: str,
    settings: Uncertainty,
) -> Interval:
    """The metric of `predicted` against `actual` with its cluster-bootstrap interval."""
    values, resampled, n_units = _bootstrap(actual, (predicted,), units, metric, settings)
    return _interval(values[0], resampled[0], n_units, settings)


def difference_interval(
    actual: Sequence[str],
    predicted_a: Sequence[str],
    predicted_b: Sequence[str],
    units: Sequence[str],
    metric: str,
    settings: Uncertainty,
) -> Interval:
    """metric(a) - metric(b), paired: both are scored on the same resampled units each time, so
    what the two get right or wrong together cancels out of the interval."""
    values, resampled, n_units = _bootstrap(
        actual, (predicted_a, predicted_b), units, metric, settings
    )
    return _interval(values[0] - values[1], resampled[0] - resampled[1], n_units, settings)


def _interval(value: float, resampled: np.ndarray, n_units: int, settings: Uncertainty) -> Interval:
    tail = (1 - settings.level) / 2
    low, high = np.quantile(resampled, [tail, 1 - tail])
    return Interval(
        value=float(value),
        low=float(low),
        high=float(high),
        level=settings.level,
        n_units=n_units,
        n_resamples=settings.n_resamples,
    )


def _resampled_values(
    actual: Sequence[str],
    predicted: Sequence[str],
    units: Sequence[str],
    metric: str,
    settings: Uncertainty,
) -> np.ndarray:
    """The metric on each resample (for tests). Column j of the draw counts is the j-th unit in
    sorted order of the unit ids."""
    return _bootstrap(actual, (predicted,), units, metric, settings)[1][0]


def _bootstrap(
    actual: Sequence[str],
    predictions: tuple[Sequence[str], ...],
    units: Sequence[str],
    metric: str,
    settings: Uncertainty,
) -> tuple[list[float], np.ndarray, int]:
    """Each prediction's metric on all rows, its metric on each resample (one row per
    prediction, all on the same resamples) and the number of units."""
    if metric not in METRIC_NAMES:
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRIC_NAMES)}")
    actual_array = np.asarray(actual)
    prediction_arrays = [np.asarray(predicted) for predicted in predictions]
    unit_array = np.asarray(units)
    lengths = {
        "actual": len(actual_array),
        **{f"predicted #{i + 1}": len(p) for i, p in enumerate(prediction_arrays)},
        "units": len(unit_array),
    }
    if len(set(lengths.values())) > 1:
        raise ValueError(f"actual, predicted and units differ in length: {lengths}")
    if len(actual_array) == 0:
        raise ValueError("no rows to score: actual, predicted and units are empty")

    # One label index space for actual and every prediction, so a class that only one of them
    # names still has its row and column in the confusions.
    _, label_index = np.unique(
        np.concatenate([actual_array, *prediction_arrays]), return_inverse=True
    )
    label_index = label_index.reshape(1 + len(prediction_arrays), -1)
    n_labels = int(label_index.max()) + 1
    unit_ids, unit_index = np.unique(unit_array, return_inverse=True)
    n_units = len(unit_ids)

    cells = n_labels * n_labels
    # Per unit, the confusion (actual x predicted) flattened; float so that the resampling
    # product runs in BLAS (the counts stay exact integers far beyond any data set here).
    unit_confusions = [
        np.bincount(
            unit_index * cells + label_index[0] * n_labels + predicted_index,
            minlength=n_units * cells,
        )
        .reshape(n_units, cells)
        .astype(np.float64)
        for predicted_index in label_index[1:]
    ]
    values = [
        float(_metric(confusions.sum(axis=0, keepdims=True), n_labels, metric)[0])
        for confusions in unit_confusions
    ]

    resampled = np.empty((len(predictions), settings.n_resamples))
    start = 0
    for counts in _draw_counts(n_units, cells, settings):
        stop = start + len(counts)
        for row, confusions in enumerate(unit_confusions):
            resampled[row, start:stop] = _metric(counts @ confusions, n_labels, metric)
        start = stop
    return values, resampled, n_units


def _draw_counts(n_units: int, cells: int, settings: Uncertainty) -> Iterator[np.ndarray]:
    """How often each unit is drawn in each resample, a chunk of resamples at a time. Drawing in
    chunks gives the same counts as one draw of all resamples (the generator draws row by row),
    so the result does not depend on the chunk size."""
    rng = np.random.default_rng(settings.seed)
    chunk = max(1, min(_CHUNK_RESAMPLES, _CHUNK_CELLS // max(n_units, cells)))
    probabilities = [1 / n_units] * n_units
    for start in range(0, settings.n_resamples, chunk):
        size = min(chunk, settings.n_resamples - start)
        yield rng.multinomial(n_units, probabilities, size=size).astype(np.float64)


def _metric(confusions: np.ndarray, n_labels: int, metric: str) -> np.ndarray:
    """The metric of each flattened confusion (rows: resamples; actual x predicted)."""
    matrices = confusions.reshape(-1, n_labels, n_labels)
    correct = np.einsum("rkk->rk", matrices)
    if metric == "accuracy":
        return correct.sum(axis=1) / matrices.sum(axis=(1, 2))
    # Macro F1 as sklearn's f1_score(average="macro", zero_division=0): F1 = 2TP / (2TP + FP +
    # FN) = 2TP / (actual count + predicted count), averaged over the labels present in this
    # resample's actual or predicted rows (absent ones have a zero denominator).
    support = matrices.sum(axis=2) + matrices.sum(axis=1)
    present = support > 0
    f1 = np.divide(2 * correct, support, out=np.zeros_like(correct), where=present)
    return f1.sum(axis=1) / present.sum(axis=1)
