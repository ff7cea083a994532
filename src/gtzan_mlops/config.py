"""Locating the repository and reading `params.yaml`: the one source of configuration."""

from __future__ import annotations

import os
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
    """Read params.yaml (default: the one at the repository root)."""
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
