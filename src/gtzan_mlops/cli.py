"""`gtzan-mlops <command>`: one entry point for every pipeline stage; dvc.yaml calls these."""

from __future__ import annotations

import importlib
import sys

# Each command is a module with `main(argv) -> int`; imported on demand so that a light command
# (fetch, predict) does not pay for TensorFlow's import.
COMMANDS = {
    "fetch": ("gtzan_mlops.fetch", "fetch or generate the audio and write the manifest"),
    "features": ("gtzan_mlops.extract", "extract the 57 features per clip and per segment"),
    "pca": ("gtzan_mlops.pca", "2-D PCA scatter of the clip features"),
    "split": ("gtzan_mlops.split", "write the train/valid/test split and check it for leakage"),
    "train": ("gtzan_mlops.train", "tune and train one model family with Optuna and MLflow"),
    "evaluate": ("gtzan_mlops.evaluate", "evaluate the trained models on the held-out test set"),
    "promote": ("gtzan_mlops.promote", "register the best model and move the champion alias"),
    "predict": ("gtzan_mlops.predict", "classify audio files with the champion model"),
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


if __name__ == "__main__":
    sys.exit(main())
