"""Locating the repository and reading `params.yaml`: the one source of configuration."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

PARAMS_FILE = "params.yaml"


class ConfigError(ValueError):
    """A setting in params.yaml is missing or invalid."""


def find_repo_root(start: Path | None = None) -> Path:
    """The nearest folder at or above `start` (default: the working directory) holding params.yaml.

    DVC runs every stage from the repository root, and `dvc exp run` from a temporary copy of
    it, so the working directory's own params.yaml is the one in force.
    """
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / PARAMS_FILE).is_file():
            return folder
    raise ConfigError(f"no {PARAMS_FILE} found in {here} or any folder above it")


def load_params(path: Path | str | None = None) -> dict[str, Any]:
    """Read and validate params.yaml (default: the one at the repository root)."""
    params_path = Path(path) if path is not None else find_repo_root() / PARAMS_FILE
    return validate_params(read_params(params_path), params_path)


def validate_params(params: dict[str, Any], source: Path | str = PARAMS_FILE) -> dict[str, Any]:
    """`params` checked against the schema (params_schema), with values of their types; a
    ConfigError lists every unknown, missing or mistyped setting by its path."""
    from pydantic import ValidationError

    from gtzan_mlops import params_schema

    try:
        return params_schema.validated(params)
    except ValidationError as error:
        raise ConfigError(params_schema.describe_errors(error, str(source))) from None


def read_params(path: Path | str | None = None) -> dict[str, Any]:
    """params.yaml as written, not yet validated."""
    params_path = Path(path) if path is not None else find_repo_root() / PARAMS_FILE
    try:
        with open(params_path, encoding="utf-8") as handle:
            params = yaml.safe_load(handle)
    except FileNotFoundError as error:
        raise ConfigError(f"{params_path}: file not found") from error
    except yaml.YAMLError as error:
        raise ConfigError(f"{params_path}: not valid YAML: {error}") from error
    if not isinstance(params, dict):
        raise ConfigError(f"{params_path}: expected a mapping at the top level")
    return params


def section(params: dict[str, Any], dotted_key: str) -> Any:
    """params['a']['b'] for 'a.b', with an error naming the missing key."""
    value: Any = params
    walked = []
    for key in dotted_key.split("."):
        walked.append(key)
        if not isinstance(value, dict) or key not in value:
            raise ConfigError(f"{PARAMS_FILE}: missing setting '{'.'.join(walked)}'")
        value = value[key]
    return value


def resolve_path(path: str | os.PathLike[str], root: Path | None = None) -> Path:
    """A path from params.yaml, relative to the repository root unless absolute."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute():
        return candidate
    return ((root or find_repo_root()) / candidate).resolve()


def apply_overrides(params: dict[str, Any], assignments: list[str]) -> dict[str, Any]:
    """params with `a.b=value` assignments applied (values parsed as YAML: `3`, `0.5`, `null`,
    `[a, b]`); an unknown key is an error, so a typo never passes silently."""
    for assignment in assignments:
        key, separator, text = assignment.partition("=")
        if not separator or not key:
            raise ConfigError(f"--set expects KEY=VALUE, got {assignment!r}")
        *parents, last = key.split(".")
        node = section(params, ".".join(parents)) if parents else params
        if not isinstance(node, dict) or last not in node:
            raise ConfigError(f"{PARAMS_FILE}: no setting '{key}' to override")
        node[last] = yaml.safe_load(text)
    return params


def add_params_argument(parser: argparse.ArgumentParser) -> None:
    """--params: the params.yaml a command reads (default: the repository's, see params_file)."""
    parser.add_argument(
        "--params", type=Path, default=None, help="params.yaml (default: the repository's)"
    )


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the commands that run a model (predict, serve, listen): which model, and
    the params.yaml whose champion it is by default (tracking.chosen_model_uri)."""
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


def stage_params(args: argparse.Namespace) -> tuple[dict[str, Any], Path]:
    """The params (overrides applied) and the repository root a stage command runs against."""
    root = args.params.resolve().parent if args.params else find_repo_root()
    path = args.params or root / PARAMS_FILE
    return validate_params(apply_overrides(read_params(path), args.overrides), path), root


def stage_arguments(args: argparse.Namespace) -> list[str]:
    """The --params and --set options of a parsed stage command, to hand on to a sub-process."""
    forwarded = ["--params", str(params_file(args).resolve())]
    for assignment in args.overrides:
        forwarded += ["--set", assignment]
    return forwarded


def number_setting(
    mapping: dict[str, Any],
    key: str,
    where: str,
    kind: Callable[[Any], Any],
    minimum: float | None = None,
) -> Any:
    """mapping[key] as `kind` (int or float), with an error naming `where.key`."""
    if key not in mapping:
        raise ConfigError(f"params.yaml: missing setting '{where}.{key}'")
    value = mapping[key]
    try:
        if isinstance(value, bool) or (kind is int and float(value) != int(value)):
            raise ValueError
        number = kind(value)
        if not math.isfinite(number):
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(
            f"params.yaml: {where}.{key} must be {'an integer' if kind is int else 'a number'}, "
            f"got {value!r}"
        ) from None
    if minimum is not None and number < minimum:
        raise ConfigError(f"params.yaml: {where}.{key} must be at least {minimum}, got {value!r}")
    return number
