"""The request guard in front of MLflow's scoring app, driven in process through ASGI messages:
what it refuses before the inner app runs, admission and its 429s, and the errors it rewrites."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from mlflow_helpers import serving_limits

from gtzan_mlops.serving.guard import (
    MAX_ERROR_MESSAGE,
    Admission,
    RequestGuard,
    body_limit_bytes,
    json_problem,
    plain_error,
)
from gtzan_mlops.serving.limits import BEFORE_ADMISSION, REQUEST_ARRIVAL, read_served_config

GOOD = json.dumps(
    {"dataframe_split": {"columns": ["audio_base64"], "data": [["UklGRg=="]]}}
).encode()


class InnerApp:
    """MLflow's app stand-in: records what reached it, then answers after `seconds`."""

    def __init__(self, seconds: float = 0.0, status: int = 200, body: bytes = b'{"ok": 1}'):
        self.seconds, self.status, self.body = seconds, status, body
        self.bodies: list[bytes] = []
        self.arrivals: list[float | None] = []

    async def __call__(self, scope, receive, send) -> None:
        message = await receive()
        self.bodies.append(message["body"])
        self.arrivals.append(REQUEST_ARRIVAL.get())
        await asyncio.sleep(self.seconds)
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": self.body})


async def _call(
    app: Any,
    body: bytes | list[bytes] = GOOD,
    content_type: bytes = b"application/json",
    declare_length: bool = True,
    path: str = "/invocations",
) -> tuple[int, dict[bytes, bytes], bytes]:
    """One request through `app`; its status, headers and body."""
    chunks = body if isinstance(body, list) else [body]
    headers = [(b"content-type", content_type)]
    if declare_length:
        headers.append((b"content-length", str(sum(map(len, chunks))).encode()))
    scope = {"type": "http", "path": path, "method": "POST", "headers": headers}
    incoming = [
        {"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1}
        for i, chunk in enumerate(chunks)
    ]
    sent: list[dict] = []

    async def receive():
        if incoming:
            return incoming.pop(0)
        await asyncio.sleep(3600)

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    payload = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), payload


PARAMS = {"timeline": "boolean"}


def _guard(inner: InnerApp, **limits) -> RequestGuard:
    return RequestGuard(inner, serving_limits(**limits), PARAMS)


def run(coroutine):
    return asyncio.run(coroutine)


@pytest.mark.parametrize(
    "content_type", [b"text/csv", b"application/x-parquet", b"application/octet-stream", b""]
)
def test_only_json_bodies_reach_the_scoring_app(content_type):
    inner = InnerApp()
    status, _, body = run(_call(_guard(inner), b"a,b\n1,2\n", content_type=content_type))
    assert status == 415
    assert json.loads(body)["message"] == "the body must be JSON (Content-Type: application/json)"
    assert inner.bodies == []
    ok, _, _ = run(_call(_guard(inner), content_type=b"application/json; charset=utf-8"))
    assert ok == 200 and inner.bodies == [GOOD]


def test_an_oversized_body_is_refused_by_length_or_while_read():
    inner = InnerApp()
    guard = _guard(inner, max_request_mib=1.0)
    limit = body_limit_bytes(guard.limits)
    assert limit == int(2**20 * 4 / 3) + 1 + 2**20
    status, headers, body = run(_call(guard, b"x" * (limit + 1)))
    assert status == 413 and headers[b"connection"] == b"close"
    assert "the body exceeds 2 MiB (max_request_mib 1 of audio" in json.loads(body)["message"]
    # A chunked body announces no length: it is counted as it arrives.
    chunks = [b" " * 2**20] * 3
    status, _, _ = run(_call(guard, chunks, declare_length=False))
    assert status == 413 and inner.bodies == []


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"\xff\xfe" * 1000, "the body is not UTF-8 (invalid byte at offset 0)"),
        (b'{"dataframe_split": ' + b"A" * 2**20, "not valid JSON: Expecting value at line 1"),
        (b"[" * 100_000 + b"]" * 100_000, "the JSON is nested too deeply"),
        (b'["a list"]', "the body must be a JSON object with one of dataframe_split"),
        (b'{"clips": ["x.wav"]}', "the body must be a JSON object with one of dataframe_split"),
        (b'{"inputs": [], "instances": []}', "the body must be a JSON object with one of"),
        (b'{"inputs": [], "params": []}', "params must be a JSON object"),
        (b'{"inputs": [], "params": {"x": 1}}', "params: unknown parameter (this model's: time"),
        (b'{"inputs": [], "params": {"timeline": "yes"}}', "params.timeline must be a JSON bool"),
        (b'{"inputs": [], "params": {"timeline": 1}}', "params.timeline must be a JSON boolean"),
    ],
    ids=[
        "not-utf8",
        "malformed",
        "deep",
        "not-an-object",
        "unknown-key",
        "two-inputs",
        "params-not-object",
        "unknown-param",
        "param-string",
        "param-number",
    ],
)
def test_a_body_that_is_not_mlflow_json_gets_a_short_400_quoting_nothing(body, problem):
    inner = InnerApp()
    status, _, answer = run(_call(_guard(inner), body))
    assert status == 400 and inner.bodies == []
    assert problem in json.loads(answer)["message"]
    assert len(answer) < 300  # never an echo of the body
    assert json_problem(GOOD, PARAMS) is None
    assert json_problem(b'{"inputs": [], "params": {"timeline": true}}', PARAMS) is None


