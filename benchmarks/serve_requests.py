"""The requests of the serving benchmarks: the clips, their JSON bodies, the checks of every
answer, timed runs of one or more clients, and the bodies of bad requests and decompression
bombs (benchmarks/serve.py, benchmarks/serve_load.py)."""

from __future__ import annotations

import base64
import json
import math
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import requests
from serve_model import REPO_ROOT, BenchmarkError

NOT_AUDIO = b"these are not audio samples, just text sent as if it were a WAV file\n" * 64


def list_clips(clips_dir: Path) -> list[Path]:
    """Every audio file under clips_dir, round-robin over the genre folders, so that the first
    requests already cover every genre."""
    from gtzan_mlops.data.audio import AUDIO_EXTENSIONS

    paths = sorted(p for p in clips_dir.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS)
    if not paths:
        raise BenchmarkError(f"{clips_dir}: no audio files found (--clips-dir)")
    by_folder: dict[Path, list[Path]] = {}
    for path in paths:
        by_folder.setdefault(path.parent, []).append(path)
    ordered: list[Path] = []
    queues = list(by_folder.values())
    while len(ordered) < len(paths):
        for folder_paths in queues:
            if folder_paths:
                ordered.append(folder_paths.pop(0))
    return ordered


def request_body(path: Path, by_path: bool) -> bytes:
    """The JSON body of one request, in the format of serving/pyfunc.py's docstring."""
    if by_path:
        body: dict[str, Any] = {"dataframe_records": [{"audio_path": str(path.resolve())}]}
    else:
        encoded = base64.b64encode(path.read_bytes()).decode("ascii")
        body = {"dataframe_split": {"columns": ["audio_base64"], "data": [[encoded]]}}
    return json.dumps(body).encode("utf-8")


def post(session: requests.Session, url: str, body: bytes, timeout: float) -> requests.Response:
    return session.post(
        url, data=body, headers={"Content-Type": "application/json"}, timeout=timeout
    )


def check_answer(response: requests.Response, classes: list[str], what: str) -> np.ndarray:
    """The probabilities of a good response; raises BenchmarkError unless it is HTTP 200 with
    exactly one prediction of the documented shape."""
    if response.status_code != 200:
        raise BenchmarkError(f"{what}: HTTP {response.status_code}: {response.text[:500]}")
    try:
        predictions = response.json()["predictions"]
    except (ValueError, KeyError, TypeError) as error:
        raise BenchmarkError(
            f"{what}: not a predictions response ({error}): {response.text[:500]}"
        ) from error
    if not isinstance(predictions, list) or len(predictions) != 1:
        raise BenchmarkError(f"{what}: expected one prediction, got {response.text[:500]}")
    prediction = predictions[0]
    expected = ["genre", *(f"prob_{genre}" for genre in classes), "warning"]
    if list(prediction) != expected:
        raise BenchmarkError(f"{what}: columns {list(prediction)}, expected {expected}")
    probabilities = np.array([prediction[f"prob_{genre}"] for genre in classes], dtype=float)
    if not math.isclose(float(probabilities.sum()), 1.0, abs_tol=1e-6):
        raise BenchmarkError(f"{what}: probabilities sum to {probabilities.sum()}, not 1")
    if prediction["genre"] != classes[int(probabilities.argmax())]:
        raise BenchmarkError(f"{what}: genre {prediction['genre']!r} is not the most probable")
    return probabilities


@dataclass
class Run:
    label: str
    clients: int
    latencies_ms: list[float] = field(default_factory=list)
    seconds: float = 0.0
    server_cpu_s: float = float("nan")  # CPU time the server's processes spent in the run

    def figures(self) -> dict[str, float]:
        values = np.array(self.latencies_ms)
        return {
            "p50": float(np.percentile(values, 50)),
            "p95": float(np.percentile(values, 95)),
            "max": float(values.max()),
            "mean": float(values.mean()),
            "per_second": len(values) / self.seconds,
            "cpu_ms": self.server_cpu_s * 1000 / len(values),
        }


