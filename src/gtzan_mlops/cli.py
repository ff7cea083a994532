"""`gtzan-mlops <command>`: one entry point for every stage and app, and the command line they
share: --params and --set, the typed settings they load, one line of output, exit codes."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gtzan_mlops.cluster import ClusterError
from gtzan_mlops.settings.loading import PARAMS_FILE, ConfigError, find_repo_root, load_settings
from gtzan_mlops.tracking import champion_uri

if TYPE_CHECKING:
    from gtzan_mlops.settings.schema import Settings

# Each command is a module with `main(argv) -> int`; imported on demand so that a light command
# (fetch, predict) does not pay for TensorFlow's import.
COMMANDS = {
    "fetch": ("gtzan_mlops.stages.fetch", "fetch or generate the audio and write the manifest"),
    "duplicates": (
        "gtzan_mlops.stages.duplicates",
        "group the clips that are copies of one recording",
    ),
    "features": ("gtzan_mlops.stages.features", "extract the 57 features per clip and per segment"),
    "pca": ("gtzan_mlops.stages.pca", "2-D PCA scatter of the clip features"),
    "split": (
        "gtzan_mlops.stages.split",
        "write the train/valid/test split and check it for leakage",
    ),
    "train": ("gtzan_mlops.stages.train", "tune and train one model family with Optuna and MLflow"),
    "evaluate": (
        "gtzan_mlops.stages.evaluate",
        "evaluate the trained models on the held-out test set",
    ),
    "promote": (
        "gtzan_mlops.stages.promote",
        "register the best model and move the champion alias",
    ),
    "predict": ("gtzan_mlops.apps.predict", "classify audio files with the champion model"),
    "serve": ("gtzan_mlops.apps.serve", "serve the champion on MLflow's scoring app, guarded"),
    "listen": ("gtzan_mlops.apps.listen", "a local page to try the champion on a song"),
    "report": (
        "gtzan_mlops.stages.report",
        "reproduce the published accuracy table, honestly split",
    ),
}


# Modules a command runs without importing them: promote logs serving/model_entry.py as the
# served model's code (MLflow's models from code). Part of what the stage depends on.
LOADED_BY_PATH = {"promote": ("serving.model_entry",)}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: gtzan-mlops <command> [options]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in {"-h", "--help"}:
        print(_usage())
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"gtzan-mlops: unknown command '{command}'\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    return int(module.main(rest) or 0)


def add_params_argument(parser: argparse.ArgumentParser) -> None:
    """--params: the params.yaml a command reads (default: the repository's, see params_file)."""
    parser.add_argument(
        "--params", type=Path, default=None, help="params.yaml (default: the repository's)"
    )


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the commands that run a model (predict, serve, listen): which model, and
    the params.yaml whose champion it is by default (chosen_model_uri)."""
    parser.add_argument("--model", default="", help="model URI (default: the champion)")
    add_params_argument(parser)


def params_file(args: argparse.Namespace) -> Path:
    """The params.yaml of a parsed command: its --params, else the repository's."""
    return args.params or find_repo_root() / PARAMS_FILE


def add_stage_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every stage command takes: which params.yaml, and one-off overrides."""
    add_params_argument(parser)
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting of params.yaml for this run only, e.g. --set split.seed=1 "
        "(for runs outside DVC, such as `mlflow run`; DVC users change params.yaml or use "
        "`dvc exp run -S`)",
    )


def stage_settings(args: argparse.Namespace) -> tuple[Settings, Path]:
    """The settings (overrides applied) and the repository root a stage command runs against."""
    root = args.params.resolve().parent if args.params else find_repo_root()
    return load_settings(args.params or root / PARAMS_FILE, args.overrides), root


def chosen_model_uri(args: argparse.Namespace) -> str:
    """The model a command was asked to run (add_model_arguments): its --model, else the
    champion of the model that its params.yaml's promote.model_name names (read only then)."""
    return args.model or champion_uri(load_settings(params_file(args)).promote.model_name)


def stage_arguments(args: argparse.Namespace) -> list[str]:
    """The --params and --set options of a parsed stage command, to hand on to a sub-process."""
    forwarded = ["--params", str(params_file(args).resolve())]
    for assignment in args.overrides:
        forwarded += ["--set", assignment]
    return forwarded


def stage_main(
    name: str,
    description: str | None,
    run: Callable[..., Any],
    argv: list[str] | None,
    *,
    errors: tuple[type[Exception], ...] = (),
    describe: Callable[[Any], str] | None = None,
    arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> int:
    """The command line of a stage: parse its options (`arguments`, then --params and --set),
    call `run(settings, root)` (`run(settings, root, args)` when it has `arguments` of its own),
    print one line, `describe(result)` or `summary_line`; a ConfigError, a Ray cluster it cannot
    use (ClusterError), a missing file or one of `errors` ends it with its message on stderr and
    exit status 1, without a traceback."""

    parser = argparse.ArgumentParser(
        prog=f"gtzan-mlops {name}",
        # The first paragraph of the stage's docstring: what it does, not how.
        description=description.strip().split("\n\n")[0] if description else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if arguments is not None:
        arguments(parser)
    add_stage_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings, root = stage_settings(args)
        result = run(settings, root, args) if arguments is not None else run(settings, root)
    except (ConfigError, ClusterError, FileNotFoundError, *errors) as error:
        print(f"gtzan-mlops {name}: {error}", file=sys.stderr)
        return 1
    if result is not None:
        print(describe(result) if describe else summary_line(name, result))
    return 0


def summary_line(name: str, result: Any) -> str:
    """A stage's result as one line, `<stage>: key value, key value`, like every other stage's."""
    if isinstance(result, dict):
        parts = [
            f"{key.replace('_', ' ')} {value}"
            for key, value in result.items()
            if not isinstance(value, (dict, list))
        ]
        return f"{name}: " + ", ".join(parts)
    return f"{name}: {result}"


if __name__ == "__main__":
    sys.exit(main())
