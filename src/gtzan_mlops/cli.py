"""`gtzan-mlops <command>`: one entry point for every stage and app, and the command line they
share: --params and --set, the typed settings they load, one line of output, exit codes."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

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
    "score-catalog": (
        "gtzan_mlops.apps.score_catalog",
        "score every audio file of a folder or list on Ray, resumably",
    ),
    "report": (
        "gtzan_mlops.stages.report",
        "reproduce the published accuracy table, honestly split",
    ),
}


# Modules a command runs without importing them: promote logs serving/model_entry.py as the
# served model's code (MLflow's models from code). Part of what the stage depends on.
LOADED_BY_PATH = {"promote": ("serving.model_entry",)}


# The exit status of every command: the stages (stage_main), the apps and this dispatcher.
EXIT_OK = 0
EXIT_INPUT_FAILED = 1
EXIT_USAGE = 2
EXIT_STATUS = """exit status, the same for every command:
  0  ok
  1  some input failed: a file given to predict or score-catalog could not be classified
     (the others were), an input an earlier stage writes is missing, a worker or a trial
     failed; or an unexpected error, shown with its traceback. (A stage that excludes a bad
     clip records it, in data/manifest.csv or failures.csv, and exits 0: one bad clip must
     not stop `dvc repro`.)
  2  usage or configuration: a bad option, no params.yaml, an invalid setting or --set,
     a file a setting names missing or unusable, a Ray cluster the command cannot use, a
     model it cannot load or serve"""
EXIT_STATUS_LINE = (
    "exit status: 0 ok, 1 some input failed, 2 usage or configuration (`gtzan-mlops --help`)"
)
SETTINGS_HELP = """Every command takes --params PATH (default: the repository's params.yaml) and
--set KEY=VALUE, repeatable: a setting of params.yaml for this run only, its value read as YAML
(integers as integers, lists as [a, b]), checked like the file, e.g.
  gtzan-mlops train --family knn --set train.knn.n_trials=20 --set resources.train.workers=2
  gtzan-mlops report --set "report.families=[knn, svm]" --set "report.seeds=[0, 1]"
Paths in settings are relative to the repository root. Other options (a model URI, --host,
--port, which family) are not settings; `gtzan-mlops <command> --help` lists them."""


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: gtzan-mlops <command> [options]", "       gtzan-mlops --version", ""]
    lines += ["commands:"]
    lines += [f"  {name.ljust(width)}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return "\n".join([*lines, "", SETTINGS_HELP, "", EXIT_STATUS])


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in {"-h", "--help"}:
        print(_usage())
        return EXIT_OK
    if args and args[0] == "--version":
        from importlib.metadata import version  # only here: it costs every command 20 ms

        print(f"gtzan-mlops {version('gtzan-mlops')}")
        return EXIT_OK
    if not args:
        print(_usage(), file=sys.stderr)
        return EXIT_USAGE
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"gtzan-mlops: unknown command '{command}'\n\n{_usage()}", file=sys.stderr)
        return EXIT_USAGE
    module = importlib.import_module(COMMANDS[command][0])
    return int(module.main(rest) or 0)


def command_parser(name: str, description: str | None) -> argparse.ArgumentParser:
    """The parser of `gtzan-mlops <name>`, its help ending with the exit status line."""
    return argparse.ArgumentParser(
        prog=f"gtzan-mlops {name}",
        description=description,
        epilog=EXIT_STATUS_LINE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_stage_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every command takes: which params.yaml, and one-off settings."""
    parser.add_argument(
        "--params", type=Path, default=None, help="params.yaml (default: the repository's)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting of params.yaml for this run only, the value as YAML: --set split.seed=1, "
        "--set 'report.seeds=[0, 1]' (DVC stages: change params.yaml or use `dvc exp run -S`, "
        "so that DVC sees it)",
    )


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the commands that run a model (predict, serve, listen): which model, and
    like every command --params and --set (promote.model_name names the default champion)."""
    parser.add_argument(
        "--model", default="", help="model URI (default: the champion of promote.model_name)"
    )
    add_stage_arguments(parser)


def positive_integer(text: str) -> int:
    """An option's whole number of at least 1 (argparse type): `--top 2.7` is a usage error."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number of at least 1, got {value}")
    return value


def port_number(text: str) -> int:
    """An option's TCP port, 1 to 65535 (argparse type)."""
    value = positive_integer(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 1 to 65535, got {value}")
    return value


def params_file(args: argparse.Namespace) -> Path:
    """The params.yaml of a parsed command: its --params, else the repository's."""
    return args.params or find_repo_root() / PARAMS_FILE


def stage_settings(args: argparse.Namespace) -> tuple[Settings, Path]:
    """The settings (overrides applied) and the repository root a stage command runs against."""
    root = args.params.resolve().parent if args.params else find_repo_root()
    return load_settings(args.params or root / PARAMS_FILE, args.overrides), root


class ModelCommand(NamedTuple):
    """What a command that runs a model (add_model_arguments) runs: the model's URI, and its
    settings and repository root (None when it read none: only a --model was given)."""

    model_uri: str
    settings: Settings | None
    root: Path | None


def model_command(args: argparse.Namespace, *, reads_settings: bool = False) -> ModelCommand:
    """The model a command was asked to run: its --model, else the champion of promote.model_name.
    The settings (--set applied) are read and checked when the command `reads_settings`, needs
    the champion's name, or was given --params or --set; given only --model, predict runs
    outside the repository (on MLFLOW_TRACKING_URI). ConfigError for a bad file or --set."""
    if args.model and not (reads_settings or args.params or args.overrides):
        return ModelCommand(args.model, None, None)
    settings, root = stage_settings(args)
    return ModelCommand(args.model or champion_uri(settings.promote.model_name), settings, root)


def model_load_failure(command: str, model_uri: str, error: BaseException) -> str:
    """The one line a command that cannot load its model ends with: the first line of the
    reason, and how to get a model."""
    reason = (str(error).strip() or type(error).__name__).splitlines()[0]
    return (
        f"gtzan-mlops {command}: cannot load the model {model_uri}: {reason} "
        "(run `dvc repro` to train and promote a champion, or pass --model URI)"
    )


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
    print one line, `describe(result)` or `summary_line`. Its message on stderr, without a
    traceback, ends it: a ConfigError or a Ray cluster it cannot use (ClusterError) with exit
    status 2 (usage or configuration), a missing input file or one of `errors` with 1."""

    # The first paragraph of the stage's docstring: what it does, not how.
    parser = command_parser(name, description.strip().split("\n\n")[0] if description else None)
    if arguments is not None:
        arguments(parser)
    add_stage_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Off a terminal, Keras hands its progress bars (ANSI and backspace frames, e.g. from MLflow's
    # input-example check) to absl's logger at INFO: not for a log file.
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        settings, root = stage_settings(args)
        result = run(settings, root, args) if arguments is not None else run(settings, root)
    # First: a ConfigError is a ValueError, which a stage's `errors` may hold.
    except (ConfigError, ClusterError) as error:
        print(f"gtzan-mlops {name}: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (FileNotFoundError, *errors) as error:
        print(f"gtzan-mlops {name}: {error}", file=sys.stderr)
        return EXIT_INPUT_FAILED
    if result is not None:
        print(describe(result) if describe else summary_line(name, result))
    return EXIT_OK


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
