"""The shape of the code: what dvc.yaml says each stage depends on is what it imports and where
params.yaml's paths say, lint holds with the pipeline's run-time folders present, and every
command's --help is short."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gtzan_mlops import cli, tracking

# Loaded by promote by path (MLflow's models-from-code entry file), not imported.
LOADED_BY_PATH = {"promote": ("serving_model",)}


def _stages(repo_root: Path) -> dict[str, dict]:
    return yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]


def test_stage_deps_are_the_modules_the_stage_imports(repo_root):
    for name, stage in _stages(repo_root).items():
        command = re.match(r"gtzan-mlops (\w+)", stage["cmd"]).group(1)
        module = cli.COMMANDS[command][0].rsplit(".", 1)[1]
        expected = {
            f"src/gtzan_mlops/{file}"
            for file in tracking.module_closure(module, *LOADED_BY_PATH.get(name, ()))
        }
        declared = {dep for dep in stage["deps"] if dep.startswith("src/")}
        assert declared == expected, (
            f"dvc.yaml stage {name}: missing {sorted(expected - declared)}, "
            f"not imported {sorted(declared - expected)}"
        )


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


def test_no_stage_imports_another_command(repo_root):
    """Stages talk through their DVC outputs; what two of them share is a library."""
    commands = {module.rsplit(".", 1)[1] for module, *_ in cli.COMMANDS.values()}
    for name, stage in _stages(repo_root).items():
        module = cli.COMMANDS[re.match(r"gtzan-mlops (\w+)", stage["cmd"]).group(1)][0]
        own = module.rsplit(".", 1)[1]
        imported = {file.removesuffix(".py") for file in tracking.module_closure(own)}
        assert not (imported & commands) - {own}, f"stage {name} imports {imported & commands}"


def test_module_closure_follows_imports_inside_functions():
    closure = tracking.module_closure("promote")
    assert "serving.py" in closure and "musicnn.py" in closure  # via serving, lazily
    assert "listen.py" not in closure


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
