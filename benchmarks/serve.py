"""Benchmark of the served model: `mlflow models serve` answering real 30 s clips.

Starts the real scoring server (`mlflow models serve -m <model> --env-manager local`) on a free
port of 127.0.0.1, sends it real GTZAN clips (one 30 s clip per request, cycling through the
clips, spread over the genres) and measures, on the client side, how long each request takes:

  1. `--warmup` requests first (a new process's first calls are slower), not timed;
  2. `--requests N` sequential requests, one client: latency p50/p95/max/mean and requests/s;
  3. one bad request (bytes that are not audio), which must get a 4xx with a message, then a good
     request, which must get the same answer as before (the server is not affected);
  4. the same N requests from `--concurrency` client threads at once (default 2);
  5. with `--by-path`, runs 2 and 4 again with the file's path instead of its bytes (served
     with audio_path switched on for the clips' folder);
  6. with `--load N`, a hostile load: N good requests from `--load-clients` threads (default 4),
     a bad request (not audio, silent, too short, too many rows, path probes, malformed JSON)
     after every fourth, and three decompression bombs at once: every good request must be
     answered, every bad one 4xx, and the server's RSS must grow by less than 300 MiB.

Clips travel base64-encoded in the JSON body (`audio_base64`, the realistic remote case); the
bodies are encoded before the timing starts. Every response is checked: HTTP 200, one prediction
with `genre` and one `prob_<genre>` per genre in the model's class order, probabilities summing
to 1, and the same answer for the same clip every time (and by path as by bytes). Prints the
model and its family/level (from the model's metadata), the figures of each run and whether its
p95 is under the target of 1000 ms per 30 s clip, and the server's peak memory: VmHWM (peak
RSS) of every process of its tree, read from /proc just before it is stopped. The server's
process group is stopped whatever happens.

The model is `models:/<promote.model_name>@champion` from the project's tracking store
(MLFLOW_TRACKING_URI, else sqlite mlruns/mlflow.db) unless `--model URI` says otherwise. Without a
champion (no `dvc repro` yet), `--build-demo-champion` builds a DEMO one in a temporary store: the
project's logistic-regression pipeline fitted on the reference table
(../shared/data/gtzan_reference/features_30_sec.csv), served at segment level by
`serving.log_serving_model` as the promote stage logs it.

    python benchmarks/serve.py                          # the project's champion
    python benchmarks/serve.py --build-demo-champion    # no champion yet: a demo one
    python benchmarks/serve.py --model models:/NAME/3 --requests 50 --concurrency 2 --by-path
    python benchmarks/serve.py --build-demo-champion --load 200
    python benchmarks/serve.py --clips-dir DIR --workers 2 --warmup 5
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import math
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import requests

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
DEFAULT_CLIPS = SHARED_DATA / "gtzan_mini"
DEFAULT_REFERENCE = SHARED_DATA / "gtzan_reference" / "features_30_sec.csv"
TARGET_MS = 1000.0  # the target: under a second per 30 s clip
LOAD_RSS_GROWTH_MIB = 300  # --load: the server's RSS may grow by less than this over the run
NOT_AUDIO = b"these are not audio samples, just text sent as if it were a WAV file\n" * 64
DEMO_EXPERIMENT = "gtzan-serve-benchmark-demo"


class BenchmarkError(RuntimeError):
    """A failed check or a server that would not start: the benchmark stops with its reason."""


# --- the model --------------------------------------------------------------------------------


@dataclass
class Champion:
    uri: str  # what `mlflow models serve -m` gets
    store: str  # the tracking (and registry) URI it resolves in
    note: str = ""  # printed beside the URI (e.g. that it is a demo model)


def project_champion(params: dict[str, Any]) -> tuple[Champion | None, str]:
    """The project store's champion, or None and why there is none. Never creates the store:
    a missing sqlite file means no pipeline has run yet."""
    from mlflow import MlflowClient

    from gtzan_mlops import tracking
    from gtzan_mlops.stages.promote import current_champion

    name = params["promote"]["model_name"]
    uri = tracking.champion_uri(name)
    store = tracking.tracking_uri(REPO_ROOT)
    prefix = "sqlite:///"
    if store.startswith(prefix) and not Path(store[len(prefix) :]).is_file():
        return None, f"{store[len(prefix) :]} does not exist (the pipeline has not run yet)"
    try:
        version = current_champion(MlflowClient(tracking_uri=store, registry_uri=store), name)
    except Exception as error:  # an unreachable or broken store: say so, like no champion
        return None, f"cannot read the registry of {store}: {error}"
    if version is None:
        return None, f"{store} has no model {name!r} with the alias 'champion'"
    return Champion(uri, store, f"version {version.version}"), ""


def build_demo_champion(params: dict[str, Any], reference: Path, folder: Path) -> Champion:
    """A DEMO champion in a fresh sqlite store in `folder`: the project's logistic-regression
    pipeline fitted on the reference table (the 57 features of 1000 GTZAN clips), logged as the
    promote stage logs a winner (serving.log_serving_model, segment level) and registered as
    `<promote.model_name>-demo@champion`."""
    import mlflow
    import pandas as pd

    from gtzan_mlops import tracking
    from gtzan_mlops.features.handcrafted import FEATURE_NAMES, REFERENCE_SETTINGS
    from gtzan_mlops.models.zoo import build_classic, log_classifier
    from gtzan_mlops.serving.classifier import ServingLimits, ServingSpec, log_serving_model

    if not reference.is_file():
        raise BenchmarkError(f"{reference}: reference feature table not found (--reference)")
    genres = list(params["genres"])
    table = pd.read_csv(reference)
    unknown = sorted(set(table["label"]) - set(genres))
    if unknown:
        raise BenchmarkError(f"{reference}: labels {unknown} are not in params genres")
    labels = table["label"].map({genre: index for index, genre in enumerate(genres)}).to_numpy()
    features = table[list(FEATURE_NAMES)]
    classifier = build_classic("logistic_regression", {"max_iter": 300}, seed=0)
    classifier.fit(features, labels)

    store = f"sqlite:///{folder / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = store  # for code that resolves the URI itself
    os.environ.pop("MLFLOW_REGISTRY_URI", None)
    mlflow.set_tracking_uri(store)
    mlflow.set_registry_uri(store)
    mlflow.set_experiment(experiment_id=tracking.ensure_experiment(DEMO_EXPERIMENT))
    spec = ServingSpec(
        family="logistic_regression",
        flavor="sklearn",
        level="segment",
        classes=tuple(genres),
        feature_settings=REFERENCE_SETTINGS.to_dict(),  # the reference table's settings
    )
    with mlflow.start_run(run_name="demo-native-logistic_regression"):
        classifier_uri = log_classifier(classifier, "sklearn", features.head(5)).model_uri
    with mlflow.start_run(run_name="demo-serving-logistic_regression", tags={"demo": "true"}):
        info = log_serving_model(spec, classifier_uri, ServingLimits.from_params(params))
    name = params["promote"]["model_name"] + "-demo"
    version = mlflow.register_model(info.model_uri, name, tags={"demo": "true"})
    mlflow.MlflowClient().set_registered_model_alias(name, tracking.CHAMPION_ALIAS, version.version)
    note = (
        f"version {version.version}; DEMO champion: logistic regression fitted on "
        f"{reference.name} (all 1000 GTZAN clips), not a pipeline model"
    )
    return Champion(tracking.champion_uri(name), store, note)


def describe_model(champion: Champion) -> dict[str, Any]:
    """Family, level, classes and serving settings from the logged model's MLmodel file."""
    import mlflow
    from mlflow.models import Model

    mlflow.set_tracking_uri(champion.store)
    mlflow.set_registry_uri(champion.store)
    model = Model.load(champion.uri)
    spec = (model.metadata or {}).get("gtzan", {})
    pyfunc = model.to_dict().get("flavors", {}).get("python_function", {})
    config = pyfunc.get("config") or pyfunc.get("model_config") or {}
    return {
        "family": spec.get("family", "?"),
        "level": spec.get("level", "?"),
        "classes": list(spec.get("classes", [])),
        "max_upload_mib": config.get("max_upload_mib"),
        "allow_audio_path": config.get("allow_audio_path"),
        "max_rows": config.get("max_rows"),
    }


