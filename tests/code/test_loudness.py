"""Loudness normalisation: `features.normalise_loudness`, its place in `extract_sets`, and the
records that carry its settings (the features stage's settings.json, a served model's spec)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pydantic import ValidationError

from gtzan_mlops.features import feature_sets
from gtzan_mlops.features.clip_cache import settings_key
from gtzan_mlops.features.feature_sets import (
    ExtractionSettings,
    FeatureSetError,
    extract_sets,
    made_with,
)
from gtzan_mlops.features.handcrafted import FEATURE_NAMES, REFERENCE_SETTINGS, normalise_loudness
from gtzan_mlops.serving.spec import ServingSpec
from gtzan_mlops.settings.schema import FeatureSettings


def replace(settings: FeatureSettings, **changes) -> FeatureSettings:
    """`settings` with `changes`, validated as params.yaml's are."""
    return FeatureSettings.model_validate({**settings.to_dict(), **changes})


ON = replace(REFERENCE_SETTINGS, loudness_target_dbfs=-20.0, loudness_max_gain_db=40.0)
LOUDNESS_KEYS = ("loudness_target_dbfs", "loudness_max_gain_db")
RATE = 22050


def _dbfs(waveform: np.ndarray) -> float:
    return 20 * np.log10(np.sqrt(np.mean(np.square(waveform, dtype=np.float64))))


def _noise(level_dbfs: float, seconds: float = 1.0, rate: int = 22050) -> np.ndarray:
    """White noise at an RMS of exactly `level_dbfs`, float32."""
    noise = np.random.default_rng(0).standard_normal(round(seconds * rate))
    return (noise / np.sqrt(np.mean(noise**2)) * 10 ** (level_dbfs / 20)).astype(np.float32)


@pytest.mark.parametrize("level", [-55.0, -31.2, -20.0, -10.5, -3.0, 6.0])
def test_the_target_level_is_reached(level):
    normalised = normalise_loudness(_noise(level), RATE, ON)
    assert normalised.dtype == np.float32
    assert _dbfs(normalised) == pytest.approx(-20.0, abs=0.01)


def test_gain_is_capped_but_attenuation_is_not():
    quiet = _noise(-70.0)  # needs 50 dB to reach -20 dBFS: gets the 40 dB cap
    np.testing.assert_allclose(normalise_loudness(quiet, RATE, ON), quiet * 100.0, rtol=1e-6)
    assert _dbfs(normalise_loudness(quiet, RATE, ON)) == pytest.approx(-30.0, abs=0.01)
    no_gain = replace(ON, loudness_max_gain_db=0.0)
    np.testing.assert_array_equal(normalise_loudness(quiet, RATE, no_gain), quiet)
    assert _dbfs(normalise_loudness(_noise(-3.0), RATE, no_gain)) == pytest.approx(-20.0, abs=0.01)


def test_zeros_and_off_are_left_unchanged_and_the_input_is_not_modified():
    zeros = np.zeros(22050, dtype=np.float32)
    np.testing.assert_array_equal(normalise_loudness(zeros, RATE, ON), zeros)
    assert normalise_loudness(zeros[:0], RATE, ON).size == 0  # left to check_waveform: too short
    loud = _noise(-6.0).astype(np.float64)
    kept = loud.copy()
    assert normalise_loudness(loud, RATE, REFERENCE_SETTINGS) is loud  # off: not even converted
    assert normalise_loudness(loud, RATE, ON).dtype == np.float32
    np.testing.assert_array_equal(loud, kept)
    with_nan = _noise(-6.0)
    with_nan[10] = np.nan  # left for check_waveform to refuse with its own message
    assert np.isnan(normalise_loudness(with_nan, RATE, ON)[10])


def test_the_level_is_measured_on_the_part_the_features_describe():
    """A file longer than clip_seconds: only its first clip_seconds set the gain, as a served
    song's 30 s excerpt does on its own."""
    settings = replace(ON, clip_seconds=1.0)
    long_file = np.concatenate([_noise(-30.0), _noise(-6.0)])  # a quiet first second, then loud
    normalised = normalise_loudness(long_file, RATE, settings)
    assert _dbfs(normalised[:RATE]) == pytest.approx(-20.0, abs=0.01)
    np.testing.assert_allclose(normalised, long_file * 10 ** (10 / 20), rtol=1e-5)


