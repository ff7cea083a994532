"""The promotion rule (pure functions) and the registry flow end to end on a sqlite store.

The flow plays real audio files (tones made up here, one pitch per genre: SYNTHETIC clips) to
served models through the same code as the stage: base64 requests in batches, the behavioural
transforms with lame. The served models are stand-ins that hear the pitch, so their quality is
set exactly: `confused` genres answered as another genre, or a model that calls every quiet
clip classical.
"""

from __future__ import annotations

import base64
import dataclasses
import io
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pytest
import soundfile
from mlflow import MlflowClient
from mlflow_helpers import (
    GENRES,
    fit_confusing,
    log_sklearn,
    serving_limits,
    sqlite_store,
    synthetic_test_data,
    training_record,
)

from gtzan_mlops.evaluation.scoring import EvaluationError
from gtzan_mlops.evaluation.uncertainty import Interval
from gtzan_mlops.features.handcrafted import REFERENCE_SETTINGS
from gtzan_mlops.promotion.behaviour import transforms
from gtzan_mlops.promotion.champion import TRAINING_CLIPS_FILE
from gtzan_mlops.promotion.registry import (
    PromotionSettings,
    RunContext,
    key_metrics,
    promote_winner,
)
from gtzan_mlops.promotion.rule import (
    BehaviourResult,
    Comparison,
    apply_gate,
    decide_on_the_clips,
)
from gtzan_mlops.promotion.served_evaluation import Clip, SplitClips, clips_digest
from gtzan_mlops.settings.loading import load_settings, read_params, validate_settings
from gtzan_mlops.settings.schema import Selection, Uncertainty
from gtzan_mlops.stages.evaluate import evaluate_records

MODEL_NAME = "gtzan-test-classifier"
RATE = 22050
PASSED = BehaviourResult(0.9, {"gain_-20db": 1.0, "mp3_128kbps": 0.95})


def _interval(value: float, low: float, high: float) -> Interval:
    return Interval(value, low, high, 0.95, 20, 1000)


def _comparison(difference: float, low: float, high: float) -> Comparison:
    return Comparison(
        "song_macro_f1",
        "3",
        _interval(0.7 + difference, 0.5, 0.9),
        _interval(0.7, 0.5, 0.9),
        _interval(difference, low, high),
    )


# --- the rule ---------------------------------------------------------------------------------


def test_first_model_is_promoted_if_it_passes_the_gate():
    first = decide_on_the_clips(None, 0.0, False)
    decision = apply_gate(PASSED, first)
    assert decision.promote and decision.rule == "first" and "no champion" in decision.reason
    failing = BehaviourResult(0.9, {"gain_-20db": 0.5, "mp3_128kbps": 1.0}, {"gain_-20db": "-20"})
    decision = apply_gate(failing, first)
    assert not decision.promote and decision.rule == "behaviour"
    assert "-20 0.50" in decision.reason and "mp3" not in decision.reason


def test_the_gate_leaves_a_decision_not_to_promote_as_it_is():
    worse = decide_on_the_clips(_comparison(-0.1, -0.2, 0.0), 0.0, False)
    failing = BehaviourResult(0.9, {"gain_-20db": 0.5})
    assert apply_gate(failing, worse) == worse and worse.rule == "improvement"


@pytest.mark.parametrize(
    ("difference", "low", "min_improvement", "significant", "promoted"),
    [
        (0.10, 0.02, 0.0, False, True),  # better
        (-0.10, -0.2, 0.0, False, False),  # worse
        (0.0, -0.1, 0.0, False, False),  # equal is not better
        (0.005, -0.1, 0.01, False, False),  # better, but by less than min_improvement
        (0.05, -0.01, 0.05, False, True),  # by exactly min_improvement (floats)
        (0.05, -0.01, 0.0, True, False),  # better, but the interval reaches below 0
        (0.05, 0.01, 0.0, True, True),  # better and the interval lies above 0
    ],
)
def test_the_paired_difference_decides(difference, low, min_improvement, significant, promoted):
    decision = decide_on_the_clips(_comparison(difference, low, 0.3), min_improvement, significant)
    assert decision.promote is promoted
    assert decision.rule == "improvement"
    assert "version 3" in decision.reason and "same test clips" in decision.reason
    if significant and not promoted:
        assert "require_significant" in decision.reason


