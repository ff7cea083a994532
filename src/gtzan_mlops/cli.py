"""`gtzan-mlops <command>`: one entry point for every pipeline stage; dvc.yaml calls these."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable
from typing import Any

# Each command is a module with `main(argv) -> int`; imported on demand so that a light command
# (fetch, predict) does not pay for TensorFlow's import.
COMMANDS = {
    "fetch": ("gtzan_mlops.fetch", "fetch or generate the audio and write the manifest"),
    "duplicates": ("gtzan_mlops.duplicates", "group the clips that are copies of one recording"),
    "features": ("gtzan_mlops.extract", "extract the 57 features per clip and per segment"),
    "pca": ("gtzan_mlops.pca", "2-D PCA scatter of the clip features"),
    "split": ("gtzan_mlops.split", "write the train/valid/test split and check it for leakage"),
    "train": ("gtzan_mlops.train", "tune and train one model family with Optuna and MLflow"),
    "evaluate": ("gtzan_mlops.evaluate", "evaluate the trained models on the held-out test set"),
    "promote": ("gtzan_mlops.promote", "register the best model and move the champion alias"),
    "predict": ("gtzan_mlops.predict", "classify audio files with the champion model"),
    "serve": ("gtzan_mlops.serve", "serve the champion on MLflow's scoring app, guarded"),
    "listen": ("gtzan_mlops.listen", "a local page to try the champion on a song"),
    "report": ("gtzan_mlops.report", "reproduce the published accuracy table, honestly split"),
}


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


def progress_off(show_progress: bool) -> bool | None:
    """tqdm's `disable`: None draws bars on a terminal only, never into a log (dvc repro's)."""
    return None if show_progress else True


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
    call `run(params, root)` (`run(params, root, args)` when it has `arguments` of its own),
    print one line, `describe(result)` or `summary_line`; a ConfigError, a missing file or one
    of `errors` ends it with its message on stderr and exit status 1, without a traceback."""
    from gtzan_mlops.config import ConfigError, add_stage_arguments, stage_params

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
        params, root = stage_params(args)
        result = run(params, root, args) if arguments is not None else run(params, root)
    except (ConfigError, FileNotFoundError, *errors) as error:
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
