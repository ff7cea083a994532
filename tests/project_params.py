"""The repository's params.yaml as the stages get it, for tests that call a stage's functions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gtzan_mlops.settings.loading import read_params, validate_settings

PARAMS_FILE = Path(__file__).resolve().parents[1] / "params.yaml"


def project_params(updates: dict[str, Any] | None = None, validate: bool = True) -> Any:
    """params.yaml with dotted keys (`split.seed`) set to other values, validated: the typed
    settings a stage receives. `validate=False` returns the raw mapping instead (to write a
    params.yaml, or to change it further before `validate_settings`)."""
    params = read_params(PARAMS_FILE)
    for dotted, value in (updates or {}).items():
        *parents, last = dotted.split(".")
        node = params
        for key in parents:
            node = node[key]
        if last not in node:
            raise KeyError(f"params.yaml has no setting {dotted!r}")
        node[last] = value
    return validate_settings(params) if validate else params