def test_a_leaked_or_worse_serving_of_the_same_classifier_is_not_promoted():
    leaked = decide_on_the_clips(_comparison(0.3, 0.2, 0.4), 0.0, False, leaked=["a", "b"])
    assert not leaked.promote and leaked.rule == "leakage"
    assert "trained on 2 of the current test clips (a, b)" in leaked.reason
    same = decide_on_the_clips(_comparison(0.0, 0.0, 0.0), 0.0, False, same_classifier=True)
    assert same.promote and same.rule == "same_classifier"
    worse = decide_on_the_clips(_comparison(-0.1, -0.2, 0.0), 0.0, False, same_classifier=True)
    assert not worse.promote
    with pytest.raises(ValueError, match="min_improvement"):
        decide_on_the_clips(None, -0.1, False)


# --- the registry flow, with audio --------------------------------------------------------------


def _pitch(genre_index: int) -> float:
    return 300.0 + 150.0 * genre_index


def _tone(path: Path, genre_index: int, seconds: float = 4.0) -> None:
    time = np.arange(int(seconds * RATE)) / RATE
    samples = 0.5 * np.sin(2 * np.pi * _pitch(genre_index) * time)
    soundfile.write(path, samples.astype(np.float32), RATE, subtype="PCM_16")


class PitchModel:
    """A served model stand-in: decodes each base64 file and names the genre of its pitch; the
    first `confused` genres are answered as the next one of them (accuracy 1 - confused/10);
    `quiet_is_classical` answers classical for any clip below -25 dBFS RMS (the -9 dBFS tones
    turned down 20 dB)."""

    def __init__(self, confused: int = 0, quiet_is_classical: bool = False, max_rows: int = 8):
        self.confused, self.quiet = confused, quiet_is_classical
        spec = SimpleNamespace(classes=tuple(GENRES))
        self._python_model = SimpleNamespace(spec=spec, limits=SimpleNamespace(max_rows=max_rows))

    def unwrap_python_model(self):
        return self._python_model

    def _genre(self, encoded: str) -> str:
        samples, rate = soundfile.read(io.BytesIO(base64.b64decode(encoded)), always_2d=True)
        mono = samples.mean(axis=1)
        if self.quiet and np.sqrt(np.mean(mono**2)) < 10 ** (-25 / 20):
            return "classical"
        spectrum = np.abs(np.fft.rfft(mono))
        pitch = np.fft.rfftfreq(len(mono), 1 / rate)[spectrum.argmax()]
        index = round(float(pitch - 300.0) / 150.0)
        if index < self.confused:
            index = (index + 1) % self.confused
        return GENRES[index]

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        return pd.DataFrame({"genre": [self._genre(text) for text in frame["audio_base64"]]})


