"""End to end: `dvc repro` of the whole pipeline on the synthetic demo set and then on the 70 real
clips, in a fresh copy of the repository, and what DVC and MLflow users do next.

Small budgets (a trial or two per family, few epochs and trees), so it checks the wiring of every
stage rather than model quality: fetch lists 70 usable clips, features gives 70 clip rows and 700
segment rows, every family trains, the real model takes the `champion` alias from the demo one
(both played the real test clips), the MLflow UI shows the runs, their trials and the champion,
`predict` answers for a real clip with it, and a worse model on the same data leaves it there; a
second `dvc repro` does nothing; a changed parameter reruns only the stages that read it; `dvc
exp run -S` and the experiment queue log into the same MLflow store, tagged with the
experiment's name; `dvc push`/`dvc pull` round-trip the audio and features.

The demo run is the smallest pipeline that makes a champion (one family, on the hand-crafted
features only, on 40 synthetic clips): every stage's wiring is checked on the real clips, and the
demo run is there to leave a champion that the real run must beat on the same clips.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from live_services import QUICK_BUDGETS, run_command, set_params
from mlflow_ui_checks import show_ui

# The module fixture runs `dvc repro` twice (demo set, then the 70 real clips): 6 to 8 min on
# 2 cores, which counts against the first test's timeout.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

E2E_FAMILIES = ["naive_bayes", "sgd", "fnn_simple", "xgboost"]
E2E_CANDIDATES = ["fnn_simple", "xgboost"]  # trained on both feature sets too
# Trials per study: two for the quick families the MLflow UI test unfolds, one elsewhere.
E2E_TRIALS = {"naive_bayes": 2, "sgd": 2, "fnn_simple": 1, "xgboost": 1}
# Trained on the real clips only (the demo run trains xgboost): their runs' names are unique.
UI_FAMILIES = ["naive_bayes", "sgd"]
# The demo run's whole pipeline: one candidate family on the hand-crafted features alone (its
# served model computes no musicnn embeddings, so the real run's comparison plays it cheaply).
DEMO_PIPELINE = {
    "data.source": "demo",
    "data.demo.clips_per_genre": 4,
    "train.families": ["xgboost"],
    "evaluate.candidates": ["xgboost"],
    "train.candidate_feature_sets": [],
}


def _run(command: list[str], cwd: Path, env: dict[str, str]) -> str:
    return run_command(command, cwd, env, timeout_s=1200)


def _copy_repository(source: Path, target: Path) -> None:
    """The files git would put in a fresh clone, including uncommitted edits to them."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=source,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in listed:
        if (source / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / name, target / name)


def _stages_run(output: str) -> set[str]:
    return {
        line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")
    }


