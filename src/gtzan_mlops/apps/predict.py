"""`gtzan-mlops predict FILE [FILE ...]`: the genre of whole songs with the served model.

Each file goes to the model (default: the champion of promote.model_name) on its own, as the
bytes a client would send, so a bad file is reported with its reason while the others are
classified. Exits 1 if any file failed, 2 if the settings are invalid or the model cannot be
loaded.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from gtzan_mlops.cli import (
    EXIT_INPUT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    add_model_arguments,
    command_parser,
    model_command,
    model_load_failure,
    positive_integer,
)
from gtzan_mlops.serving.spec import (
    BASE64_COLUMN,
    GENRE_COLUMN,
    TIMELINE_COLUMN,
    TIMELINE_PARAM,
    WARNING_COLUMN,
)
from gtzan_mlops.settings.loading import ConfigError

_ROW_PREFIX = re.compile(r"^row \d+: ")


@dataclass(frozen=True)
class FileResult:
    path: str
    genre: str | None = None
    top: tuple[tuple[str, float], ...] = ()
    error: str | None = None
    warning: str | None = None
    timeline: tuple[dict[str, Any], ...] = ()  # per segment: start_s, end_s, genre, probabilities


def _clean_error(message: str, path: str) -> str:
    """The model's message without its request-row prefix, naming the file."""
    match = _ROW_PREFIX.match(message)
    if match:
        message = message[match.end() :]
    message = message.replace(f"{BASE64_COLUMN}[0]", path)
    return message if path in message else f"{path}: {message}"


def classify_file(model: Any, path: str, top_k: int = 3, timeline: bool = False) -> FileResult:
    """One file through the served model; errors come back in the result, not raised."""
    import base64

    from mlflow.exceptions import MlflowException

    try:
        encoded = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    except FileNotFoundError:
        return FileResult(path, error=f"{path}: no such file")
    except OSError as error:
        return FileResult(path, error=f"{path}: unreadable ({error.strerror or error})")
    try:
        output = model.predict(
            pd.DataFrame({BASE64_COLUMN: [encoded]}), params={TIMELINE_PARAM: timeline}
        )
    except MlflowException as error:
        return FileResult(path, error=_clean_error(error.message, path))
    row = output.iloc[0]
    probabilities = {
        column.removeprefix("prob_"): float(row[column])
        for column in output.columns
        if column.startswith("prob_")
    }
    ranked = sorted(probabilities.items(), key=lambda item: item[1], reverse=True)[:top_k]
    warning = row.get(WARNING_COLUMN)
    return FileResult(
        path,
        genre=str(row[GENRE_COLUMN]),
        top=tuple(ranked),
        warning=warning if isinstance(warning, str) and warning else None,
        timeline=tuple(row[TIMELINE_COLUMN]) if timeline else (),
    )


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def timeline_runs(
    timeline: tuple[dict[str, Any], ...],
) -> list[tuple[float, float, str, float, int]]:
    """Consecutive segments of the same genre merged: (start s, end s, genre, its mean
    probability over them, segments)."""
    runs: list[tuple[float, float, str, float, int]] = []
    for segment in timeline:
        genre, share = segment[GENRE_COLUMN], segment["probabilities"][segment[GENRE_COLUMN]]
        if runs and runs[-1][2] == genre:
            start, _, _, mean, count = runs[-1]
            runs[-1] = (
                start,
                segment["end_s"],
                genre,
                (mean * count + share) / (count + 1),
                count + 1,
            )
        else:
            runs.append((segment["start_s"], segment["end_s"], genre, share, 1))
    return runs


def format_result(result: FileResult) -> str:
    if result.error:
        return f"{result.path}: FAILED: {result.error}"
    ranked = ", ".join(f"{genre} {probability:.2f}" for genre, probability in result.top)
    lines = [f"{result.path}: {result.genre}  ({ranked})"]
    if result.warning:
        lines.append(f"  warning: {result.warning}")
    for start, end, genre, share, count in timeline_runs(result.timeline):
        unit = "segment" if count == 1 else "segments"
        lines.append(f"  {_clock(start)}-{_clock(end)}  {genre} {share:.2f}  ({count} {unit})")
    return "\n".join(lines)


def load_model(model_uri: str, root: Path | None = None) -> Any:
    """The served model from the project's tracking store (or MLFLOW_TRACKING_URI)."""
    import mlflow

    from gtzan_mlops import tracking

    tracking.use_store(root)
    return mlflow.pyfunc.load_model(model_uri)


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("predict", __doc__.split("\n\n")[0].split(": ", 1)[1])
    parser.add_argument("files", nargs="+", help="audio files (WAV, AU, FLAC, MP3, OGG)")
    add_model_arguments(parser)
    parser.add_argument(
        "--top", type=positive_integer, default=3, help="how many genres to list per file"
    )
    parser.add_argument(
        "--timeline",
        action="store_true",
        help="also print the genre through each song (runs of segments of one genre)",
    )
    args = parser.parse_args(argv)

    try:
        model_uri, _, root = model_command(args)
    except ConfigError as error:
        hint = "" if args.model else " (or pass --model URI)"
        print(f"gtzan-mlops predict: {error}{hint}", file=sys.stderr)
        return EXIT_USAGE
    try:
        model = load_model(model_uri, root)
    except Exception as error:  # any loading failure ends the command with its reason
        print(model_load_failure("predict", model_uri, error), file=sys.stderr)
        return EXIT_USAGE

    failed = 0
    for path in args.files:
        result = classify_file(model, path, args.top, args.timeline)
        if result.error:
            failed += 1
            print(format_result(result), file=sys.stderr)
        else:
            print(format_result(result))
    if failed:
        print(f"{failed} of {len(args.files)} files could not be classified", file=sys.stderr)
    return EXIT_INPUT_FAILED if failed else EXIT_OK
