"""The served app: MLflow's scoring server behind a guard that bounds each request before MLflow
spends anything on it.

`mlflow models serve` runs `uvicorn mlflow.pyfunc.scoring_server.app:app`: MLflow's FastAPI app,
built by `scoring_server.init` around the loaded model, which reads and parses every body (JSON,
CSV, parquet) before the model sees it, and has no hook to change that. `gtzan-mlops serve` runs
`build_app` instead: the same MLflow app, built the same way from the same model and settings
(SERVING_MODEL_CONFIG overrides included), inside RequestGuard:

- Only JSON reaches MLflow: a POST to /invocations whose Content-Type is not application/json
  gets 415 before its body is read. MLflow's CSV and parquet readers build the whole table
  before the model's limits run (a 4.5 KiB parquet body expands to gigabytes) and answer their
  own errors with a stack trace.
- The body is bounded by its Content-Length before any of it is read and by counting while it
  is read (413): 4/3 x `max_request_mib` of base64 plus 1 MiB of JSON around it.
- Admission: at most `max_concurrent_decodes` requests are inside MLflow at once per worker
  process; the others wait in arrival order, and one that cannot start within
  `max_queue_wait_s` of its arrival gets 429 with Retry-After then, its body drained unread.
- The JSON is checked before MLflow parses it (UTF-8, syntax, nesting, one of MLflow's input
  keys, the model's parameters and their types), with messages that quote nothing of it:
  MLflow's own messages quote the body, whole.
- Time: the model's budget (`request_timeout_s`) runs from the request's arrival here
  (serving.limits.REQUEST_ARRIVAL); MLflow's own timeout is set to twice that, a backstop, so the
  model's 503 comes first and the request's work stops with it.
- Memory: after each request glibc is asked to hand back the pages it freed (malloc_trim);
  `gtzan-mlops serve` also sets its allocator's arenas and mmap threshold (resources.serve).
- Every error response is JSON {"error_code", "message"}: no stack trace, a message of at most
  MAX_ERROR_MESSAGE characters.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import math
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from http import HTTPStatus
from typing import Any

from gtzan_mlops.serving.limits import REQUEST_ARRIVAL
from gtzan_mlops.settings.schema import ServedConfig

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

SERVED_MODEL_ENV = "GTZAN_SERVED_MODEL"  # the model URI build_app loads (gtzan-mlops serve)
SCORING_PATH = "/invocations"
# MLflow's input keys (mlflow/pyfunc/scoring_server: dataframe_split, dataframe_records,
# instances, inputs); `params` may come beside one of them.
INPUT_KEYS = ("dataframe_split", "dataframe_records", "instances", "inputs")
PARAMS_KEY = "params"
MAX_ERROR_MESSAGE = 600  # characters of an error message that reach the client
JSON_FRAMING_BYTES = 2**20  # the JSON around the base64 audio, beyond 4/3 of it
_ERROR_BODY_KEPT = 64 * 2**10  # an inner error body past this is replaced, not parsed
_ERROR_CODES = {
    400: "BAD_REQUEST",
    404: "ENDPOINT_NOT_FOUND",
    405: "BAD_REQUEST",
    413: "REQUEST_LIMIT_EXCEEDED",
    415: "BAD_REQUEST",
    429: "REQUEST_LIMIT_EXCEEDED",
    503: "TEMPORARILY_UNAVAILABLE",
    504: "TEMPORARILY_UNAVAILABLE",
}


def body_limit_bytes(limits: ServedConfig) -> int:
    """The largest request body: the base64 of `max_request_mib` of audio and its JSON."""
    return math.ceil(limits.max_request_mib * 2**20 * 4 / 3) + JSON_FRAMING_BYTES


def error_body(status: int, message: str, error_code: str | None = None) -> bytes:
    """The JSON of an error answer, its message cut to MAX_ERROR_MESSAGE characters."""
    if len(message) > MAX_ERROR_MESSAGE:
        message = message[:MAX_ERROR_MESSAGE] + " [...]"
    code = error_code or _ERROR_CODES.get(status, "INTERNAL_ERROR")
    return json.dumps({"error_code": code, "message": message}).encode()


def plain_error(status: int, body: bytes) -> bytes:
    """An inner app's error body made safe to send: its error_code and message kept (cut), the
    rest (MLflow's `stack_trace`, with the server's paths) dropped; a body that is not such JSON,
    or too long to read, becomes the status's own phrase."""
    payload: Any = None
    if len(body) <= _ERROR_BODY_KEPT:
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError):
            payload = None
    if isinstance(payload, dict) and isinstance(payload.get("message"), str):
        code = payload.get("error_code")
        return error_body(status, payload["message"], code if isinstance(code, str) else None)
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:  # a status without a standard phrase
        phrase = "error"
    return error_body(status, phrase)