def _commit(repo: Path, env: dict[str, str], message: str) -> None:
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", message, "--allow-empty"], repo, env)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, repo_root, gtzan_mini):
    """A fresh copy of the repository after `dvc repro` on a small synthetic demo set (as
    `make pipeline` does), then `dvc repro` on the 70 real clips (as the README's next step)."""
    repo = tmp_path_factory.mktemp("pipeline") / "repo"
    repo.mkdir()
    _copy_repository(repo_root, repo)
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("MLFLOW_", "OPTUNA_", "DVC_"))
    }
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        DVC_NO_ANALYTICS="1",
        GIT_AUTHOR_NAME="test",
        GIT_AUTHOR_EMAIL="test@example.invalid",
        GIT_COMMITTER_NAME="test",
        GIT_COMMITTER_EMAIL="test@example.invalid",
        # An empty JIT cache, as in a new environment: the features stage's pool compiles
        # librosa's numba code first, and every later stage must load what it left.
        NUMBA_CACHE_DIR=str(repo.parent / "numba-cache"),
    )
    # Four families (tests/test_train.py trains every one): a stage per family is the same
    # wiring whatever the family, and each costs ~10 s of start-up.
    set_params(
        repo / "params.yaml",
        {
            "data.source": "local",
            "data.local_dir": str(gtzan_mini),
            "train.families": E2E_FAMILIES,
            "evaluate.candidates": E2E_CANDIDATES,
            **QUICK_BUDGETS,
            # One gain of the three: each transform is another play of every test clip, and
            # each gain is the same wiring (tests/model/test_behaviour.py checks them all).
            "promote.behaviour.gains_db": [-20.0],
            **{f"train.{family}.n_trials": E2E_TRIALS[family] for family in E2E_FAMILIES},
        },
    )
    # The copy's own remote, so the test never writes beside the developer's checkout.
    _run(["git", "init", "-q"], repo, env)
    _run(["dvc", "remote", "add", "-f", "-d", "local", str(repo.parent / "remote")], repo, env)
    real = yaml.safe_load((repo / "params.yaml").read_text())
    set_params(repo / "params.yaml", DEMO_PIPELINE)
    _commit(repo, env, "copy")
    started = time.monotonic()
    _run(["dvc", "repro"], repo, env)
    demo = json.loads((repo / "reports/promote/promotion.json").read_text())
    print(f"\ndvc repro on the demo set: {time.monotonic() - started:.0f} s")
    set_params(
        repo / "params.yaml",
        {
            "data.source": "local",
            "train.families": E2E_FAMILIES,
            "evaluate.candidates": E2E_CANDIDATES,
            "train.candidate_feature_sets": real["train"]["candidate_feature_sets"],
        },
    )
    _commit(repo, env, "demo")
    started = time.monotonic()
    first = _run(["dvc", "repro"], repo, env)
    print(f"dvc repro on the 70 real clips: {time.monotonic() - started:.0f} s")
    _commit(repo, env, "repro")
    return repo, env, first, demo


def _store(repo: Path) -> str:
    return f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}"


def _runs(repo: Path) -> pd.DataFrame:
    mlflow.set_tracking_uri(_store(repo))
    try:
        return mlflow.search_runs(experiment_names=["gtzan-genre"])
    finally:
        mlflow.set_tracking_uri(None)