def test_reference_settings_do_not_normalise():
    """The reference table was made from the clips as they are: parity tests need it off."""
    assert REFERENCE_SETTINGS.loudness_target_dbfs is None


@pytest.mark.parametrize("file_rate", [22050, 44100])
def test_extract_sets_normalises_before_any_feature(file_rate):
    """Features with normalisation on are those of the normalised clip with it off: applied
    once, on the decoded clip, before the resampling to the features' rate."""
    clip = _noise(-35.0, seconds=3.2, rate=file_rate)
    with_it = extract_sets(clip, file_rate, ON, None, batch_size=None)
    before = extract_sets(
        normalise_loudness(clip, file_rate, ON),
        file_rate,
        REFERENCE_SETTINGS,
        None,
        batch_size=None,
    )
    np.testing.assert_array_equal(with_it.handcrafted.clip, before.handcrafted.clip)
    np.testing.assert_array_equal(with_it.handcrafted.segments, before.handcrafted.segments)
    without = extract_sets(clip, file_rate, REFERENCE_SETTINGS, None, batch_size=None)
    rms_mean = FEATURE_NAMES.index("rms_mean")
    assert with_it.handcrafted.clip[rms_mean] == pytest.approx(
        without.handcrafted.clip[rms_mean] * 10 ** (15 / 20), rel=0.01
    )


def test_the_settings_travel_with_the_features_and_key_the_cache():
    made = ON.to_dict()
    assert (made["loudness_target_dbfs"], made["loudness_max_gain_db"]) == (-20.0, 40.0)
    keys = {
        settings_key(ExtractionSettings(settings, None, None))
        for settings in (ON, REFERENCE_SETTINGS, replace(ON, loudness_max_gain_db=30.0))
    }
    assert len(keys) == 3


def test_tables_made_before_the_loudness_settings_are_refused(tmp_path):
    feature_sets.write_settings(tmp_path, ON)
    assert made_with(tmp_path, ON) == ON
    record = json.loads((tmp_path / feature_sets.SETTINGS_FILE).read_text())
    for key in LOUDNESS_KEYS:
        del record["features"][key]
    (tmp_path / feature_sets.SETTINGS_FILE).write_text(json.dumps(record))
    for asked in (ON, REFERENCE_SETTINGS):  # even when params ask for no normalisation
        with pytest.raises(
            FeatureSetError,
            match=r"made before the feature settings loudness_target_dbfs, "
            r"loudness_max_gain_db existed; rerun the features stage",
        ):
            made_with(tmp_path, asked)


def test_tables_made_without_normalisation_are_refused_when_it_is_asked_for(tmp_path):
    feature_sets.write_settings(tmp_path, REFERENCE_SETTINGS)
    with pytest.raises(
        FeatureSetError,
        match=r"loudness_target_dbfs None \(tables\) vs -20.0 \(asked\).*rerun the features",
    ):
        made_with(tmp_path, ON)
    (tmp_path / feature_sets.SETTINGS_FILE).write_text(json.dumps({"features": "22050 Hz"}))
    with pytest.raises(FeatureSetError, match="not a features settings record"):
        made_with(tmp_path, ON)


def test_a_model_served_before_the_loudness_settings_loads_without_normalisation():
    """A champion logged before they existed has a spec without them: it was trained on
    features of the clips as they were, so it must still load, and compute them that way."""
    legacy = {key: value for key, value in ON.to_dict().items() if key not in LOUDNESS_KEYS}
    spec = ServingSpec.from_dict(
        {
            "family": "xgboost",
            "flavor": "xgboost",
            "level": "segment",
            "classes": ["blues", "rock"],
            "feature_settings": legacy,
            "feature_set": "both",
        }
    )
    assert spec.settings.loudness_target_dbfs is None
    assert spec.settings == replace(ON, loudness_target_dbfs=None, loudness_max_gain_db=0.0)
    with pytest.raises(ValidationError):  # nothing else takes a missing setting for granted
        FeatureSettings(**legacy)