# --- the clips and the requests ---------------------------------------------------------------


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
    """The JSON body of one request, in the format of serving.py's docstring."""
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


# --- the server -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants, from the parent ids in /proc/<pid>/stat."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])  # the field after the state
        children.setdefault(parent, []).append(int(entry.name))
    tree, pending = [], [root]
    while pending:
        pid = pending.pop()
        tree.append(pid)
        pending.extend(children.get(pid, []))
    return sorted(tree)


def cpu_seconds_of(pid: int) -> float:
    """User + system CPU time of one process (all its threads), 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def memory_of(pid: int) -> dict[str, Any] | None:
    """Peak and current RSS (MiB) and a short command of one process, None if it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    values = {}
    for line in status.splitlines():
        key, _, rest = line.partition(":")
        if key in {"VmHWM", "VmRSS"}:
            values[key] = int(rest.split()[0]) / 1024  # kB -> MiB
    words = [Path(word.decode(errors="replace")).name for word in command if word][:4]
    return {"pid": pid, "command": " ".join(words), **values}


class Server:
    """`mlflow models serve` in its own process group; `stop()` ends the whole group."""

    def __init__(
        self,
        champion: Champion,
        workers: int,
        log_path: Path,
        cwd: Path,
        model_config: dict[str, Any] | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        environment = {
            **os.environ,
            "MLFLOW_TRACKING_URI": champion.store,
            "MLFLOW_REGISTRY_URI": champion.store,
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "1",
            # `mlflow models serve` starts `uvicorn` by name: this environment's scripts first.
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        if model_config:  # overrides of the logged model config, as at any serve time
            environment["SERVING_MODEL_CONFIG"] = json.dumps(model_config)
        self.command = [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "serve",
            "-m",
            champion.uri,
            "--env-manager",
            "local",
            "-w",
            str(workers),
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
        ]
        self.log = log_path.open("w")
        self.process = subprocess.Popen(
            self.command,
            env=environment,
            cwd=cwd,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: uvicorn is a grandchild
        )

    def log_tail(self, lines: int = 30) -> str:
        self.log.flush()
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(f"  | {line}" for line in text[-lines:])

    def wait_ready(self, timeout: float) -> float:
        """Seconds until GET /ping answers 200."""
        started = time.monotonic()
        while True:
            if self.process.poll() is not None:
                raise BenchmarkError(
                    f"the server exited with code {self.process.returncode}:\n{self.log_tail()}"
                )
            try:
                if requests.get(f"{self.url}/ping", timeout=2).status_code == 200:
                    return time.monotonic() - started
            except requests.RequestException:
                pass
            if time.monotonic() - started > timeout:
                raise BenchmarkError(
                    f"the server did not answer /ping within {timeout:g} s:\n{self.log_tail()}"
                )
            time.sleep(0.5)

    def cpu_seconds(self) -> float:
        return sum(cpu_seconds_of(pid) for pid in process_tree(self.process.pid))

    def memory(self) -> list[dict[str, Any]]:
        found = (memory_of(pid) for pid in process_tree(self.process.pid))
        return [entry for entry in found if entry is not None]

    def stop(self) -> None:
        """SIGTERM to the group, then SIGKILL to whatever of it is left after 20 s."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=20)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self.log.close()


# --- the hostile load (--load) ----------------------------------------------------------------


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


class RssSampler:
    """The summed RSS of the server's process tree, sampled every 50 ms in a thread."""

    def __init__(self, server: Server) -> None:
        self.server, self.peak_mib, self.stopped = server, 0.0, threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def rss_mib(self) -> float:
        return sum(entry.get("VmRSS", 0.0) for entry in self.server.memory())

    def _sample(self) -> None:
        while not self.stopped.wait(0.05):
            self.peak_mib = max(self.peak_mib, self.rss_mib())

    def __enter__(self) -> RssSampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join()


def hostile_load(server: Server, client: Client, good_count: int, clients: int) -> None:
    """`good_count` good requests from `clients` threads, a bad request after every fourth good
    one, and three decompression bombs sent at once a fifth of the way in. Prints p50/p95 of
    the good requests, what the bad ones got, and the server's RSS growth over the run."""
    bad, bombs = bad_bodies(), bomb_bodies()
    bad_kinds = list(bad)
    client.prepare(good_count, by_path=False)
    numbers: queue.Queue[int] = queue.Queue()
    for number in range(good_count):
        numbers.put(number)
    latencies: list[float] = []
    good_errors: list[str] = []
    answered: list[tuple[str, int, str]] = []  # (kind, status, message)
    lock = threading.Lock()
    bombs_sent = threading.Event()

    def bad_request(session: requests.Session, kind: str, body: bytes) -> None:
        response = post(session, client.url, body, client.timeout)
        try:
            message = str(response.json().get("message", ""))
        except ValueError:
            message = response.text
        message = message.split("Error: ", 1)[-1]  # without MLflow's echo of the input
        with lock:
            answered.append((kind, response.status_code, " ".join(message.split())[:120]))

    def send_bombs() -> None:
        threads = [
            threading.Thread(
                target=lambda n=name, b=body: bad_request(requests.Session(), f"bomb: {n}", b)
            )
            for name, body in bombs.items()
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def work(worker: int) -> None:
        done = 0
        with requests.Session() as session:
            while True:
                try:
                    number = numbers.get_nowait()
                except queue.Empty:
                    return
                if worker == 0 and number >= good_count // 5 and not bombs_sent.is_set():
                    bombs_sent.set()
                    threading.Thread(target=send_bombs).start()
                try:
                    latency = client.one(session, number, by_path=False)
                    with lock:
                        latencies.append(latency)
                except BaseException as error:  # counted, the load goes on
                    with lock:
                        good_errors.append(str(error)[:200])
                done += 1
                if done % 4 == 0:
                    kind = bad_kinds[(number // 4) % len(bad_kinds)]
                    bad_request(session, kind, bad[kind])

    sampler = RssSampler(server)
    before = sampler.rss_mib()
    started = time.perf_counter()
    with sampler:
        threads = [threading.Thread(target=work, args=(index,)) for index in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        while len([kind for kind, _, _ in answered if kind.startswith("bomb")]) < len(bombs):
            time.sleep(0.1)
    seconds = time.perf_counter() - started
    values = np.array(latencies)
    print(f"\nhostile load: {clients} clients, {seconds:.1f} s")
    print(
        f"  good requests: {len(latencies)} answered HTTP 200 (same answers as before), "
        f"{len(good_errors)} errors; p50 {np.percentile(values, 50):.0f} ms, "
        f"p95 {np.percentile(values, 95):.0f} ms"
    )
    for error in good_errors[:5]:
        print(f"    error: {error}")
    by_kind: dict[str, list[tuple[int, str]]] = {}
    for kind, status, message in answered:
        by_kind.setdefault(kind, []).append((status, message))
    not_4xx = 0
    for kind, results in by_kind.items():
        statuses = sorted({status for status, _ in results})
        not_4xx += sum(not 400 <= status < 500 for status, _ in results)
        print(f"  {kind:<36} x{len(results):<3} HTTP {statuses}: {results[0][1]!r}")
    growth = sampler.peak_mib - before
    print(
        f"  bad requests: {len(answered)}, {not_4xx} not answered 4xx; server RSS "
        f"{before:.0f} MiB before, peak {sampler.peak_mib:.0f} MiB: growth {growth:.0f} MiB "
        f"({'under' if growth < LOAD_RSS_GROWTH_MIB else 'NOT under'} {LOAD_RSS_GROWTH_MIB} MiB)"
    )
    verdict = not good_errors and not not_4xx and growth < LOAD_RSS_GROWTH_MIB
    print(f"  hostile load: {'passed' if verdict else 'FAILED'}")


# --- the report -------------------------------------------------------------------------------


def print_runs(runs: list[Run]) -> None:
    print(
        f"\n{'run':<24}{'requests':>9}{'p50 ms':>9}{'p95 ms':>9}{'max ms':>9}{'mean ms':>9}"
        f"{'req/s':>8}{'srv cpu ms':>11}  p95 < {TARGET_MS:.0f} ms"
    )
    for run in runs:
        figures = run.figures()
        verdict = "yes" if figures["p95"] < TARGET_MS else "NO"
        print(
            f"{run.label:<24}{len(run.latencies_ms):>9}{figures['p50']:>9.0f}"
            f"{figures['p95']:>9.0f}{figures['max']:>9.0f}{figures['mean']:>9.0f}"
            f"{figures['per_second']:>8.2f}{figures['cpu_ms']:>11.0f}  {verdict}"
        )
    print(
        "(ms are client-side, per request of one 30 s clip; srv cpu ms: CPU time of the server's "
        "processes per request, all threads, from /proc)"
    )


def print_memory(at_ready: list[dict[str, Any]], at_end: list[dict[str, Any]]) -> None:
    ready = {entry["pid"]: entry.get("VmRSS", float("nan")) for entry in at_ready}
    print("\nserver memory (MiB): VmHWM = peak RSS of each process, read at the end")
    print(f"  {'pid':>7}  {'peak (VmHWM)':>12}  {'RSS at ready':>12}  {'RSS at end':>10}  command")
    for entry in at_end:
        print(
            f"  {entry['pid']:>7}  {entry.get('VmHWM', float('nan')):>12.0f}  "
            f"{ready.get(entry['pid'], float('nan')):>12.0f}  "
            f"{entry.get('VmRSS', float('nan')):>10.0f}  {entry['command']}"
        )
    if at_end:
        largest = max(at_end, key=lambda entry: entry.get("VmHWM", 0.0))
        total = sum(entry.get("VmHWM", 0.0) for entry in at_end)
        print(
            f"  peak RSS of the largest process: {largest.get('VmHWM', 0.0):.0f} MiB "
            f"(pid {largest['pid']}); sum of the {len(at_end)} processes' peaks: {total:.0f} MiB"
        )


def benchmark(args: argparse.Namespace, champion: Champion, scratch: Path) -> None:
    import soundfile

    described = describe_model(champion)
    classes = described["classes"] or list(args.genres)
    clips = list_clips(args.clips_dir)
    used = clips[: min(len(clips), max(args.requests, args.warmup, 1))]
    durations = [soundfile.info(str(path)).duration for path in used]

    print(f"model:   {champion.uri}" + (f" ({champion.note})" if champion.note else ""))
    print(f"store:   {champion.store}")
    upload = described["max_upload_mib"]
    print(
        f"family:  {described['family']}, level {described['level']}, {len(classes)} genres; "
        f"max upload {upload if upload is not None else '?'} MiB, "
        f"audio_path {'on for --by-path' if args.by_path else 'off'} (as served here)"
    )
    print(
        f"clips:   {len(clips)} in {args.clips_dir}, cycled (requests use {len(used)} of them, "
        f"{min(durations):.2f}-{max(durations):.2f} s long, mean {np.mean(durations):.2f} s)"
    )
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    print(f"machine: {os.cpu_count()} cores, load average {load} (1, 5, 15 min) at start")

    overrides = (
        {"allow_audio_path": True, "audio_root": str(args.clips_dir.resolve())}
        if args.by_path
        else None
    )
    server = Server(champion, args.workers, scratch / "serve.log", scratch, overrides)
    try:
        print(
            f"server:  mlflow models serve --env-manager local -w {args.workers} on {server.url}",
            flush=True,
        )
        ready_s = server.wait_ready(args.startup_timeout)
        at_ready = server.memory()
        client = Client(f"{server.url}/invocations", clips, classes, args.request_timeout)
        client.prepare(max(args.requests, args.warmup), by_path=False)
        body_mib = np.mean([len(body) for body in client.bodies.values()]) / 2**20
        print(f"ready:   after {ready_s:.1f} s; base64 request bodies {body_mib:.2f} MiB each")

        warmup = client.run("warm-up", args.warmup, 1, by_path=False) if args.warmup else None
        if warmup:
            first = ", ".join(f"{value:.0f}" for value in warmup.latencies_ms)
            print(f"warm-up: {args.warmup} requests, not counted (ms: {first})")

        encodings = [False, True] if args.by_path else [False]
        runs: list[Run] = []
        bad_request = ""

        def measured(label: str, clients: int, by_path: bool) -> Run:
            before = server.cpu_seconds()
            run = client.run(label, args.requests, clients, by_path)
            run.server_cpu_s = server.cpu_seconds() - before
            return run

        for by_path in encodings:
            how = "path" if by_path else "base64"
            runs.append(measured(f"{how}, 1 client", 1, by_path))
            if not by_path:
                bad_request = client.bad_request()
            if args.concurrency > 1:
                runs.append(
                    measured(f"{how}, {args.concurrency} clients", args.concurrency, by_path)
                )
        at_end = server.memory()
        if args.load:
            hostile_load(server, client, args.load, args.load_clients)
    finally:
        server.stop()

    print_runs(runs)
    print(f"\nbad request (non-audio bytes): {bad_request}")
    print(
        f"checks:  all {sum(len(run.latencies_ms) for run in runs) + args.warmup + 1} good "
        f"requests answered HTTP 200 with genre + prob_<genre> for {len(classes)} genres, "
        f"probabilities summing to 1, the same answer for the same clip every time"
        + (" (by path as by bytes)" if args.by_path else "")
    )
    print_memory(at_ready, at_end)
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    print(f"\nload average at the end: {load}")
    sequential = runs[0].figures()
    met = sequential["p95"] < TARGET_MS
    print(
        f"target (p95 < {TARGET_MS:.0f} ms per 30 s clip, one client, base64): "
        f"{'met' if met else 'NOT met'} (p95 {sequential['p95']:.0f} ms, "
        f"p50 {sequential['p50']:.0f} ms)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="", help="model URI (default: the project champion)")
    parser.add_argument(
        "--build-demo-champion",
        action="store_true",
        help="serve a DEMO champion built in a temporary store from --reference",
    )
    parser.add_argument("--reference", type=Path, default=DEFAULT_REFERENCE)
    parser.add_argument("--clips-dir", type=Path, default=DEFAULT_CLIPS)
    parser.add_argument("--requests", type=int, default=30, help="timed requests per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed requests first")
    parser.add_argument(
        "--concurrency", type=int, default=2, help="client threads of the concurrent run (1: none)"
    )
    parser.add_argument("--by-path", action="store_true", help="also send the clips as audio_path")
    parser.add_argument(
        "--load",
        type=int,
        default=0,
        metavar="N",
        help="then a hostile load: N good requests mixed with bad ones and three bombs",
    )
    parser.add_argument("--load-clients", type=int, default=4, help="client threads of --load")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn workers (mlflow's -w)")
    parser.add_argument("--startup-timeout", type=float, default=300.0, help="seconds")
    parser.add_argument("--request-timeout", type=float, default=120.0, help="seconds")
    parser.add_argument("--params", type=Path, default=REPO_ROOT / "params.yaml")
    args = parser.parse_args()
    if args.requests < 1 or args.warmup < 0 or args.concurrency < 1 or args.workers < 1:
        parser.error("--requests, --concurrency and --workers must be >= 1, --warmup >= 0")

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # A SIGTERM (or a closed terminal) unwinds like Ctrl-C, so the server is always stopped.
    for stop_signal in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(stop_signal, lambda number, frame: sys.exit(128 + number))

    from gtzan_mlops.settings.loading import ConfigError, load_settings

    try:
        params = load_settings(args.params)
    except ConfigError as error:
        print(f"benchmarks/serve.py: {error}", file=sys.stderr)
        return 2
    args.genres = params.get("genres", [])

    with tempfile.TemporaryDirectory(prefix="gtzan-serve-benchmark-") as folder:
        scratch = Path(folder)
        try:
            if args.model:
                from gtzan_mlops import tracking

                champion = Champion(args.model, tracking.tracking_uri(REPO_ROOT))
            else:
                found, reason = project_champion(params)
                if args.build_demo_champion:
                    if found:
                        print(f"(the project store has a champion, {found.uri}; serving a demo)")
                    started = time.perf_counter()
                    (scratch / "store").mkdir()
                    champion = build_demo_champion(params, args.reference, scratch / "store")
                    print(f"built the demo champion in {time.perf_counter() - started:.1f} s")
                elif found:
                    champion = found
                else:
                    print(
                        f"benchmarks/serve.py: no champion to serve: {reason}.\n"
                        "Run `dvc repro` to train and promote one, pass --model URI, or rerun "
                        "with --build-demo-champion to serve a DEMO model (logistic regression "
                        f"on {args.reference.name}) from a temporary store.",
                        file=sys.stderr,
                    )
                    return 2
            benchmark(args, champion, scratch)
        except BenchmarkError as error:
            print(f"benchmarks/serve.py: FAILED: {error}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