# Wall-clock bounds: run without the other worker's load (make test runs `-m timing` serially).
@pytest.mark.timing
def test_requests_wait_in_order_and_get_429_with_retry_after_past_the_queue_wait():
    inner = InnerApp(seconds=0.6)
    guard = _guard(inner, max_concurrent_decodes=1, max_queue_wait_s=0.3)

    async def three_at_once():
        started = time.monotonic()

        async def timed():
            answer = await _call(guard)
            return answer, time.monotonic() - started

        return await asyncio.gather(*(timed() for _ in range(3)))

    results = run(three_at_once())
    statuses = [status for (status, _, _), _ in results]
    assert statuses == [200, 429, 429]
    for (_, headers, body), seconds in results[1:]:
        # Refused when the queue wait ran out, not when the first request finished.
        assert 0.3 <= seconds < 0.55
        assert int(headers[b"retry-after"]) >= 1
        assert "the server is busy" in json.loads(body)["message"]
    assert len(inner.bodies) == 1


# Wall-clock bounds: run without the other worker's load (make test runs `-m timing` serially).
@pytest.mark.timing
def test_a_waiting_request_is_admitted_when_a_slot_frees_within_its_wait():
    inner = InnerApp(seconds=0.2)
    guard = _guard(inner, max_concurrent_decodes=1, max_queue_wait_s=1.0)

    async def two_at_once():
        return await asyncio.gather(_call(guard), _call(guard))

    assert [status for status, _, _ in run(two_at_once())] == [200, 200]


def test_retry_after_follows_the_pace_of_admitted_requests():
    admission = Admission(slots=2, max_wait_s=3.0)
    assert admission.retry_after_s() == 3  # nothing served yet: the longest wait
    admission.leave(10.0)
    assert admission.retry_after_s() == 5  # a slot frees every 10 s / 2 slots


def test_the_model_sees_the_arrival_time_of_its_request():
    inner = InnerApp()
    before = time.monotonic()
    run(_call(_guard(inner)))
    assert before <= inner.arrivals[0] <= time.monotonic()
    assert REQUEST_ARRIVAL.get() is None


def test_error_responses_lose_traces_and_long_messages():
    trace = {"error_code": "BAD_REQUEST", "message": "bad", "stack_trace": "File /srv/x.py"}
    inner = InnerApp(status=400, body=json.dumps(trace).encode())
    status, headers, body = run(_call(_guard(inner)))
    assert status == 400 and json.loads(body) == {"error_code": "BAD_REQUEST", "message": "bad"}
    assert headers[b"content-length"] == str(len(body)).encode()

    echo = {"error_code": "BAD_REQUEST", "message": "Failed to parse " + "A" * 10**4}
    cut = json.loads(plain_error(400, json.dumps(echo).encode()))
    assert len(cut["message"]) == MAX_ERROR_MESSAGE + len(" [...]")
    # An error body too long to read is not parsed at all: the status's phrase replaces it.
    echo["message"] += "A" * 10**6
    assert json.loads(plain_error(400, json.dumps(echo).encode()))["message"] == "Bad Request"
    assert json.loads(plain_error(504, b"Request processing time exceeded limit")) == {
        "error_code": "TEMPORARILY_UNAVAILABLE",
        "message": "Gateway Timeout",
    }
    assert json.loads(plain_error(500, b"")) == {
        "error_code": "INTERNAL_ERROR",
        "message": "Internal Server Error",
    }


def test_other_paths_pass_through_but_their_errors_are_plain_too():
    inner = InnerApp(status=404, body=b"<html>Not Found at /srv/app</html>")
    status, _, body = run(_call(_guard(inner), path="/nothing"))
    assert status == 404 and json.loads(body)["message"] == "Not Found"


def test_admission_settings_are_checked_and_older_models_keep_their_behaviour():
    limits = serving_limits()
    config = limits.model_dump()
    with pytest.raises(ValueError, match="request_timeout_s must be above 0"):
        read_served_config({**config, "request_timeout_s": 0})
    with pytest.raises(ValueError, match="max_queue_wait_s must be a number"):
        read_served_config({**config, "max_queue_wait_s": "2"})
    # A model logged before admission existed waited and ran up to MLflow's 60 s.
    older = {k: v for k, v in config.items() if k not in BEFORE_ADMISSION}
    assert read_served_config(older).request_timeout_s == 60.0