# JSON types of the parameter types a model's signature may declare (mlflow.types.DataType).
_PARAM_TYPES: dict[str, tuple[type, ...]] = {
    "boolean": (bool,),
    "string": (str,),
    "integer": (int,),
    "long": (int,),
    "float": (int, float),
    "double": (int, float),
}


def params_problem(values: Any, params: dict[str, str]) -> str | None:
    """Why a request's `params` do not fit the model's (name -> type name), naming the
    parameter, never quoting its value; None if they fit. MLflow's own message quotes it."""
    if not isinstance(values, dict):
        return f"{PARAMS_KEY} must be a JSON object"
    for name, value in values.items():
        if name not in params:
            known = ", ".join(sorted(params)) or "none"
            return f"{PARAMS_KEY}: unknown parameter (this model's: {known})"
        kinds = _PARAM_TYPES.get(params[name], (object,))
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            return f"{PARAMS_KEY}.{name} must be a JSON {params[name]}"
    return None


def json_problem(body: bytes, params: dict[str, str]) -> str | None:
    """Why a request body is not one MLflow's JSON input can be for a model with `params`
    (name -> type name), quoting nothing of it; None if it is one."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        return f"the body is not UTF-8 (invalid byte at offset {error.start})"
    try:
        document = json.loads(text)
    except RecursionError:
        return "the JSON is nested too deeply"
    except json.JSONDecodeError as error:
        return (
            f"the body is not valid JSON: {error.msg} at line {error.lineno} column {error.colno}"
        )
    expected = f"a JSON object with one of {', '.join(INPUT_KEYS)} (and optionally {PARAMS_KEY})"
    if not isinstance(document, dict):
        return f"the body must be {expected}"
    inputs = [key for key in INPUT_KEYS if key in document]
    if len(inputs) != 1 or set(document) - {*INPUT_KEYS, PARAMS_KEY}:
        return f"the body must be {expected}"
    if PARAMS_KEY in document:
        return params_problem(document[PARAMS_KEY], params)
    return None


class Admission:
    """At most `slots` requests inside at once; the rest wait in arrival order for at most
    `max_wait_s` from their arrival. One per worker process (it lives in its event loop)."""

    def __init__(self, slots: int, max_wait_s: float):
        self.slots = slots
        self.max_wait_s = max_wait_s
        self._free = slots
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._service_s: float | None = None  # moving average of an admitted request's time

    async def enter(self, arrival: float) -> bool:
        """Whether a slot was taken before `max_wait_s` after `arrival` (time.monotonic())."""
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return True
        remaining = arrival + self.max_wait_s - time.monotonic()
        if remaining <= 0:
            return False
        turn = asyncio.get_running_loop().create_future()
        self._waiters.append(turn)
        try:
            await asyncio.wait_for(turn, remaining)
        except TimeoutError:
            return False  # wait_for cancelled `turn`: leave() skips it
        except BaseException:
            if turn.done() and not turn.cancelled():
                self.leave(None)  # handed a slot just as the client went away: pass it on
            raise
        return True

    def leave(self, service_s: float | None) -> None:
        """Give the slot to the longest waiter, else free it; `service_s`: how long the request
        held it (for Retry-After)."""
        if service_s is not None:
            previous = self._service_s
            self._service_s = service_s if previous is None else 0.8 * previous + 0.2 * service_s
        while self._waiters:
            turn = self._waiters.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self._free += 1

    def retry_after_s(self) -> int:
        """Seconds until a slot is likely free for a new request: the queue ahead of it served
        at the recent pace (before any request has finished, the longest wait)."""
        waiting = sum(not turn.done() for turn in self._waiters)
        if self._service_s is None:
            return max(1, math.ceil(self.max_wait_s))
        return max(1, math.ceil(self._service_s * (waiting + 1) / self.slots))


class RequestGuard:
    """The ASGI app in front of MLflow's scoring app (see the module docstring)."""

    def __init__(self, app: ASGIApp, limits: ServedConfig, params: dict[str, str]):
        self.app = app
        self.limits = limits
        self.params = params  # the model's request parameters: name -> type name
        self.body_limit = body_limit_bytes(limits)
        self.admission = Admission(limits.max_concurrent_decodes, limits.max_queue_wait_s)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        send = _SafeErrors(send)
        if scope["path"] != SCORING_PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        arrival = time.monotonic()
        headers = {key.lower(): value for key, value in scope["headers"]}
        media_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if media_type != b"application/json":
            message = "the body must be JSON (Content-Type: application/json)"
            await _answer_unread(receive, send, self.body_limit, 415, message)
            return
        declared = headers.get(b"content-length", b"").strip()
        if declared.isdigit() and int(declared) > self.body_limit:
            await _answer(send, 413, self._too_large(), close=True)
            return
        if not await self.admission.enter(arrival):
            retry = [(b"retry-after", str(self.admission.retry_after_s()).encode())]
            message = "the server is busy: no slot came free in time; retry later"
            await _answer_unread(receive, send, self.body_limit, 429, message, retry)
            return
        started = time.monotonic()
        try:
            body = await _read(receive, self.body_limit)
            if body is None:
                await _answer(send, 413, self._too_large(), close=True)
                return
            problem = await asyncio.to_thread(json_problem, body, self.params)
            if problem is not None:
                await _answer(send, 400, problem)
                return
            token = REQUEST_ARRIVAL.set(arrival)
            try:
                await self.app(scope, _replay(body), send)
            finally:
                REQUEST_ARRIVAL.reset(token)
        except _ClientGone:
            return
        finally:
            self.admission.leave(time.monotonic() - started)
            await asyncio.to_thread(release_freed_memory)

    def _too_large(self) -> str:
        return (
            f"the body exceeds {self.body_limit / 2**20:.0f} MiB "
            f"(max_request_mib {self.limits.max_request_mib:g} of audio, base64 in JSON)"
        )


