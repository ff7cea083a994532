"""params.yaml's schema: one load that rejects unknown, missing and mistyped settings by their
path, and holds no default of its own."""

from __future__ import annotations

import copy
import typing

import pytest
import yaml
from project_params import PARAMS_FILE

from gtzan_mlops import cli
from gtzan_mlops.data import split_strategies
from gtzan_mlops.evaluation import scoring
from gtzan_mlops.features import feature_sets
from gtzan_mlops.models import zoo
from gtzan_mlops.promotion import served_evaluation
from gtzan_mlops.settings import schema
from gtzan_mlops.settings.loading import ConfigError, read_params, validate_settings

RAW = read_params(PARAMS_FILE)


def _invalid(change: typing.Callable[[dict], None]) -> str:
    params = copy.deepcopy(RAW)
    change(params)
    with pytest.raises(ConfigError) as raised:
        validate_settings(params, "params.yaml")
    return str(raised.value)


def test_the_projects_params_are_valid_and_unchanged_by_validation():
    settings = validate_settings(copy.deepcopy(RAW))
    assert settings.model_dump(mode="python", exclude_unset=True) == RAW


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p: p["split"].update(sead=1), "params.yaml: unknown setting 'split.sead'"),
        (lambda p: p.update(plots={}), "unknown setting 'plots'"),
        (
            lambda p: p["train"]["sgd"]["space"]["alpha"].update(hihg=0.5),
            "unknown setting 'train.sgd.space.alpha.hihg'",
        ),
        (lambda p: p["pca"].pop("seed"), "missing setting 'pca.seed'"),
        (lambda p: p["resources"].pop("features"), "missing setting 'resources.features'"),
        (lambda p: p["split"].update(seed="3"), "split.seed: must be an integer, got '3'"),
        (lambda p: p["split"].update(seed=True), "split.seed: must be an integer, got True"),
        (lambda p: p["split"].update(seed=0.5), "split.seed: must be an integer, got 0.5"),
        (lambda p: p["split"].update(test_size=1.5), "split.test_size: "),
        (lambda p: p["data"].update(silence_peak="low"), "data.silence_peak: must be a number"),
        (lambda p: p["split"].update(strategy="by_mood"), "split.strategy: Input should be"),
        (lambda p: p["train"].update(objective="f1"), "train.objective: Input should be"),
        (lambda p: p["train"].update(families=["knn", "resnet"]), "train.families.1: "),
        (lambda p: p["serving"].update(allow_audio_path="yes"), "serving.allow_audio_path: "),
        (lambda p: p["paths"].update(features=""), "paths.features: "),
        (
            lambda p: p["train"]["knn"]["space"].update(p={"type": "normal"}),
            "train.knn.space.p: must be a fixed value or a mapping with type int, float or "
            "categorical",
        ),
        (
            lambda p: p["train"]["knn"]["space"]["n_neighbors"].pop("high"),
            "missing setting 'train.knn.space.n_neighbors.high'",
        ),
        (
            lambda p: p["duplicates"].update(window_s=200),
            "duplicates: window_s + max_offset_s exceed fingerprint_seconds",
        ),
        (
            lambda p: p["train"].update(families=["knn", "xgboost"]),
            "evaluate.candidates: ['fnn', 'fnn_simple'] are not in train.families",
        ),
    ],
)
def test_a_bad_setting_is_named_by_its_path(change, message):
    assert message in _invalid(change)


def test_every_problem_is_listed_at_once():
    def two_problems(params):
        params["split"]["sead"] = 1
        params["train"]["seed"] = "zero"

    lines = _invalid(two_problems).splitlines()
    assert len(lines) == 2 and all(line.startswith("params.yaml: ") for line in lines)


def test_a_whole_float_from_mlflow_run_becomes_an_integer():
    params = copy.deepcopy(RAW)
    params["split"]["seed"] = 3.0  # MLproject passes numeric parameters as floats
    params["resources"]["train"]["workers"] = 2.0
    checked = validate_settings(params)
    assert checked.split.seed == 3 and isinstance(checked.split.seed, int)
    assert isinstance(checked.resources.train.workers, int)


def test_a_stage_validates_its_overrides_before_running(tmp_path, capsys):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(RAW), encoding="utf-8")
    command = ["split", "--params", str(tmp_path / "params.yaml"), "--set", "split.seed=abc"]
    assert cli.main(command) == 2
    assert "split.seed: must be an integer, got 'abc'" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()  # refused before it read or wrote anything


def test_the_schema_holds_no_defaults():
    """Every value comes from params.yaml; only the search-space notation's optional keys
    (Optuna's own step and log) may be left out."""
    optional = {(schema.IntRange, "step"), (schema.IntRange, "log")}
    optional |= {(schema.FloatRange, "step"), (schema.FloatRange, "log")}
    checked = 0
    for model in vars(schema).values():
        if not (isinstance(model, type) and issubclass(model, schema.Section)):
            continue
        for name, field in model.model_fields.items():
            checked += 1
            assert field.is_required() or (model, name) in optional, f"{model.__name__}.{name}"
    assert checked > 100


def test_the_schemas_choices_are_the_codes():
    assert typing.get_args(schema.Family) == zoo.FAMILIES
    assert typing.get_args(schema.FeatureSet) == feature_sets.FEATURE_SETS
    assert typing.get_args(schema.Metric) == scoring.METRICS
    promoted_by = schema.Promote.model_fields["metric"].annotation
    assert typing.get_args(promoted_by) == tuple(served_evaluation.SONG_METRICS)
    sources = schema.Selection.model_fields["source"].annotation
    assert typing.get_args(sources) == scoring.SELECTION_SOURCES
    strategy = schema.Split.model_fields["strategy"].annotation
    assert set(typing.get_args(strategy)) == set(split_strategies.STRATEGIES)
    families = set(zoo.FAMILIES)
    assert families <= set(schema.Train.model_fields)
