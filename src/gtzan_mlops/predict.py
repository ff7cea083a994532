"""`gtzan-mlops predict FILE [FILE ...] [--model URI]`: the genre of audio files.

Loads the served model (default `models:/<promote.model_name>@champion` from the project's
tracking store) and classifies each file on its own, so a bad file is reported with its reason
while the others are still classified. Prints per file the genre and the three most probable
genres; exits 1 if any file failed, 2 if the model cannot be loaded.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from gtzan_mlops.config import ConfigError, find_repo_root, load_params
from gtzan_mlops.serving import GENRE_COLUMN, PATH_COLUMN

_ROW_PREFIX = re.compile(r"^row \d+: ")


@dataclass(frozen=True)
class FileResult:
    path: str
    genre: str | None = None
    top: tuple[tuple[str, float], ...] = ()
    error: str | None = None


def default_model_uri(params: dict[str, Any]) -> str:
    name = params.get("promote", {}).get("model_name", "gtzan-genre-classifier")
    return f"models:/{name}@champion"


def _clean_error(message: str, path: str) -> str:
    """The model's message without its request-row prefix, always naming the file."""
    match = _ROW_PREFIX.match(message)
    if match:
        message = message[match.end() :]
    return message if path in message else f"{path}: {message}"


def classify_file(model: Any, path: str, top_k: int = 3) -> FileResult:
    """One file through the served model; errors come back in the result, not raised."""
    from mlflow.exceptions import MlflowException

    try:
        output = model.predict(pd.DataFrame({PATH_COLUMN: [path]}))
    except MlflowException as error:
        return FileResult(path, error=_clean_error(error.message, path))
    row = output.iloc[0]
    probabilities = {
        column.removeprefix("prob_"): float(row[column])
        for column in output.columns
        if column.startswith("prob_")
    }
    ranked = sorted(probabilities.items(), key=lambda item: item[1], reverse=True)[:top_k]
    return FileResult(path, genre=str(row[GENRE_COLUMN]), top=tuple(ranked))


def format_result(result: FileResult) -> str:
    if result.error:
        return f"{result.path}: FAILED: {result.error}"
    ranked = ", ".join(f"{genre} {probability:.2f}" for genre, probability in result.top)
    return f"{result.path}: {result.genre}  ({ranked})"


def load_model(model_uri: str, root: Path | None = None) -> Any:
    """The served model from the project's tracking store (or MLFLOW_TRACKING_URI)."""
    import mlflow

    from gtzan_mlops import tracking

    tracking.use_store(root)
    return mlflow.pyfunc.load_model(model_uri)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gtzan-mlops predict", description=__doc__)
    parser.add_argument("files", nargs="+", help="audio files (WAV, AU, FLAC, MP3, OGG)")
    parser.add_argument("--model", default="", help="model URI (default: the champion)")
    parser.add_argument("--top", type=int, default=3, help="how many genres to list per file")
    parser.add_argument(
        "--params", type=Path, default=None, help="params.yaml (default: repo root's)"
    )
    args = parser.parse_args(argv)

    model_uri = args.model
    if not model_uri:
        try:
            params_path = args.params or find_repo_root() / "params.yaml"
            model_uri = default_model_uri(load_params(params_path))
        except ConfigError as error:
            print(f"gtzan-mlops predict: {error}; pass --model", file=sys.stderr)
            return 2
    try:
        model = load_model(model_uri, args.params.resolve().parent if args.params else None)
    except Exception as error:  # any loading failure ends the command with its reason
        print(
            f"gtzan-mlops predict: cannot load the model {model_uri}: {error}\n"
            "(run `dvc repro` to train and promote a champion, or pass --model URI)",
            file=sys.stderr,
        )
        return 2

    failed = 0
    for path in args.files:
        result = classify_file(model, path, args.top)
        if result.error:
            failed += 1
            print(format_result(result), file=sys.stderr)
        else:
            print(format_result(result))
    if failed:
        print(f"{failed} of {len(args.files)} files could not be classified", file=sys.stderr)
    return 1 if failed else 0