@pytest.fixture(scope="module")
def audio_clips(tmp_path_factory) -> SplitClips:
    """Two test clips per genre (tones) and the hashes of 30 made-up training clips."""
    folder = tmp_path_factory.mktemp("synthetic-test-clips")
    test = []
    for index, genre in enumerate(GENRES):
        for number in range(2):
            path = folder / f"{genre}.{number:05d}.wav"
            _tone(path, index, seconds=4.0 + number)
            test.append(Clip(path.stem, genre, path, path.stem, f"test-{genre}-{number}"))
    training = pd.DataFrame(
        {
            "track_id": [f"train.{n:05d}" for n in range(30)],
            "genre": [GENRES[n % 10] for n in range(30)],
            "samples_sha256": [f"train-{n}" for n in range(30)],
        }
    )
    return SplitClips(test=tuple(test), training=training)


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A throwaway store with the native classifiers the serving models wrap (their answers
    come from the PitchModel stand-ins: `served` maps family -> stand-in)."""
    data, train = synthetic_test_data()
    with sqlite_store(tmp_path_factory.mktemp("promote-store")):
        uris = {
            name: log_sklearn(fit_confusing(train["segment"], 0), name)
            for name in ("medium", "worse", "better", "best", "deaf")
        }
        served = {
            "medium": PitchModel(confused=4),
            "worse": PitchModel(confused=6),
            "better": PitchModel(confused=2),
            "best": PitchModel(confused=0),
            "deaf": PitchModel(quiet_is_classical=True),
        }
        yield data, uris, served


def _settings(limits=None, **promote) -> PromotionSettings:
    """The project's promotion settings in the throwaway registry, `promote` changed."""
    params = load_settings(Path(__file__).resolve().parents[2] / "params.yaml")
    chosen = {"model_name": MODEL_NAME, "experiment_name": "serving", **promote}
    return PromotionSettings(
        params.promote.model_copy(update=chosen),
        Uncertainty(level=0.95, n_resamples=500, seed=0),
        limits or serving_limits(),
        None,
    )


def _promote(family, registry, folder, clips, loader=None, **settings) -> dict:
    data, uris, served = registry
    record = training_record(family, uris[family], "segment", data, selection_value=0.8)
    (folder / family).mkdir(exist_ok=True)
    evaluation = evaluate_records(
        {family: record},
        data,
        [family],
        Selection(source="validation", metric="song_macro_f1", folds=5, seed=0),
        Uncertainty(level=0.95, n_resamples=200, seed=0),
        GENRES,
        folder / family,
    )
    client = MlflowClient()

    def load(uri: str):
        if uri.startswith(f"models:/{MODEL_NAME}/"):  # a registered version: the champion
            version = uri.rsplit("/", 1)[1]
            return served[client.get_model_version(MODEL_NAME, version).tags["family"]]
        return served[family]  # the challenger, just logged

    return promote_winner(
        evaluation,
        record,
        data,
        clips,
        REFERENCE_SETTINGS,
        _settings(**settings),
        RunContext("demo (synthetic clips generated by the project)", "0123abc"),
        load_model=loader or load,
    )


def _champion_version(client) -> str:
    return str(client.get_model_version_by_alias(MODEL_NAME, "champion").version)