class Client:
    """Sends the requests and checks every answer against the first answer for the same clip."""

    def __init__(self, url: str, clips: list[Path], classes: list[str], timeout: float) -> None:
        self.url = url
        self.clips = clips
        self.classes = classes
        self.timeout = timeout
        self.bodies: dict[tuple[int, bool], bytes] = {}
        self.answers: dict[int, np.ndarray] = {}  # clip index -> probabilities
        self.lock = threading.Lock()

    def prepare(self, count: int, by_path: bool) -> None:
        """Encode the bodies of the first `count` requests (not timed)."""
        for index in range(min(count, len(self.clips))):
            key = (index, by_path)
            if key not in self.bodies:
                self.bodies[key] = request_body(self.clips[index], by_path)

    def body(self, number: int, by_path: bool) -> tuple[int, bytes]:
        index = number % len(self.clips)
        key = (index, by_path)
        if key not in self.bodies:
            self.bodies[key] = request_body(self.clips[index], by_path)
        return index, self.bodies[key]

    def record(self, index: int, response: requests.Response, how: str) -> None:
        what = f"{self.clips[index].name} ({how})"
        probabilities = check_answer(response, self.classes, what)
        with self.lock:
            first = self.answers.setdefault(index, probabilities)
        if not np.allclose(probabilities, first, rtol=1e-9, atol=1e-12):
            raise BenchmarkError(f"{what}: answer differs from the first one for this clip")

    def one(self, session: requests.Session, number: int, by_path: bool) -> float:
        """One timed request; returns its latency in ms."""
        index, body = self.body(number, by_path)
        started = time.perf_counter()
        response = post(session, self.url, body, self.timeout)
        elapsed = (time.perf_counter() - started) * 1000
        self.record(index, response, "path" if by_path else "base64")
        return elapsed

    def run(self, label: str, requests_count: int, clients: int, by_path: bool) -> Run:
        """`requests_count` requests from `clients` threads, each on its own keep-alive session,
        taking the next request number from a shared queue."""
        self.prepare(requests_count, by_path)
        run = Run(label, clients)
        numbers: queue.Queue[int] = queue.Queue()
        for number in range(requests_count):
            numbers.put(number)
        errors: list[BaseException] = []

        def work() -> None:
            with requests.Session() as session:
                while not errors:
                    try:
                        number = numbers.get_nowait()
                    except queue.Empty:
                        return
                    try:
                        latency = self.one(session, number, by_path)
                    except BaseException as error:  # reported by the main thread
                        errors.append(error)
                        return
                    with self.lock:
                        run.latencies_ms.append(latency)

        threads = [threading.Thread(target=work, daemon=True) for _ in range(clients)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        run.seconds = time.perf_counter() - started
        if errors:
            raise BenchmarkError(f"{label}: {errors[0]}") from errors[0]
        return run

    def bad_request(self) -> str:
        """Non-audio bytes must get a 4xx with a message; the next good request must get the
        answer it got before. Returns what happened, for the report."""
        encoded = base64.b64encode(NOT_AUDIO).decode("ascii")
        body = json.dumps({"dataframe_split": {"columns": ["audio_base64"], "data": [[encoded]]}})
        with requests.Session() as session:
            response = post(session, self.url, body.encode("utf-8"), self.timeout)
            if not 400 <= response.status_code < 500:
                raise BenchmarkError(
                    f"bad request: expected a 4xx, got HTTP {response.status_code}: "
                    f"{response.text[:500]}"
                )
            try:
                answer = response.json()
                message, code = str(answer["message"]), answer.get("error_code", "")
            except (ValueError, KeyError, TypeError) as error:
                raise BenchmarkError(
                    f"bad request: HTTP {response.status_code} without a JSON message ({error}): "
                    f"{response.text[:500]}"
                ) from error
            if not message.strip():
                raise BenchmarkError(f"bad request: HTTP {response.status_code}, empty message")
            index, good = self.body(0, by_path=False)
            after = post(session, self.url, good, self.timeout)
            self.record(index, after, "base64, right after the bad request")
        brief = " ".join(message.split())[:400]
        return (
            f"HTTP {response.status_code} {code}: {brief!r}; next request: "
            f"HTTP {after.status_code}, same answer as before"
        )


def bad_bodies() -> dict[str, bytes]:
    """One request body per kind of bad request; each must be answered 4xx with a message."""
    import io

    import soundfile

    def wav(samples: np.ndarray) -> str:
        buffer = io.BytesIO()
        soundfile.write(buffer, samples, 22050, format="WAV")
        return base64.b64encode(buffer.getvalue()).decode("ascii")

    def rows(*values: str, column: str = "audio_base64") -> bytes:
        return json.dumps({"dataframe_records": [{column: value} for value in values]}).encode()

    tone = np.sin(np.linspace(0, 3000, 22050)).astype(np.float32)
    return {
        "not audio": rows(base64.b64encode(NOT_AUDIO).decode("ascii")),
        "silent 30 s": rows(wav(np.zeros(22050 * 30, dtype=np.float32))),
        "1 s": rows(wav(tone)),
        "9 rows": rows(*[wav(tone)] * 9),
        "probe ~user": rows("~nosuchuser/x.wav", column="audio_path"),
        "probe /etc/shadow": rows("/etc/shadow", column="audio_path"),
        "malformed JSON": b'{"dataframe_split": {"columns": ',
    }


def bomb_bodies() -> dict[str, bytes]:
    """Three decompression bombs (tests/audio_bombs.py): small uploads, gigabytes decoded."""
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from audio_bombs import flac_of_zeros, ogg_of_zeros

    bombs = {
        "FLAC 655 kHz x 8 ch, 60 s": flac_of_zeros(655350, 8, 60),
        "FLAC 192 kHz x 8 ch, claims 590 s": flac_of_zeros(192000, 8, 2, claim_seconds=590),
        "Ogg 255 ch": ogg_of_zeros(255),
    }
    return {
        name: json.dumps(
            {
                "dataframe_split": {
                    "columns": ["audio_base64"],
                    "data": [[base64.b64encode(data).decode()]],
                }
            }
        ).encode()
        for name, data in bombs.items()
    }