def test_repro_runs_every_stage_on_the_real_clips(pipeline):
    repo, _, first, _ = pipeline
    families = E2E_FAMILIES
    assert _stages_run(first) == {
        "fetch", "duplicates", "features", "pca", "split", "evaluate", "promote",
        *(f"train@{family}-handcrafted" for family in families),
        *(f"train_candidates@{family}-both" for family in E2E_CANDIDATES),
    }  # fmt: skip

    manifest = pd.read_csv(repo / "data/manifest.csv")
    assert len(manifest) == 70 and (manifest["status"] == "ok").all()
    # Chromaprint finds no copies among the 70 real clips; the split checked for them.
    grouped = pd.read_csv(repo / "data/duplicates.csv", keep_default_na=False)
    assert len(grouped) == 70 and (grouped["duplicate_group"] == "").all()
    split_summary = json.loads((repo / "data/split/summary.json").read_text())
    assert split_summary["duplicate_groups"] == 0
    assert split_summary["leakage"]["duplicate_groups_on_several_sides"] == 0
    assert len(pd.read_csv(repo / "data/features/features_30_sec.csv")) == 70
    assert len(pd.read_csv(repo / "data/features/features_3_sec.csv")) == 700
    assert len(pd.read_csv(repo / "data/features/musicnn_30_sec.csv")) == 70
    assert len(pd.read_csv(repo / "data/features/musicnn_3_sec.csv")) == 700

    evaluation = json.loads((repo / "metrics/evaluate.json").read_text())
    assert evaluation["split"] == "song-grouped" and evaluation["leaky"] is False
    models = {
        *(f"{family}-handcrafted" for family in families),
        *(f"{family}-both" for family in E2E_CANDIDATES),
    }
    assert evaluation["winner"] in {
        f"{f}-{s}" for f in E2E_CANDIDATES for s in ("handcrafted", "both")
    }
    assert set(evaluation["models"]) == models
    assert evaluation["selection"] == "validation song_macro_f1"
    chosen = json.loads((repo / "reports/evaluate/evaluation.json").read_text())["families"]
    best = max(chosen[name]["selection"]["value"] for name in chosen if chosen[name]["candidate"])
    assert chosen[evaluation["winner"]]["selection"]["value"] == best  # not the test score

    # The demo champion (synthetic tones) was compared with the real model on the same real test
    # clips, both as served, and lost the alias.
    promotion = json.loads((repo / "reports/promote/promotion.json").read_text())
    assert promotion["promoted"] is True, promotion["reason"]
    assert promotion["previous_champion_version"] == 1 and promotion["champion_version"] == 2
    assert promotion["rule"] == "improvement" and promotion["test_clips"] == 20
    comparison = promotion["comparison"]
    assert comparison["champion_version"] == "1" and comparison["difference"]["value"] > 0
    assert promotion["behaviour"]["passed"]
    assert set(promotion["behaviour"]["unchanged"]) == {
        "gain_-20db", "shift_2s", "resample_44100hz_2ch", "mp3_128kbps"
    }  # fmt: skip
    mlflow.set_tracking_uri(_store(repo))
    try:
        tags = (
            mlflow.MlflowClient()
            .get_model_version_by_alias("gtzan-genre-classifier", "champion")
            .tags
        )
    finally:
        mlflow.set_tracking_uri(None)
    assert tags["data_source"].startswith("local (") and tags["data_clips"] == "70"
    assert tags["training_clips"] == "50" and tags["test_clips"] == "20"

    runs = _runs(repo)
    records = [json.loads(path.read_text()) for path in (repo / "data/train").glob("*.json")]
    real_parents = {record["run_id"] for record in records}  # the demo run's are there too
    parents = runs[runs["tags.mlflow.parentRunId"].isna()]
    names = set(parents["tags.mlflow.runName"])
    assert {
        f"train-{family} [handcrafted features, song-grouped split]" for family in families
    } <= names
    assert {
        f"train-{family} [both features, song-grouped split]" for family in E2E_CANDIDATES
    } <= names
    assert {"evaluate [song-grouped]", "pca [30 s features]"} <= names
    trials = runs[runs["tags.mlflow.parentRunId"].isin(real_parents)]
    # Each study's trials, in the same experiment as the parents.
    assert len(real_parents) == len(families) + len(E2E_CANDIDATES)
    assert len(trials) == sum(E2E_TRIALS.values()) + sum(E2E_TRIALS[f] for f in E2E_CANDIDATES)
    assert (runs["tags.git_commit"].str.len() >= 40).all()
    assert runs["tags.dvc.data_raw_md5"].notna().all()


# Before the experiments below add runs of the same names to the store.
@pytest.mark.network
def test_the_mlflow_ui_shows_the_stages_trials_comparison_and_champion(
    pipeline, repo_root, tmp_path, artifacts_dir
):
    """`make mlflow-ui` on the pipeline's store, in headless Chromium (tests/mlflow_ui_checks.py):
    two classic baselines' training runs with their nested trials, compared side by side, and
    the champion's alias on the registered model's page."""
    repo, env, *_ = pipeline
    show_ui(repo_root, repo, env, tmp_path, artifacts_dir, UI_FAMILIES)


def test_a_log_off_a_terminal_holds_no_progress_bar_frames(pipeline):
    """`dvc repro` with its output captured, as in CI or `make pipeline > log`: no library drew a
    progress bar into it (carriage returns, backspaces, ANSI escape codes)."""
    _, _, first, _ = pipeline
    frames = [match.start() for match in re.finditer(r"[\r\b\x1b]", first)]
    assert not frames, [first[max(0, at - 80) : at + 40] for at in frames[:3]]


def test_the_demo_run_promoted_a_champion_that_passed_the_gate(pipeline):
    *_, demo = pipeline
    assert demo["promoted"] is True and demo["rule"] == "first", demo["reason"]
    assert demo["behaviour"]["passed"] and demo["version"] == 1


