"""The committed baseline: the demo run's dvc.lock, metrics and reports are in git, so a fresh
clone's `dvc exp show` and `dvc metrics diff` have something to compare an experiment with; and
that baseline is the one today's code and params.yaml would give (a change to the computing code
or to a setting without a new baseline fails here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

BASELINE = ("dvc.lock", "metrics/evaluate.json", "reports/evaluate/models.md")


def _dvc(args: list[str], cwd: Path) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    result = subprocess.run(["dvc", *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def clone(tmp_path_factory, repo_root) -> Path:
    """A fresh clone of the repository's last commit, as a new user gets it."""
    target = tmp_path_factory.mktemp("baseline") / "clone"
    subprocess.run(["git", "clone", "-q", str(repo_root), str(target)], check=True)
    return target


def test_a_fresh_clone_holds_the_demo_baseline(clone):
    for name in BASELINE:
        assert (clone / name).is_file(), f"{name} is not committed: run make pipeline, commit it"
    lock = yaml.safe_load((clone / "dvc.lock").read_text())
    fetch = lock["stages"]["fetch"]["params"]["params.yaml"]
    assert fetch["data"]["source"] == "demo"  # the baseline is the demo run of `make pipeline`


def test_dvc_exp_show_and_metrics_diff_compare_with_the_baseline(clone):
    committed = json.loads((clone / "metrics/evaluate.json").read_text())
    shown = json.loads(_dvc(["exp", "show", "--json"], clone))
    baseline = next(row for row in shown if row["rev"] != "workspace")
    metrics = baseline["data"]["metrics"]["metrics/evaluate.json"]["data"]
    assert metrics["winner"] == committed["winner"]
    assert metrics["winner_selection"] == committed["winner_selection"]
    # An experiment's metrics against the baseline: a changed score shows as a difference.
    changed = {**committed, "winner_selection": {**committed["winner_selection"], "value": 0.0}}
    (clone / "metrics/evaluate.json").write_text(json.dumps(changed))
    try:
        diff = json.loads(_dvc(["metrics", "diff", "--json"], clone))
    finally:
        subprocess.run(["git", "checkout", "-q", "metrics/evaluate.json"], cwd=clone, check=True)
    entry = diff["metrics/evaluate.json"]["winner_selection.value"]
    assert entry["old"] == committed["winner_selection"]["value"] and entry["new"] == 0.0


def test_the_baseline_was_made_by_todays_code_and_settings(clone):
    """`dvc status` of the fresh clone: its outputs are missing (not in git), but no stage's code
    or params differ from what the committed dvc.lock recorded."""
    status = json.loads(_dvc(["status", "--json"], clone))
    stale = {
        stage: sorted(path for path in changes if path.startswith("src/") or path == "params.yaml")
        for stage, entries in status.items()
        for entry in entries
        if isinstance(entry, dict)
        for changes in [entry.get("changed deps", {})]
    }
    stale = {stage: paths for stage, paths in stale.items() if paths}
    assert not stale, (
        f"the committed baseline predates these changes {stale}: run `make pipeline` and commit "
        "dvc.lock, metrics/ and reports/"
    )


def test_a_fresh_clones_repro_retrains_and_promotes_into_its_own_store(clone):
    """The train records and promote's report name runs in the MLflow store of the run that made
    the baseline, which a clone does not have. DVC caches them, git does not hold them: each train
    stage and promote miss an output, so `dvc repro` in the clone reruns them (and evaluate, which
    reads the new records) instead of skipping them when the features come out the same, and the
    clone's own store gets models and a champion."""
    lock = yaml.safe_load((clone / "dvc.lock").read_text())["stages"]
    makers = [name for name in lock if name.startswith(("train", "promote"))]
    assert len(makers) > 1
    for name in makers:
        outs = [out["path"] for out in lock[name]["outs"]]
        assert any(not (clone / path).exists() for path in outs), f"{name}: all outputs committed"
    deps = [dep["path"] for dep in lock["evaluate"]["deps"]]
    assert any(path.startswith("data/train") for path in deps), deps
    for ignored in ("data/train", "reports/promote"):
        assert not (clone / ignored).exists(), f"{ignored} is committed"
    # The decision's key numbers are a metric of the baseline, for `dvc exp show` to compare.
    assert (clone / "metrics/promotion.json").is_file()
