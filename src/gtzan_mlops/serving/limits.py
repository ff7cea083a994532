"""What one request to the served model may cost and read, and how long it may take.

The bounds are the served model's config (settings.schema.ServedConfig: params `serving` and the
quality gates of `data`), logged with the model and overridable at serve time, e.g.
`SERVING_MODEL_CONFIG='{"max_rows": 4}' mlflow models serve`: rows per request and their total
size; per file its encoded size, and from its header, before anything is decoded, its channels,
sample rate, duration and decoded size. A logged config is read back through the same pydantic
model params.yaml's settings are checked by (read_served_config).

Time: a request's budget (`request_timeout_s`) runs from its arrival at the served app's guard
(REQUEST_ARRIVAL); past it the work on it stops (RequestTimeout: HTTP 503), and a request that
finds no free decoding slot within `max_queue_wait_s` is refused (ServerBusy: HTTP 429).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from gtzan_mlops.data.audio import DecodeLimits
from gtzan_mlops.data.quality import QualityGates
from gtzan_mlops.settings.loading import ConfigError
from gtzan_mlops.settings.schema import ServedConfig

# A model logged before the max_peak gate existed had none, and keeps none.
BEFORE_MAX_PEAK = {"max_peak": math.inf}
# A model logged before admission existed waited for a slot as long as MLflow's default request
# timeout allowed, and ran until then.
BEFORE_ADMISSION = {"max_queue_wait_s": 60.0, "request_timeout_s": 60.0}
# Set in the request's context by the served app's guard (serving/guard.py) when the request
# arrives: the model's time budget runs from then, not from when MLflow has parsed the body.
REQUEST_ARRIVAL: ContextVar[float | None] = ContextVar("gtzan_request_arrival", default=None)

_GATES = ("min_duration_s", "silence_peak", "max_peak")  # params `data`, not `serving`
_STAND_IN_MAX_PEAK = 1000.0  # any valid gate: replaced by BEFORE_MAX_PEAK once checked


def read_served_config(config: Mapping[str, Any]) -> ServedConfig:
    """A served model's config as logged (with serve-time overrides), checked by ServedConfig;
    a ConfigError names every problem (`serving.max_rows must be at least 1, got 0`)."""
    values = {**BEFORE_ADMISSION, **config}
    if values.get("audio_root") == "":  # an empty override names no folder, as null does
        values["audio_root"] = None
    # Without a max_peak gate (logged before it existed), the rest is checked as usual, with a
    # valid gate standing in, and the gate is then left open as it was (BEFORE_MAX_PEAK).
    open_gate = "max_peak" not in values
    if open_gate:
        values["max_peak"] = _STAND_IN_MAX_PEAK
    try:
        checked = ServedConfig.model_validate(values)
    except ValidationError as error:
        problems = (_problem(problem) for problem in error.errors(include_url=False))
        raise ConfigError("; ".join(dict.fromkeys(problems))) from None
    return checked.model_copy(update=BEFORE_MAX_PEAK) if open_gate else checked


def _problem(problem: ErrorDetails) -> str:
    """One problem of a served config, named by its params.yaml key."""
    name = str(problem["loc"][0]) if problem["loc"] else ""
    key = f"{'data' if name in _GATES else 'serving'}.{name}"
    kind, given = problem["type"], problem.get("input")
    message = problem["msg"].removeprefix("Value error, ")
    if kind == "extra_forbidden":
        return f"{key}: unknown setting"
    if kind == "missing":
        return f"{key} is missing"
    if not name:  # a check across settings
        return message
    field = ServedConfig.model_fields[name]
    if kind == "greater_than_equal":
        message = f"must be at least {problem['ctx']['ge']}"
    elif kind == "greater_than":
        message = f"must be above {problem['ctx']['gt']}"
    elif kind == "bool_type":
        message = "must be true or false"
    elif field.annotation in (int, float) and not _is_number(given):
        message = "must be a number"
    return f"{key} {message[:1].lower()}{message[1:]}, got {given!r}"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def decode_limits(config: ServedConfig) -> DecodeLimits:
    """What decoding one song may cost, from its header before any sample is decoded."""
    return DecodeLimits(
        max_seconds=config.max_audio_seconds,
        max_channels=config.max_channels,
        max_sample_rate=config.max_sample_rate,
        max_decoded_mib=config.max_decoded_mib,
    )


def quality_gates(config: ServedConfig) -> QualityGates:
    """The gates a decoded song must pass: the pipeline's own (params `data`)."""
    return QualityGates(config.min_duration_s, config.silence_peak, config.max_peak)


class RequestTimeout(Exception):
    """The request ran past the scoring server's timeout: its work stops (HTTP 503)."""


class ServerBusy(RequestTimeout):
    """No decoding slot came free before the request's timeout (HTTP 429)."""


def request_deadline(request_timeout_s: float) -> float:
    """When work on the current request stops (time.monotonic()): `request_timeout_s` after it
    arrived at the served app's guard (REQUEST_ARRIVAL), else after now, and never later than
    the scoring server's own timeout (MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT, which
    `mlflow models serve` sets): past it the client has its 504, and nobody reads the answer."""
    arrival = REQUEST_ARRIVAL.get()
    budget = request_timeout_s
    scoring_timeout = os.environ.get("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT")
    with contextlib.suppress(ValueError):
        budget = min(budget, float(scoring_timeout)) if scoring_timeout else budget
    return (time.monotonic() if arrival is None else arrival) + budget
