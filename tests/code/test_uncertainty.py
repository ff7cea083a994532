"""The cluster bootstrap of uncertainty: values as sklearn's, resamples as a naive loop, widths
as theory says, units resampled together, the paired difference, determinism and errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score

from gtzan_mlops.evaluation.uncertainty import (
    METRIC_NAMES,
    Interval,
    _resampled_values,
    difference_interval,
    metric_interval,
)
from gtzan_mlops.settings.loading import read_params, validate_settings
from gtzan_mlops.settings.schema import Uncertainty

GENRES = ["blues", "classical", "jazz", "metal", "pop"]
SETTINGS = Uncertainty(level=0.95, n_resamples=1000, seed=0)


def _sklearn(metric: str, actual, predicted) -> float:
    if metric == "accuracy":
        return accuracy_score(actual, predicted)
    return f1_score(actual, predicted, average="macro", zero_division=0)


def _songs(n: int, accuracy: float, seed: int = 0) -> tuple[list[str], list[str], list[str]]:
    """n songs, one row each, predicted right with probability `accuracy`, else a wrong genre."""
    rng = np.random.default_rng(seed)
    actual = rng.choice(GENRES, size=n)
    wrong = [GENRES[(GENRES.index(g) + rng.integers(1, len(GENRES))) % len(GENRES)] for g in actual]
    predicted = np.where(rng.random(n) < accuracy, actual, wrong)
    return list(actual), list(predicted), [f"song{i:05d}" for i in range(n)]


def _width(interval: Interval) -> float:
    return interval.high - interval.low


@pytest.mark.parametrize("metric", METRIC_NAMES)
def test_value_is_sklearns_metric_on_all_rows(metric):
    rng = np.random.default_rng(1)
    actual = list(rng.choice(GENRES[:3], size=300))
    # "pop" and "metal" appear only in predicted: they count in macro F1 with F1 = 0.
    predicted = list(rng.choice(GENRES, size=300))
    units = [f"song{i // 10}" for i in range(300)]
    interval = metric_interval(actual, predicted, units, metric, SETTINGS)
    assert interval.value == pytest.approx(_sklearn(metric, actual, predicted), abs=1e-12)
    assert interval.n_units == 30 and interval.n_resamples == SETTINGS.n_resamples
    assert interval.level == 0.95


@pytest.mark.parametrize("metric", METRIC_NAMES)
def test_resampled_values_are_a_naive_loop_over_the_drawn_units(metric):
    rng = np.random.default_rng(2)
    n_rows = 120
    actual = rng.choice(GENRES, size=n_rows)
    predicted = np.where(rng.random(n_rows) < 0.5, actual, rng.choice([*GENRES, "rock"], n_rows))
    # Units of unequal sizes, ids not in row order, so that the unit order matters.
    units = np.array([f"u{(i * 7) % 23:02d}" for i in range(n_rows)])
    # Labels that only one unit has, so that some resamples lack them: macro F1 then averages
    # over fewer labels, as sklearn does on those rows.
    actual[units == "u05"] = "disco"
    predicted[np.flatnonzero(units == "u11")[0]] = "country"
    # Fewer resamples than params.yaml may ask for (the schema's minimum is 100): a short loop.
    settings = Uncertainty.model_construct(level=0.9, n_resamples=20, seed=7)

    values = _resampled_values(list(actual), list(predicted), list(units), metric, settings)

    unit_ids = np.unique(units)
    counts = np.random.default_rng(settings.seed).multinomial(
        len(unit_ids), [1 / len(unit_ids)] * len(unit_ids), size=settings.n_resamples
    )
    expected = []
    for draw in counts:
        rows = np.concatenate(
            [
                np.flatnonzero(units == unit)
                for unit, n in zip(unit_ids, draw, strict=True)
                for _ in range(n)
            ]
        )
        expected.append(_sklearn(metric, actual[rows], predicted[rows]))
    assert values == pytest.approx(expected, abs=1e-12)
    assert len(set(np.round(values, 12))) > 5  # the resamples do differ
    rare = counts[:, list(unit_ids).index("u05")]
    assert (rare == 0).any() and (rare > 0).any()


def test_resamples_do_not_depend_on_the_chunk_size(monkeypatch):
    from gtzan_mlops.evaluation import uncertainty

    actual, predicted, units = _songs(50, 0.7)
    settings = Uncertainty(level=0.95, n_resamples=1234, seed=3)
    whole = _resampled_values(actual, predicted, units, "macro_f1", settings)
    monkeypatch.setattr(uncertainty, "_CHUNK_RESAMPLES", 100)
    assert np.array_equal(_resampled_values(actual, predicted, units, "macro_f1", settings), whole)


@pytest.mark.parametrize("metric", METRIC_NAMES)
def test_the_interval_contains_the_value_and_narrows_with_more_units(metric):
    few = metric_interval(*_songs(20, 0.8), metric, SETTINGS)
    many = metric_interval(*_songs(2000, 0.8), metric, SETTINGS)
    for interval in (few, many):
        assert interval.low <= interval.value <= interval.high
        assert interval.low < interval.high
    # The width shrinks as 1/sqrt(n): 100 times the units, about a tenth of the width.
    assert _width(few) > 5 * _width(many)


def test_width_for_independent_songs_is_the_normal_approximation():
    actual, predicted, units = _songs(1000, 0.8)
    settings = Uncertainty(level=0.95, n_resamples=2000, seed=0)
    interval = metric_interval(actual, predicted, units, "accuracy", settings)
    p = interval.value
    assert 0.75 < p < 0.85
    normal = 2 * 1.96 * math.sqrt(p * (1 - p) / 1000)
    assert _width(interval) == pytest.approx(normal, rel=0.2)


@pytest.mark.parametrize("metric", METRIC_NAMES)
def test_rows_of_one_unit_are_resampled_together(metric):
    actual, predicted, units = _songs(200, 0.75)
    single = metric_interval(actual, predicted, units, metric, SETTINGS)
    # Ten identical segments per song: as much evidence as one row per song, no more.
    repeat = [x for x in zip(actual, predicted, units, strict=True) for _ in range(10)]
    seg_actual, seg_predicted, seg_units = (list(column) for column in zip(*repeat, strict=True))
    clustered = metric_interval(seg_actual, seg_predicted, seg_units, metric, SETTINGS)
    assert clustered.value == pytest.approx(single.value, abs=1e-12)
    assert clustered.n_units == 200
    assert _width(clustered) == pytest.approx(_width(single), rel=1e-9)
    # Treating every segment as independent would claim about sqrt(10) times the precision.
    rows_as_units = [str(i) for i in range(len(seg_units))]
    naive = metric_interval(seg_actual, seg_predicted, rows_as_units, metric, SETTINGS)
    assert _width(clustered) > 2.5 * _width(naive)


def test_a_single_unit_has_no_spread():
    actual, predicted, _ = _songs(12, 0.6)
    interval = metric_interval(actual, predicted, ["song"] * 12, "macro_f1", SETTINGS)
    assert interval.low == interval.high == interval.value
    assert interval.n_units == 1


@pytest.mark.parametrize("metric", METRIC_NAMES)
def test_identical_predictions_differ_by_exactly_zero(metric):
    actual, predicted, units = _songs(100, 0.7)
    interval = difference_interval(actual, predicted, predicted, units, metric, SETTINGS)
    assert (interval.value, interval.low, interval.high) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize("metric", METRIC_NAMES)
def test_a_better_challenger_has_a_positive_paired_difference(metric):
    actual, champion, units = _songs(500, 0.7)
    # The challenger fixes one in eight of the champion's mistakes and breaks nothing.
    rng = np.random.default_rng(5)
    challenger = [
        a if c == a or rng.random() < 0.125 else c for a, c in zip(actual, champion, strict=True)
    ]
    assert sum(map(str.__eq__, challenger, actual)) > sum(map(str.__eq__, champion, actual))
    interval = difference_interval(actual, challenger, champion, units, metric, SETTINGS)
    assert interval.value == pytest.approx(
        _sklearn(metric, actual, challenger) - _sklearn(metric, actual, champion), abs=1e-12
    )
    assert interval.value > 0 and interval.low > 0
    # Unpaired, the two scores' own intervals overlap: pairing is what makes it significant.
    alone = metric_interval(actual, challenger, units, metric, SETTINGS)
    other = metric_interval(actual, champion, units, metric, SETTINGS)
    assert alone.low < other.high


def test_swapping_the_two_predictions_negates_the_difference():
    actual, a, units = _songs(300, 0.7, seed=1)
    _, b, _ = _songs(300, 0.72, seed=2)
    forward = difference_interval(actual, a, b, units, "macro_f1", SETTINGS)
    backward = difference_interval(actual, b, a, units, "macro_f1", SETTINGS)
    assert forward.value == -backward.value != 0
    assert forward.low == pytest.approx(-backward.high, abs=1e-12)
    assert forward.high == pytest.approx(-backward.low, abs=1e-12)
    assert forward.low < forward.high


def test_one_seed_gives_one_interval_and_another_seed_another():
    data = _songs(80, 0.7)
    first = metric_interval(*data, "macro_f1", SETTINGS)
    assert metric_interval(*data, "macro_f1", SETTINGS) == first
    other = Uncertainty(level=0.95, n_resamples=SETTINGS.n_resamples, seed=1)
    assert metric_interval(*data, "macro_f1", other) != first


def test_the_level_sets_the_width():
    data = _songs(200, 0.8)
    narrow = metric_interval(*data, "accuracy", Uncertainty(level=0.5, n_resamples=1000, seed=0))
    wide = metric_interval(*data, "accuracy", Uncertainty(level=0.99, n_resamples=1000, seed=0))
    assert _width(wide) > 2 * _width(narrow)


def test_to_dict_and_describe():
    interval = Interval(value=0.85, low=0.7, high=0.95, level=0.95, n_units=30, n_resamples=2000)
    assert interval.to_dict() == {
        "value": 0.85,
        "low": 0.7,
        "high": 0.95,
        "level": 0.95,
        "n_units": 30,
        "n_resamples": 2000,
    }
    assert interval.describe() == "0.850 [0.700, 0.950]"
    assert interval.describe(digits=1) == "0.8 [0.7, 0.9]"


def test_settings_from_params(repo_root):
    raw = read_params(repo_root / "params.yaml")
    raw["uncertainty"] = {"level": 0.9, "n_resamples": 500, "seed": 4}
    assert validate_settings(raw).uncertainty == Uncertainty(level=0.9, n_resamples=500, seed=4)


def test_inputs_of_different_lengths_are_refused():
    actual, predicted, units = _songs(10, 0.5)
    with pytest.raises(ValueError, match="differ in length"):
        metric_interval(actual, predicted[:-1], units, "accuracy", SETTINGS)
    with pytest.raises(ValueError, match="differ in length"):
        metric_interval(actual, predicted, units[:-1], "accuracy", SETTINGS)
    with pytest.raises(ValueError, match="differ in length"):
        difference_interval(actual, predicted, predicted[:-1], units, "accuracy", SETTINGS)


def test_no_rows_are_refused():
    with pytest.raises(ValueError, match="no rows"):
        metric_interval([], [], [], "accuracy", SETTINGS)


def test_an_unknown_metric_is_refused_naming_the_known_ones():
    actual, predicted, units = _songs(10, 0.5)
    with pytest.raises(ValueError, match=r"'f1'.*accuracy, macro_f1"):
        metric_interval(actual, predicted, units, "f1", SETTINGS)
    with pytest.raises(ValueError, match="unknown metric"):
        difference_interval(actual, predicted, predicted, units, "recall", SETTINGS)


@pytest.mark.parametrize("level", [0.0, 1.0, -0.5, 1.5])
def test_a_level_outside_zero_and_one_is_refused(level):
    with pytest.raises(ValueError, match="level"):
        Uncertainty(level=level, n_resamples=100, seed=0)


@pytest.mark.parametrize("n_resamples", [0, -3])
def test_fewer_than_one_resample_is_refused(n_resamples):
    with pytest.raises(ValueError, match="n_resamples"):
        Uncertainty(level=0.95, n_resamples=n_resamples, seed=0)