class _ClientGone(Exception):
    """The client disconnected before its body was read."""


async def _read(receive: Receive, limit: int) -> bytes | None:
    """The whole body, or None as soon as it passes `limit` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _drain(receive: Receive, limit: int) -> bool:
    """Read and drop a body the app will not use, so the client, still sending it, reads the
    answer instead of a reset; False if the client went away or the body passed `limit`."""
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return False
        size += len(message.get("body", b""))
        if size > limit:
            return False
        if not message.get("more_body", False):
            return True


async def _answer_unread(
    receive: Receive,
    send: Send,
    limit: int,
    status: int,
    message: str,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """Answer a request whose body the app will not use: the body is read and dropped first,
    so that a client still sending it reads the answer instead of a reset; past `limit` bytes
    the connection is closed after the answer instead."""
    drained = await _drain(receive, limit)
    await _answer(send, status, message, extra_headers, close=not drained)


def _replay(body: bytes) -> Receive:
    """A `receive` that hands the inner app the body already read, then waits like a client
    that has sent everything."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # never set: the client has nothing more to send
        return {"type": "http.disconnect"}

    return receive


async def _answer(
    send: Send,
    status: int,
    message: str,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
    close: bool = False,
) -> None:
    body = error_body(status, message)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *(extra_headers or []),
    ]
    if close:  # the rest of an oversized body is not read: the connection cannot be reused
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class _SafeErrors:
    """A `send` that passes successful responses through and rewrites error responses with
    plain_error (the status and other headers kept)."""

    def __init__(self, send: Send):
        self.send = send
        self.start: Message | None = None
        self.kept = bytearray()

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start" and message["status"] >= 400:
            self.start = message
            return
        if message["type"] != "http.response.body" or self.start is None:
            await self.send(message)
            return
        if len(self.kept) <= _ERROR_BODY_KEPT:
            self.kept += message.get("body", b"")
        if message.get("more_body", False):
            return
        status = self.start["status"]
        body = plain_error(status, bytes(self.kept))
        skipped = {b"content-length", b"content-type"}
        headers = [(k, v) for k, v in self.start.get("headers", []) if k.lower() not in skipped]
        headers += [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await self.send({"type": "http.response.start", "status": status, "headers": headers})
        await self.send({"type": "http.response.body", "body": body, "more_body": False})


try:
    _LIBC: Any = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc (musl, macOS): nothing to trim
    _LIBC = None


def release_freed_memory() -> None:
    """Hand the heap pages a finished request freed back to the OS: glibc keeps them in its
    arenas otherwise, and a request's decoded song and spectra would stay in the server's RSS."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def served_limits(model: Any) -> ServedConfig:
    """The limits of a loaded served model (its model config, overrides included)."""
    python_model = model.unwrap_python_model()
    limits = getattr(python_model, "limits", None)
    if not isinstance(limits, ServedConfig):
        raise TypeError("the served model is not the project's GenreClassifier")
    return limits


def build_app() -> RequestGuard:
    """The guarded MLflow scoring app of the model at $GTZAN_SERVED_MODEL (uvicorn --factory)."""
    from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT
    from mlflow.pyfunc import scoring_server

    model = scoring_server.load_model_with_mlflow_config(os.environ[SERVED_MODEL_ENV])
    limits = served_limits(model)
    schema = model.metadata.get_params_schema()
    params = {spec.name: spec.dtype.name for spec in schema.params} if schema else {}
    # MLflow's 504 is only a backstop: the model stops its work at request_timeout_s.
    backstop_s = math.ceil(2 * limits.request_timeout_s)  # MLflow reads whole seconds
    os.environ[MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.name] = str(backstop_s)
    return RequestGuard(scoring_server.init(model), limits, params)
