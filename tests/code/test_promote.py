"""The promotion decision (a pure function) and the registry flow end to end on a sqlite store."""

from __future__ import annotations

import mlflow
import pytest
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

from gtzan_mlops.config import ConfigError, load_params
from gtzan_mlops.evaluate import evaluate_records
from gtzan_mlops.features import REFERENCE_SETTINGS
from gtzan_mlops.promote import (
    DIFFERENT_DATA,
    ChampionEvidence,
    DataVersion,
    PromotionSettings,
    decide_promotion,
    promote_winner,
)

NOW = DataVersion(split_sha256="s" * 64, features_sha256="f" * 64)


def _champion(value: float | None, data: DataVersion = NOW) -> ChampionEvidence:
    return ChampionEvidence(version="3", data=data, value=value)


def test_first_model_is_promoted():
    decision = decide_promotion(0.40, None, NOW, min_improvement=0.0, on_data_change="keep")
    assert decision.promote
    assert "no champion" in decision.reason


@pytest.mark.parametrize(
    ("challenger", "champion", "min_improvement", "promoted"),
    [
        (0.70, 0.60, 0.0, True),  # better
        (0.60, 0.70, 0.0, False),  # worse
        (0.60, 0.60, 0.0, False),  # equal is not better
        (0.605, 0.60, 0.01, False),  # better, but by less than min_improvement
        (0.62, 0.60, 0.01, True),  # better by more than min_improvement
        (
            0.85,
            0.80,
            0.05,
            True,
        ),  # better by exactly min_improvement (0.85 - 0.80 < 0.05 in floats)
        (0.1 + 0.2, 0.3, 0.0, False),  # equal up to rounding is not better
    ],
)
def test_same_data_compares_recomputed_scores(challenger, champion, min_improvement, promoted):
    decision = decide_promotion(challenger, _champion(champion), NOW, min_improvement, "keep")
    assert decision.promote is promoted
    assert decision.improvement == pytest.approx(challenger - champion)
    assert "version 3" in decision.reason


@pytest.mark.parametrize(
    ("then", "changed"),
    [
        (DataVersion("x" * 64, NOW.features_sha256), "split"),
        (DataVersion(NOW.split_sha256, "y" * 64), "features"),
    ],
)
def test_champion_on_other_data_is_not_compared(then, changed):
    # A far better score on other data must not promote: the numbers are not comparable.
    kept = decide_promotion(0.99, _champion(None, then), NOW, 0.0, on_data_change="keep")
    assert not kept.promote
    assert kept.reason.startswith(DIFFERENT_DATA)
    assert f"{changed} changed" in kept.reason
    assert kept.improvement is None

    # Nor does a worse score keep it when the operator asked for replacement on data change.
    replaced = decide_promotion(0.01, _champion(None, then), NOW, 0.0, on_data_change="replace")
    assert replaced.promote
    assert replaced.reason.startswith(DIFFERENT_DATA)


def test_invalid_settings_are_rejected():
    with pytest.raises(ConfigError, match="on_data_change"):
        decide_promotion(0.5, None, NOW, 0.0, on_data_change="maybe")
    with pytest.raises(ConfigError, match="min_improvement"):
        decide_promotion(0.5, None, NOW, -0.1, "keep")
    with pytest.raises(ValueError, match="recomputed"):
        decide_promotion(0.5, _champion(None), NOW, 0.0, "keep")


# --- the registry flow, end to end on a sqlite store -------------------------------------------


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A throwaway store with four models of known test accuracy (1 - confused genres / 10)."""
    data, train = synthetic_test_data()
    with sqlite_store(tmp_path_factory.mktemp("promote-store")):
        uris = {
            name: log_sklearn(fit_confusing(train["segment"], confused), name)
            for name, confused in (("medium", 4), ("worse", 6), ("better", 2), ("best", 0))
        }
        yield data, uris


def _evaluate(family: str, uri: str, data, folder) -> tuple[dict, dict]:
    """The evaluate stage's summary with `family` as the only candidate, and its record."""
    record = training_record(family, uri, "segment", data)
    folder.mkdir(exist_ok=True)
    summary = evaluate_records(
        {family: record}, data, [family], "test_song_accuracy", GENRES, folder
    )
    return summary, record


def _promote(family, registry, folder, data=None, **settings) -> dict:
    test_data, uris = registry
    data = data or test_data
    evaluation, record = _evaluate(family, uris[family], data, folder / family)
    return promote_winner(
        evaluation,
        record,
        data,
        REFERENCE_SETTINGS,
        PromotionSettings(
            model_name=MODEL_NAME,
            experiment_name="serving",
            **{
                "min_improvement": 0.0,
                "on_data_change": "keep",
                "limits": serving_limits(),
                **settings,
            },
        ),
        git_commit="0123abc",
    )


