"""Locating the repository and reading `params.yaml` into the typed settings object."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydantic import ValidationError

    from gtzan_mlops.settings.schema import Settings

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


def load_settings(path: Path | str | None = None, overrides: Sequence[str] = ()) -> Settings:
    """params.yaml (default: the one at the repository root) with `overrides` (`a.b=value`)
    applied, validated: the typed settings object every stage and library receives."""
    params_path = Path(path) if path is not None else find_repo_root() / PARAMS_FILE
    return validate_settings(
        apply_overrides(read_params(params_path), list(overrides)), params_path
    )


def validate_settings(params: dict[str, Any], source: Path | str = PARAMS_FILE) -> Settings:
    """`params` checked against the schema (settings.schema), with values of their types; a
    ConfigError lists every unknown, missing or mistyped setting by its path."""
    from pydantic import ValidationError

    from gtzan_mlops.settings import schema

    try:
        return schema.validated(params)
    except ValidationError as error:
        raise ConfigError(describe_errors(error, str(source))) from None


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


def _key_path(location: tuple[int | str, ...]) -> str:
    """`train.sgd.space.alpha.high` from pydantic's location, without the union's tags."""
    tags = {"int", "float", "categorical", "fixed", "function-after[_window_fits()]"}
    parts = [str(part) for part in location if str(part) not in tags]
    return ".".join(parts) or "(top level)"


def describe_errors(error: ValidationError, source: str) -> str:
    """One line per problem, each naming the setting by its path."""
    lines = []
    for problem in error.errors(include_url=False):
        path = _key_path(problem["loc"])
        kind = problem["type"]
        if kind == "extra_forbidden":
            lines.append(f"{source}: unknown setting '{path}'")
        elif kind == "missing":
            lines.append(f"{source}: missing setting '{path}'")
        else:
            message = problem["msg"].removeprefix("Value error, ")
            given = problem.get("input")
            shown = "" if isinstance(given, dict | list) else f", got {given!r}"
            lines.append(f"{source}: {path}: {message}{shown}")
    return "\n".join(dict.fromkeys(lines))