def test_registry_flow_promotes_only_what_beats_the_champion(
    registry, audio_clips, tmp_path, monkeypatch
):
    def no_stages(*args, **kwargs):
        raise AssertionError("registry stages are deprecated: use aliases")

    monkeypatch.setattr(MlflowClient, "transition_model_version_stage", no_stages)
    client = MlflowClient()

    first = _promote("medium", registry, tmp_path, audio_clips)
    assert first["promoted"] and first["version"] == 1 and first["rule"] == "first"
    assert first["served"]["test_song_accuracy"]["value"] == pytest.approx(0.6)
    assert first["behaviour"]["passed"]
    names = [transform.name for transform in transforms(_settings().promote.behaviour)]
    assert list(first["behaviour"]["unchanged"]) == names and len(names) == 6
    assert all(fraction == 1.0 for fraction in first["behaviour"]["unchanged"].values())
    assert _champion_version(client) == "1"
    version = client.get_model_version(MODEL_NAME, "1")
    tags = version.tags
    assert tags["data_source"].startswith("demo (synthetic")
    assert tags["training_clips"] == "30"
    assert tags["training_clips_sha256"] == clips_digest(audio_clips.training["samples_sha256"])
    assert tags["selection"] == "validation song_macro_f1 (valid)"
    assert tags["selection_value"].startswith("0.8000 [0.7000, 0.9000]")
    assert tags["metric_name"] == "test_song_macro_f1"
    low, value, high = (float(tags[f"metric_{key}"]) for key in ("low", "value", "high"))
    assert low <= value <= high and high - low > 0.05
    assert tags["test_song_accuracy"].startswith("0.6000 [")
    assert tags["behaviour.gain_-20db"] == "1.0000"
    assert tags["split"] == "synthetic-by-track" and tags["git_commit"] == "0123abc"
    assert tags["promotion"] == "promoted" and tags["promotion_rule"] == "first"
    # The training clips themselves travel with the version, for later leakage checks.
    listed = mlflow.artifacts.download_artifacts(
        run_id=version.run_id, artifact_path=TRAINING_CLIPS_FILE, dst_path=str(tmp_path)
    )
    assert pd.read_csv(listed)["samples_sha256"].tolist()[:2] == ["train-0", "train-1"]

    worse = _promote("worse", registry, tmp_path, audio_clips)
    assert not worse["promoted"] and worse["version"] == 2
    comparison = worse["comparison"]
    assert comparison["champion"]["value"] < first["served"]["test_song_macro_f1"]["value"] + 1e-9
    assert comparison["difference"]["value"] < 0
    assert comparison["difference"]["low"] <= comparison["difference"]["value"]
    assert _champion_version(client) == "1"
    kept = client.get_model_version(MODEL_NAME, "2")
    assert kept.tags["promotion"] == "not promoted" and "champion kept" in kept.description
    # Kept out by the comparison: the gate, which can only stop a promotion, never played it.
    assert worse["behaviour"] is None and "behaviour not measured" in worse["reason"]
    assert not any(key.startswith("behaviour") for key in kept.tags)
    assert set(key_metrics(worse)["test_song_macro_f1"]) == {"value", "low", "high"}

    again = _promote("medium", registry, tmp_path, audio_clips)  # a rerun with the same winner
    assert not again["registered"] and "already the champion" in again["reason"]
    assert key_metrics(again) == key_metrics(first)  # its DVC metrics: nothing changed
    assert len(client.search_model_versions(f"name='{MODEL_NAME}'")) == 2

    better = _promote("better", registry, tmp_path, audio_clips)
    assert better["promoted"] and better["version"] == 3
    assert better["comparison"]["difference"]["value"] == pytest.approx(
        better["served"]["test_song_macro_f1"]["value"] - comparison["champion"]["value"]
    )
    assert better["previous_champion_version"] == 1
    assert _champion_version(client) == "3"

    # The same classifier with other serving settings is a new served model: no worse on the
    # same clips, it takes the alias.
    redeployed = _promote(
        "better", registry, tmp_path, audio_clips, limits=serving_limits(max_rows=4)
    )
    assert redeployed["promoted"] and redeployed["rule"] == "same_classifier"
    served = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion").unwrap_python_model()
    assert served.limits.max_rows == 4

    for version in client.search_model_versions(f"name='{MODEL_NAME}'"):
        assert version.current_stage in (None, "None")


def test_a_model_that_changes_its_mind_when_quieter_is_not_promoted(
    registry, audio_clips, tmp_path
):
    before = _champion_version(MlflowClient()) if _has_champion() else None
    deaf = _promote("deaf", registry, tmp_path, audio_clips)
    assert not deaf["promoted"] and deaf["rule"] == "behaviour"
    unchanged = deaf["behaviour"]["unchanged"]
    assert unchanged["gain_-6db"] == 1.0 and unchanged["gain_-20db"] < 0.5  # -20 dB: classical
    assert "turned down 20 dB" in deaf["reason"]
    assert (_champion_version(MlflowClient()) if _has_champion() else None) == before
    tags = MlflowClient().get_model_version(MODEL_NAME, str(deaf["version"])).tags
    assert float(tags["behaviour.gain_-20db"]) < 0.5 and tags["promotion_rule"] == "behaviour"


