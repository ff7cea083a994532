"""The shape of the code: what dvc.yaml says each stage depends on is what it imports and where
params.yaml's paths say, lint holds with the pipeline's run-time folders present, and every
command's --help is short."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gtzan_mlops import cli, tracking

PACKAGE = Path(cli.__file__).resolve().parent
MAX_MODULE_LINES = 500


def _stages(repo_root: Path) -> dict[str, dict]:
    return yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]


def test_stage_deps_are_the_code_that_computes_the_outputs(repo_root):
    """Each stage depends on its own module and the compute packages it imports, nothing else:
    not the command line, the settings' validation, MLflow logging or report drawing."""
    for name, stage in _stages(repo_root).items():
        command = re.match(r"gtzan-mlops (\w+)", stage["cmd"]).group(1)
        module = cli.COMMANDS[command][0].removeprefix("gtzan_mlops.")
        loaded = cli.LOADED_BY_PATH.get(command, ())
        expected = {f"src/gtzan_mlops/{file}" for file in tracking.compute_closure(module, *loaded)}
        declared = {dep for dep in stage["deps"] if dep.startswith("src/")}
        assert declared == expected, (
            f"dvc.yaml stage {name}: missing {sorted(expected - declared)}, "
            f"not computing {sorted(declared - expected)} (tools/stage_deps.py rewrites them)"
        )
        assert not {dep for dep in declared if dep.count("/") < 3}, (name, "top-level module")


def test_every_data_path_of_dvc_yaml_comes_from_params_paths(repo_root):
    """The stages read their paths from params.yaml's `paths`; dvc.yaml writes them the same way,
    so the two cannot drift apart."""
    params_paths = yaml.safe_load((repo_root / "params.yaml").read_text())["paths"]
    checked = 0
    for name, stage in _stages(repo_root).items():
        for kind in ("deps", "outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                path = entry if isinstance(entry, str) else next(iter(entry))
                if path.startswith("src/"):
                    continue
                match = re.match(r"\$\{paths\.(\w+)\}", path)
                assert match and match[1] in params_paths, f"dvc.yaml stage {name}: {path}"
                checked += 1
    assert checked > 30


def test_promote_alone_stays_out_of_dvcs_run_cache(repo_root):
    """DVC's run-cache restores a stage's outputs instead of running it when its deps and params
    match an earlier run. Right for the train stages (their records name runs that still exist),
    wrong for promote, whose decision depends on who holds the alias now: back on params seen
    before, a restored report would name an old champion and register nothing. DVC keeps a stage
    with a persist output out of the run-cache (dvc/stage/cache.py, `_can_hash`)."""
    from dvc.repo import Repo

    with Repo(str(repo_root)) as repo:
        persisting = sorted(
            stage.addressing for stage in repo.index.stages if any(o.persist for o in stage.outs)
        )
    assert persisting == ["promote"]


def test_module_closure_follows_imports_inside_functions():
    closure = tracking.module_closure("stages.promote")
    # serving imports musicnn inside a function, and promote reaches serving
    assert "serving/model_entry.py" not in closure  # loaded by path, see cli.LOADED_BY_PATH
    assert "features/musicnn.py" in closure and "stages/promote.py" in closure
    assert "apps/listen.py" not in closure and "cli.py" in closure


def test_compute_closure_leaves_out_the_layers_that_compute_nothing():
    closure = tracking.compute_closure("stages.promote", "serving.model_entry")
    assert "serving/model_entry.py" in closure and "stages/promote.py" in closure
    assert not [file for file in closure if file.split("/")[0] in {"settings", "reports", "cli.py"}]
    assert "tracking.py" not in closure and "console.py" not in closure


def test_sub_packages_hold_only_their_docstring_in_init():
    """An __init__.py runs on every import of its package but is no stage's dependency."""
    for init in PACKAGE.glob("*/__init__.py"):
        tree = ast.parse(init.read_text(encoding="utf-8"))
        assert len(tree.body) == 1 and isinstance(tree.body[0], ast.Expr), init


def test_no_module_is_longer_than_the_limit(repo_root):
    """One job per file: none of the package's, the benchmarks' or the tools' modules passes
    MAX_MODULE_LINES."""
    modules = [*PACKAGE.rglob("*.py"), *(repo_root / "benchmarks").glob("*.py")]
    modules += [*(repo_root / "tools").glob("*.py")]
    long = {
        str(path.relative_to(repo_root)): lines
        for path in modules
        if (lines := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
    }
    assert not long, long


def test_the_import_contracts_hold(repo_root):
    """The layers of pyproject.toml's [tool.importlinter] (also run by `make lint`)."""
    lint_imports = str(Path(sys.executable).parent / "lint-imports")
    result = subprocess.run([lint_imports], cwd=repo_root, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "BROKEN" not in result.stdout and result.stdout.count("KEPT") >= 2


def test_lint_passes_beside_the_pipelines_run_time_folders(repo_root, tmp_path):
    """`make lint` after `make pipeline`: the stores the stages create at the root (MLflow's,
    Optuna's journals, DVC's data) must not change how ruff sorts imports."""
    for name in ("src", "tests", "benchmarks"):
        shutil.copytree(
            repo_root / name, tmp_path / name, ignore=shutil.ignore_patterns("*.egg-info")
        )
    shutil.copy(repo_root / "pyproject.toml", tmp_path)
    for store in (tracking.OPTUNA_DIR, tracking.TRACKING_DIR, "data", "metrics", "reports"):
        (tmp_path / store).mkdir(exist_ok=True)
        (tmp_path / store / "placeholder.journal").write_text("")
    ruff = str(Path(sys.executable).parent / "ruff")
    result = subprocess.run(
        [ruff, "check", "src", "tests", "benchmarks"], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_help_is_a_short_description_and_the_options(command, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main([command, "--help"])
    assert exited.value.code == 0
    shown = capsys.readouterr().out
    description = shown.split("\n\n")[1]
    assert len(description.splitlines()) <= 4, shown
    assert "options:" in shown
