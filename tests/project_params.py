"""The repository's params.yaml as the stages get it, for tests that call a stage's functions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gtzan_mlops.settings.loading import load_settings, validate_settings

PARAMS_FILE = Path(__file__).resolve().parents[1] / "params.yaml"


def project_params(updates: dict[str, Any] | None = None, validate: bool = True) -> dict[str, Any]:
    """params.yaml, validated, with dotted keys (`split.seed`) set to other values: every
    setting a stage reads. `validate=False` keeps a value the schema would refuse, to test the
    stage's own check."""
    params = load_settings(PARAMS_FILE)
    for dotted, value in (updates or {}).items():
        *parents, last = dotted.split(".")
        node = params
        for key in parents:
            node = node[key]
        if last not in node:
            raise KeyError(f"params.yaml has no setting {dotted!r}")
        node[last] = value
    return validate_settings(params) if validate else params
