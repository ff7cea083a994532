"""MLproject: parameters default to params.yaml; `mlflow run` runs a stage into the store."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from live_services import clean_env, synthetic_feature_tables

from gtzan_mlops import tracking
from gtzan_mlops.features.feature_sets import write_settings
from gtzan_mlops.settings.loading import ConfigError, apply_overrides, load_settings
from gtzan_mlops.stages import split

# `--set train.{family}.n_trials={n_trials}`: a key may hold the entry point's family.
OVERRIDE = re.compile(r"--set (?P<key>[\w.{}]+)=\{(?P<parameter>\w+)\}")


def _entry_points(repo_root: Path) -> dict:
    return yaml.safe_load((repo_root / "MLproject").read_text())["entry_points"]


def test_every_stage_has_an_entry_point(repo_root):
    commands = {name: entry["command"] for name, entry in _entry_points(repo_root).items()}
    assert commands["main"] == "dvc repro"
    stages = yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]
    programs = {" ".join(stage["cmd"].split()[:2]) for stage in stages.values()}
    assert len(programs) >= 8  # fetch ... promote (the train stages share one program)
    for program in sorted(programs | {"gtzan-mlops report", "gtzan-mlops predict"}):
        name = program.split()[1]
        assert commands.get(name, "").startswith(program), name


def test_parameter_defaults_are_the_values_in_params_yaml(repo_root):
    """Every default, and one that depends on the family (train.{family}.n_trials) for every
    family the entry point may be given."""
    settings = load_settings(repo_root / "params.yaml")
    checked = 0
    for name, entry in _entry_points(repo_root).items():
        for match in OVERRIDE.finditer(entry["command"]):
            default = entry["parameters"][match["parameter"]]["default"]
            keys = {match["key"].format(family=family) for family in settings.train.families}
            for key in sorted(keys):
                value = functools.reduce(getattr, key.split("."), settings)
                assert value == default, (name, key)
                checked += 1
    assert checked >= 7 + len(settings.train.families)


def test_a_stage_adopts_the_run_of_mlflow_run_but_not_under_dvc(monkeypatch):
    # `mlflow run . -e train`: the stage logs into the run `mlflow run` made, and takes the
    # variable out of the environment so no later run resumes it by accident.
    monkeypatch.delenv("DVC_STAGE", raising=False)
    monkeypatch.setenv("MLFLOW_RUN_ID", "abc123")
    assert tracking.launched_run_id() == "abc123"
    assert "MLFLOW_RUN_ID" not in os.environ
    # `mlflow run . -e main` runs `dvc repro`, which hands the variable to every stage: one run
    # cannot hold every stage's params, so each stage logs its own.
    monkeypatch.setenv("MLFLOW_RUN_ID", "abc123")
    monkeypatch.setenv("DVC_STAGE", "train@knn")
    assert tracking.launched_run_id() is None
    assert "MLFLOW_RUN_ID" not in os.environ


def test_overrides_parse_values_and_reject_unknown_keys():
    params = {"split": {"seed": 0, "strategy": "song_grouped"}, "train": {"workers": 1}}
    apply_overrides(params, ["split.seed=3.0", "train.workers=2", "split.strategy=random_segments"])
    assert params == {
        "split": {"seed": 3.0, "strategy": "random_segments"},
        "train": {"workers": 2},
    }
    with pytest.raises(ConfigError, match=r"no setting 'split\.sead'"):
        apply_overrides(params, ["split.sead=1"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides(params, ["split.seed"])


@pytest.mark.slow
def test_mlflow_run_trains_a_family_into_the_project_store(tmp_path, repo_root):
    """`mlflow run . -e train -P family=knn --env-manager local` as the README shows it: the
    stage's parent run is the run `mlflow run` made, with the nested trials under it."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ("MLproject", "python_env.yaml", "params.yaml"):
        shutil.copy(repo_root / name, project / name)
    clips, segments = synthetic_feature_tables(4)
    (project / "data/features").mkdir(parents=True)
    clips.to_csv(project / "data/features/features_30_sec.csv", index=False)
    segments.to_csv(project / "data/features/features_3_sec.csv", index=False)
    # synthetic tables: no audio to fingerprint, so no duplicate groups to keep together
    settings = load_settings(project / "params.yaml", ["split.group_duplicates=false"])
    write_settings(project / "data/features", settings.features)
    split.run(settings, project)

    store = f"sqlite:///{project / 'mlruns' / 'mlflow.db'}"
    command = [
        str(Path(sys.executable).parent / "mlflow"), "run", str(project), "-e", "train",
        "-P", "family=knn", "-P", "n_trials=2", "--env-manager", "local",
        "--experiment-name", "gtzan-genre",
    ]  # fmt: skip
    result = subprocess.run(
        command, cwd=project, env=clean_env(MLFLOW_TRACKING_URI=store), capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr

    mlflow.set_tracking_uri(store)
    try:
        runs = mlflow.search_runs(experiment_names=["gtzan-genre"])
        parents = runs[runs["tags.mlflow.parentRunId"].isna()]
        assert len(parents) == 1
        parent = parents.iloc[0]
        assert (
            parent["tags.mlflow.runName"] == "train-knn [handcrafted features, song-grouped split]"
        )
        assert parent["params.family"] == "knn"  # the MLproject parameter, logged by mlflow run
        assert parent["tags.mlflow.project.entryPoint"] == "train"
        trials = runs[runs["tags.mlflow.parentRunId"] == parent["run_id"]]
        assert len(trials) == 2
        assert (project / "data/train/knn-handcrafted.json").is_file()
    finally:
        mlflow.set_tracking_uri(None)