def test_a_champion_trained_on_the_test_clips_is_not_compared(registry, audio_clips, tmp_path):
    client = MlflowClient()
    if not _has_champion():
        _promote("medium", registry, tmp_path, audio_clips)
    champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
    # A new split: two of its test clips are clips the champion trained on (same samples).
    test = list(audio_clips.test)
    test[0] = dataclasses.replace(test[0], samples_sha256="train-0")
    test[5] = dataclasses.replace(test[5], samples_sha256="train-7")
    leaked_split = SplitClips(tuple(test), audio_clips.training.iloc[10:].reset_index(drop=True))
    result = _promote("best", registry, tmp_path, leaked_split)
    assert not result["promoted"] and result["rule"] == "leakage"
    assert result["leaked_test_clips"] == sorted([test[0].track_id, test[5].track_id])
    assert f"champion version {champion.version} was trained on 2" in result["reason"]
    assert _champion_version(client) == str(champion.version)


def test_a_champion_that_cannot_be_loaded_stops_or_counts_as_absent(
    registry, audio_clips, tmp_path
):
    if not _has_champion():
        _promote("medium", registry, tmp_path, audio_clips)
    _, _, served = registry

    def broken(uri: str):
        if uri.startswith(f"models:/{MODEL_NAME}/"):
            raise OSError("No such file or directory: '/gone/artifacts/model/MLmodel'")
        return served["best"]

    with pytest.raises(EvaluationError, match=r"champion version \d+ .* cannot be loaded: OSError"):
        _promote("best", registry, tmp_path, audio_clips, loader=broken)
    absent = _promote(
        "best", registry, tmp_path, audio_clips, loader=broken, unloadable_champion="absent"
    )
    assert absent["promoted"] and absent["rule"] == "first"
    assert "counts as absent" in absent["reason"]
    assert _champion_version(MlflowClient()) == str(absent["version"])


def _has_champion() -> bool:
    try:
        MlflowClient().get_model_version_by_alias(MODEL_NAME, "champion")
    except mlflow.exceptions.MlflowException:
        return False
    return True


def test_promotion_settings_from_params(repo_root):
    raw = read_params(repo_root / "params.yaml")
    raw["promote"].update(min_improvement=0.02, require_significant=True)
    raw["serving"]["max_upload_mib"] = 5
    settings = PromotionSettings.of(validate_settings(raw), None)
    assert settings.promote.min_improvement == 0.02 and settings.promote.require_significant
    assert settings.promote.metric == raw["promote"]["metric"]
    assert settings.limits == serving_limits(max_upload_mib=5.0)
    behaviour = raw["promote"]["behaviour"]
    assert settings.promote.behaviour.min_unchanged == behaviour["min_unchanged"]
    assert settings.uncertainty.n_resamples == raw["uncertainty"]["n_resamples"]


def test_a_refused_clip_is_answered_none_and_the_others_still_count(audio_clips):
    """One bad file fails its whole request: the clips are then asked one by one, and only the
    refused one is None (wrong, and changed, wherever it is counted)."""
    from mlflow.exceptions import MlflowException

    from gtzan_mlops.promotion.served_evaluation import REFUSED, ServedModel

    class Refusing(PitchModel):
        def predict(self, frame):
            if any(len(text) < 100 for text in frame["audio_base64"]):
                raise MlflowException("row 0: not decodable as audio")
            return super().predict(frame)

    served = ServedModel(Refusing(max_rows=4), "stand-in")
    payloads = [clip.path.read_bytes() for clip in audio_clips.test[:3]]
    payloads.insert(1, b"not audio")
    answers = served._answer(payloads, ["a", "bad", "b", "c"])
    assert answers[1] is REFUSED
    expected = [clip.genre for clip in audio_clips.test[:3]]
    assert [answers[0], *answers[2:]] == expected