def test_predict_answers_for_a_real_clip_with_the_champion(pipeline, gtzan_mini):
    repo, env, *_ = pipeline
    clip = gtzan_mini / "genres" / "rock" / "rock.00006.wav"
    output = _run(["gtzan-mlops", "predict", str(clip)], repo, env)
    line = next(line for line in output.splitlines() if line.startswith(str(clip)))
    genre = line.split(": ", 1)[1].split()[0]
    assert genre in yaml.safe_load((repo / "params.yaml").read_text())["genres"]


def test_second_repro_does_nothing(pipeline):
    repo, env, *_ = pipeline
    output = _run(["dvc", "repro"], repo, env)
    assert _stages_run(output) == set(), output


def _changed_stages(repo: Path, env: dict[str, str]) -> set[str]:
    """The stages `dvc status` finds changed: the names heading its listing."""
    status = json.loads(_run(["dvc", "status", "--json"], repo, env) or "{}")
    return {name.split(":")[-1] for name in status}


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text, (path, old)
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


def test_edits_outside_the_computation_rerun_no_stage(pipeline):
    """A help string and a docstring of the command line, the listening page and the report
    code compute nothing a stage writes: `dvc status` finds every stage up to date. A comment in
    the hand-crafted feature code reruns features and what imports it, never fetch or duplicates
    (the outputs it writes are then the same, so DVC goes no further)."""
    repo, env, *_ = pipeline
    package = repo / "src" / "gtzan_mlops"
    try:
        _edit(package / "cli.py", '"fetch or generate the audio', '"fetch (or generate) the audio')
        _edit(package / "cli.py", '"""`gtzan-mlops <command>`', '"""The `gtzan-mlops <command>`')
        _edit(package / "apps" / "listen_page.html", "<title>", "<title>Listen: ")
        _edit(package / "stages" / "report.py", '"""', '"""Edited. ')  # a command, no stage
        for module in sorted((package / "reports").glob("[a-z]*.py")):
            _edit(module, '"""', '"""Edited. ')
        assert _changed_stages(repo, env) == set()
    finally:
        _run(["git", "checkout", "--", "src"], repo, env)
    try:
        handcrafted = package / "features" / "handcrafted.py"
        handcrafted.write_text(handcrafted.read_text() + "# a comment\n", encoding="utf-8")
        changed = _changed_stages(repo, env)
        assert "features" in changed and not changed & {"fetch", "duplicates"}, changed
    finally:
        _run(["git", "checkout", "--", "src"], repo, env)
    assert _changed_stages(repo, env) == set()


def test_changed_feature_parameter_reruns_only_the_features_stage(pipeline):
    repo, env, *_ = pipeline
    # The features stage tracks its resources, which change no value: features rerun (reading the
    # per-clip cache), write identical tables, and DVC leaves every downstream stage alone.
    set_params(repo / "params.yaml", {"resources.features.workers": 1})
    output = _run(["dvc", "repro"], repo, env)
    assert _stages_run(output) == {"features"}, output
    _commit(repo, env, "resources.features.workers")


def test_exp_run_of_a_search_space_reruns_only_that_family(pipeline):
    """Another search space is another study: a new parent run, tagged with the experiment."""
    repo, env, *_ = pipeline
    output = _run(
        ["dvc", "exp", "run", "-n", "sgd-wider", "-S", "train.sgd.space.alpha.high=0.5"],
        repo,
        env,
    )
    assert _stages_run(output) == {"train@sgd-handcrafted", "evaluate", "promote"}, output
    runs = _runs(repo)
    tagged = runs[runs["tags.dvc.exp_name"] == "sgd-wider"]
    assert set(tagged["tags.mlflow.runName"]) >= {
        "train-sgd [handcrafted features, song-grouped split]",
        "sgd-handcrafted-trial-000",
    }
    # The README's view: what changed between experiments, and the winner.
    shown = _run(
        ["dvc", "exp", "show", "--no-pager", "--csv", "--only-changed", "--keep", "winner.*"],
        repo,
        env,
    )
    columns = shown.splitlines()[0].split(",")
    assert {"winner", "winner_selection.value", "train.sgd.space.alpha.high"} <= set(columns)
    assert "winner_test_song_macro_f1.low" in columns
    assert len(columns) < 15, columns


