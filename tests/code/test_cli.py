"""One command line: settings through --set only (integers as integers, lists as [a, b]),
`gtzan-mlops --version`, and the same exit status everywhere: 0 ok, 1 some input failed, 2 usage
or configuration."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml
from live_services import clean_env, free_port, small_project
from mlflow_helpers import log_served, log_sklearn, reference_classifier, sqlite_store

from gtzan_mlops import cli
from gtzan_mlops.apps import listen, predict, serve
from gtzan_mlops.serving.guard import SERVED_MODEL_ENV
from gtzan_mlops.settings.loading import read_params

# score-catalog builds its own parser (apps/score_catalog.py): aligned with command_parser later.
OWN_PARSER = {"score-catalog"}


@pytest.fixture(scope="module")
def project(tmp_path_factory, repo_root) -> Path:
    """A small project with synthetic feature tables and no duplicates table."""
    return small_project(tmp_path_factory.mktemp("cli") / "project", repo_root, ["knn"], 2)


@pytest.fixture(scope="module")
def served_model(tmp_path_factory, reference_table) -> tuple[str, str]:
    """(store URI, model URI) of a served model logged here (logistic regression on the real
    reference table)."""
    with sqlite_store(tmp_path_factory.mktemp("cli-store")) as store:
        yield store, log_served(log_sklearn(reference_classifier(reference_table)), level="segment")


@pytest.fixture
def params_copy(tmp_path, repo_root) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(read_params(repo_root / "params.yaml")), encoding="utf-8")
    return path


def test_version_is_the_packages(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"gtzan-mlops {version('gtzan-mlops')}\n"
    shown = subprocess.run(
        [sys.executable, "-m", "gtzan_mlops", "--version"], capture_output=True, text=True
    )
    assert shown.returncode == 0 and shown.stdout.split() == ["gtzan-mlops", version("gtzan-mlops")]


def test_help_lists_the_commands_the_settings_and_the_exit_status(capsys):
    assert cli.main(["--help"]) == 0
    shown = capsys.readouterr().out
    assert all(f"  {command}  " in shown for command in cli.COMMANDS), shown
    assert "--set KEY=VALUE" in shown and "lists as [a, b]" in shown
    codes = shown.split("exit status, the same for every command:\n")[1].splitlines()
    assert [line.split()[:2] for line in codes if line[2] != " "] == [
        ["0", "ok"],
        ["1", "some"],
        ["2", "usage"],
    ]
    assert (cli.EXIT_OK, cli.EXIT_INPUT_FAILED, cli.EXIT_USAGE) == (0, 1, 2)


def test_no_command_or_an_unknown_one_is_a_usage_error(capsys):
    assert cli.main([]) == 2
    assert "usage: gtzan-mlops <command>" in capsys.readouterr().err
    assert cli.main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


@pytest.mark.parametrize("command", sorted(set(cli.COMMANDS) - OWN_PARSER))
def test_every_command_takes_params_and_set_and_names_its_exit_status(command, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main([command, "--help"])
    assert exited.value.code == 0
    shown = capsys.readouterr().out
    assert "--params PARAMS" in shown and "--set KEY=VALUE" in shown, shown
    assert shown.rstrip().endswith(cli.EXIT_STATUS_LINE), shown


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--family", "knn", "--n-trials", "3"], "unrecognized arguments: --n-trials 3"),
        (["train", "--family", "knn", "--workers", "2"], "unrecognized arguments: --workers 2"),
        (["report", "--families", "knn"], "unrecognized arguments: --families knn"),
        (["report", "--seeds", "0"], "unrecognized arguments: --seeds 0"),
        (["serve", "--workers", "2"], "unrecognized arguments: --workers 2"),
        (["predict", "a.wav", "--top", "2.7"], "--top: expected a whole number, got '2.7'"),
        (["listen", "--port", "0"], "--port: expected a number of at least 1, got 0"),
        (["serve", "--port", "70000"], "--port: expected a port from 1 to 65535, got 70000"),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, list) else "",
)
def test_settings_are_not_options_and_options_are_checked(argv, message, capsys):
    """A setting has one way in (--set); what stays an option is parsed strictly."""
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_a_stages_three_exit_codes(project, capsys):
    """split: 0 when it writes the split; 2 for a setting it cannot take (an integer given 2.7,
    refused before any work); 1 for an input an earlier stage writes that is missing."""
    params = ["--params", str(project / "params.yaml")]
    summary = project / "data/split/summary.json"
    summary.unlink()
    assert cli.main(["split", *params, "--set", "split.seed=2.7"]) == 2
    error = capsys.readouterr().err
    assert (
        f"gtzan-mlops split: {project / 'params.yaml'}: split.seed: must be an integer, got 2.7"
    ) in error
    assert not summary.exists()

    assert cli.main(["split", *params, "--set", "split.group_duplicates=true"]) == 1
    error = capsys.readouterr().err
    assert f"{project / 'data/duplicates.csv'}: no such file (run the duplicates stage)" in error
    assert not summary.exists()

    assert cli.main(["split", *params]) == 0
    assert "song-grouped split" in capsys.readouterr().out and summary.is_file()


def test_an_integer_setting_is_never_truncated(project, capsys):
    """`--set train.knn.n_trials=2.7` is refused, not run as 2 trials (the old --n-trials)."""
    records = project / "data/train"
    argv = ["train", "--family", "knn", "--params", str(project / "params.yaml")]
    assert cli.main([*argv, "--set", "train.knn.n_trials=2.7"]) == 2
    assert "train.knn.n_trials: must be an integer, got 2.7" in capsys.readouterr().err
    assert not records.exists() or not any(records.iterdir())


def test_the_model_commands_take_set_and_refuse_a_bad_one(params_copy, capsys):
    """predict, serve and listen read and check the settings with --set applied (exit 2)."""
    for app, argv in ((predict, ["song.wav"]), (serve, []), (listen, [])):
        bad = [*argv, "--params", str(params_copy), "--set", "promote.model_nam=other"]
        assert app.main(bad) == 2, app.__name__
        assert "no setting 'promote.model_nam' to override" in capsys.readouterr().err


def test_serve_runs_resources_serve_processes(params_copy, monkeypatch, capsys):
    """The server's processes are a setting (resources.serve.processes), given to uvicorn."""
    started = []
    monkeypatch.setattr(os, "execve", lambda *call: started.append(call))
    argv = ["--params", str(params_copy), "--set", "promote.model_name=another-name"]
    serve.main([*argv, "--set", "resources.serve.processes=3", "--port", "5099"])
    (program, command, environment), *_ = started
    assert program == sys.executable and command[0] == sys.executable
    assert command[command.index("--workers") + 1] == "3"
    assert command[command.index("--port") + 1] == "5099"
    assert environment[SERVED_MODEL_ENV] == "models:/another-name@champion"
    assert "models:/another-name@champion on http://127.0.0.1:5099" in capsys.readouterr().out

    assert serve.main([*argv, "--set", "resources.serve.processes=2.5"]) == 2
    assert "resources.serve.processes: must be an integer, got 2.5" in capsys.readouterr().err