MODEL_NAME = "gtzan-test-classifier"


def _champion_version(client) -> str:
    return str(client.get_model_version_by_alias(MODEL_NAME, "champion").version)


def test_registry_flow_promotes_only_what_beats_the_champion(registry, tmp_path, monkeypatch):
    def no_stages(*args, **kwargs):
        raise AssertionError("registry stages are deprecated: use aliases")

    monkeypatch.setattr(MlflowClient, "transition_model_version_stage", no_stages)
    client = MlflowClient()

    first = _promote("medium", registry, tmp_path)
    assert first["promoted"] and first["version"] == 1
    assert "no champion" in first["reason"]
    assert first["challenger_value"] == pytest.approx(0.6)
    assert _champion_version(client) == "1"
    tags = client.get_model_version(MODEL_NAME, "1").tags
    assert tags["split"] == "synthetic-by-track" and tags["leaky"] == "false"
    assert tags["split_sha256"] == "split-v1"
    assert tags["features_sha256"] == "features-v1-segment"
    assert tags["git_commit"] == "0123abc"
    assert tags["metric_name"] == "test_song_accuracy"
    assert float(tags["metric_value"]) == pytest.approx(0.6)
    assert tags["promotion"] == "promoted"

    worse = _promote("worse", registry, tmp_path)
    assert not worse["promoted"] and worse["version"] == 2
    assert worse["previous_champion_value"] == pytest.approx(0.6)  # recomputed, on the test set
    assert _champion_version(client) == "1"
    kept = client.get_model_version(MODEL_NAME, "2")
    assert kept.tags["promotion"] == "not promoted"
    assert "champion kept" in kept.tags["promotion_reason"]
    assert kept.description == worse["reason"]

    again = _promote("medium", registry, tmp_path)  # a rerun with the same winner
    assert not again["promoted"] and "already the champion" in again["reason"]
    assert len(client.search_model_versions(f"name='{MODEL_NAME}'")) == 2

    # The champion's stored score is not trusted: claim a perfect one; the challenger (0.8)
    # still wins against the recomputed 0.6.
    client.set_model_version_tag(MODEL_NAME, "1", "metric_value", "1.0")
    better = _promote("better", registry, tmp_path)
    assert better["promoted"] and better["version"] == 3
    assert better["improvement"] == pytest.approx(0.2)
    assert _champion_version(client) == "3"

    # The alias serves the raw-audio model of the new champion.
    served = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion").unwrap_python_model()
    assert served.spec.family == "better" and served.spec.level == "segment"

    # The same classifier with other serving settings is a new served model: it takes the alias.
    redeployed = _promote("better", registry, tmp_path, limits=serving_limits(max_rows=4))
    assert redeployed["promoted"] and redeployed["version"] == 4
    assert "new serving code or serving settings" in redeployed["reason"]
    served = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion").unwrap_python_model()
    assert served.limits.max_rows == 4

    for version in client.search_model_versions(f"name='{MODEL_NAME}'"):
        assert version.current_stage in (None, "None")


def test_champion_on_other_data_is_kept_unless_replace_is_asked(registry, tmp_path):
    client = MlflowClient()
    if not client.search_registered_models(f"name='{MODEL_NAME}'"):
        _promote("medium", registry, tmp_path)
    before = _champion_version(client)
    new_split, _ = synthetic_test_data(split_sha256="split-v2")

    kept = _promote("best", registry, tmp_path, data=new_split)
    assert not kept["promoted"]
    assert kept["reason"].startswith("champion evaluated on different data")
    assert kept["previous_champion_value"] is None  # not compared blindly
    assert _champion_version(client) == before
    assert (
        "different data" in client.get_model_version(MODEL_NAME, str(kept["version"])).description
    )

    replaced = _promote("best", registry, tmp_path, data=new_split, on_data_change="replace")
    assert replaced["promoted"]
    assert _champion_version(client) == str(replaced["version"])


def test_promotion_settings_from_params(repo_root):
    params = load_params(repo_root / "params.yaml")
    settings = PromotionSettings.from_params(
        {
            **params,
            "promote": {
                "model_name": "m",
                "min_improvement": 0.02,
                "on_data_change": "replace",
                "experiment_name": None,
            },
            "serving": {**params["serving"], "max_upload_mib": 5},
        }
    )
    assert settings == PromotionSettings(
        "m", 0.02, "replace", None, serving_limits(max_upload_mib=5.0)
    )
    with pytest.raises(ConfigError, match="on_data_change"):
        PromotionSettings.from_params(
            {**params, "promote": {**params["promote"], "on_data_change": "sometimes"}}
        )