def test_queued_experiment_runs_in_a_temporary_copy_into_the_same_store(pipeline):
    """More trials continue the same study: the queued run's new trial, tagged with the
    experiment, joins the first ones under the stage's parent run, in the real repository's
    store (not the temporary copy's)."""
    repo, env, *_ = pipeline
    queue = ["dvc", "exp", "run", "--queue", "-n", "queued-nb", "-S"]
    _run([*queue, f"train.naive_bayes.n_trials={E2E_TRIALS['naive_bayes'] + 1}"], repo, env)
    _run(["dvc", "queue", "start"], repo, env)
    deadline = time.monotonic() + 600
    while "queued-nb" not in _run(["dvc", "exp", "ls", "--all-commits"], repo, env):
        assert time.monotonic() < deadline, _run(["dvc", "queue", "status"], repo, env)
        time.sleep(5)
    status = _run(["dvc", "queue", "status"], repo, env)
    assert "Success" in status, status
    _run(["dvc", "queue", "stop"], repo, env)
    runs = _runs(repo)
    parent_name = "train-naive_bayes [handcrafted features, song-grouped split]"
    # The real clips' study (the demo set's has a parent run of the same name).
    record = json.loads((repo / "data/train/naive_bayes-handcrafted.json").read_text())
    parent = runs[runs["run_id"] == record["run_id"]]
    assert parent["tags.mlflow.runName"].tolist() == [parent_name]
    queued = runs[runs["tags.dvc.exp_name"] == "queued-nb"]
    added = E2E_TRIALS["naive_bayes"]
    assert f"naive_bayes-handcrafted-trial-{added:03d}" in set(queued["tags.mlflow.runName"])
    trials = runs[runs["tags.mlflow.parentRunId"] == parent["run_id"].iloc[0]]
    assert sorted(trials["tags.mlflow.runName"]) == [
        f"naive_bayes-handcrafted-trial-{number:03d}" for number in range(added + 1)
    ]


def test_push_and_pull_round_trip_audio_and_features(pipeline):
    repo, env, *_ = pipeline
    _run(["dvc", "push"], repo, env)
    tables = ["data/manifest.csv", "data/features/features_3_sec.csv"]
    before = {name: (repo / name).read_bytes() for name in tables}
    clip = repo / "data/raw/genres/jazz/jazz.00002.wav"
    clip_bytes = clip.read_bytes()
    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(repo / "data" / "raw")
    for name in tables:
        (repo / name).unlink()
    _run(["dvc", "pull"], repo, env)
    assert {name: (repo / name).read_bytes() for name in tables} == before
    assert clip.read_bytes() == clip_bytes
    assert len(list((repo / "data/raw/genres").glob("*/*.wav"))) == 70


def test_a_worse_model_on_the_same_data_leaves_the_champion(pipeline):
    """A third run on the same clips whose only candidate is a barely trained network: it is
    registered, compared with the champion on the same test clips, and not promoted."""
    repo, env, *_ = pipeline
    set_params(
        repo / "params.yaml",
        {
            "evaluate.candidates": ["fnn_simple"],
            "train.candidate_feature_sets": [],
            "train.fnn_simple.space.epochs": 1,
            "train.fnn_simple.space.learning_rate": 1.0e-5,
        },
    )
    _run(["dvc", "repro"], repo, env)
    promotion = json.loads((repo / "reports/promote/promotion.json").read_text())
    assert promotion["model"] == "fnn_simple-handcrafted"
    assert promotion["promoted"] is False and promotion["champion_version"] == 2
    assert promotion["comparison"]["difference"]["value"] < 0, promotion["reason"]
    assert promotion["behaviour"] is None  # the gate runs only for a challenger it could stop
    assert promotion["version"] >= 3