def test_serve_exits_2_when_its_model_cannot_be_served(params_copy, tmp_path):
    """uvicorn ends with its own status 3 when the app does not start; serve's is 2, as for
    every other command that cannot load its model."""
    with sqlite_store(tmp_path / "store") as store:
        command = [str(Path(sys.executable).parent / "gtzan-mlops"), "serve"]
        command += ["--model", "models:/no-such-model@champion", "--params", str(params_copy)]
        command += ["--port", str(free_port())]
        result = subprocess.run(
            command,
            env=clean_env(MLFLOW_TRACKING_URI=store),
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert result.returncode == 2, result.stdout + result.stderr
    assert (
        "gtzan-mlops serve: cannot load the model models:/no-such-model@champion: Registered "
        "Model with name=no-such-model not found"
    ) in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr


def test_a_taken_port_is_a_usage_error_of_serve_and_listen(served_model, params_copy):
    """The model loads, the port is taken: uvicorn's start-up failure (its status 3) is exit
    status 2 in both server commands."""
    store, model_uri = served_model
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = str(taken.getsockname()[1])
        assert listen.main(["--model", model_uri, "--port", port]) == 2
        command = [str(Path(sys.executable).parent / "gtzan-mlops"), "serve", "--model", model_uri]
        result = subprocess.run(
            [*command, "--params", str(params_copy), "--port", port],
            env=clean_env(MLFLOW_TRACKING_URI=store),
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "address already in use" in result.stderr, result.stderr
