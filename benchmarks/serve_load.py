"""Load benchmark of `gtzan-mlops serve`: memory, status counts and latency under N clients.

The model (default: the project's champion) is first repackaged by this checkout's serving code
with params.yaml's serving settings, as the promote stage would log it today (--as-logged: as
it is). Each song kind x client count gets a FRESH server (so idle memory and growth are its
own), on a free port of 127.0.0.1: its start-up time (to /ping 200) and RSS are taken, a
warm-up request is sent (not counted) and the idle RSS taken 2 s later; then N threads each send
--requests-per-client requests back to back (timeout 300 s), with the RSS sampled every 0.2 s
(--bombs: serve_requests.py's three decompression bombs go at once during the load, to be
answered 4xx); the RSS is taken again 10 s after. RSS: the sum of VmRSS over the server's
process tree. Every status is counted (200, 429, 503, 504, other), with Retry-After; every 200
is checked.

Songs, built before any timing: "30s", the real GTZAN clips of ../shared/data/gtzan_mini (WAV,
cycling through the genres); "10min", 20 of them concatenated as a 44.1 kHz stereo 128 kbps MP3
made by `lame`. Prints a Markdown table; the figures are not asserted: exits 0 once it ran,
1 if it could not run, an answer was malformed or a bomb was not refused with a 4xx.

    python benchmarks/serve_load.py                      # the project's champion
    python benchmarks/serve_load.py --model models:/NAME@champion --clients 1 4 \\
        --requests-per-client 2 --songs 30s 10min --bombs
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import requests
from serve_model import BenchmarkError, Champion, describe_model, project_champion
from serve_requests import bomb_bodies, check_answer, list_clips, post, request_body
from serve_server import RssSampler, free_port, project_serve

from gtzan_mlops.serving.packaging import log_serving_model
from gtzan_mlops.serving.spec import ServingSpec
from gtzan_mlops.settings.loading import ConfigError, load_settings
from gtzan_mlops.settings.schema import ServedConfig

BENCHMARKS_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCHMARKS_DIR.parent
CLIPS_DIR = REPO_ROOT.parent / "shared" / "data" / "gtzan_mini"
SONG_NAMES = {
    "30s": "30 s GTZAN clip (real WAV, 22050 Hz mono)",
    "10min": "10-min song (20 real GTZAN clips concatenated, MP3 128 kbps)",
}
CLIPS_PER_SONG = 20
COUNTED_STATUSES = (200, 429, 503, 504)
REQUEST_TIMEOUT_S = 300.0
STARTUP_TIMEOUT_S = 300.0
SETTLE_S = 2.0  # after the warm-up, before the idle RSS
AFTER_LOAD_WAIT_S = 10.0  # before the after-load RSS: time to free what the load held
SAMPLE_PERIOD_S = 0.2
GROWTH_LIMIT_MIB = 300
AFTER_LOAD_LIMIT_MIB = 100


@dataclass
class Song:
    kind: str  # a key of SONG_NAMES
    bodies: list[bytes]  # JSON request bodies

    def body(self, number: int) -> bytes:  # the bodies in turn: several genres
        return self.bodies[number % len(self.bodies)]


@dataclass
class Plan:  # what every configuration does, whatever its song and client count
    workers: int
    requests_per_client: int
    classes: list[str]  # the model's, in its order
    bombs: dict[str, bytes]  # bodies sent at once during each load (empty: none)
    scratch: Path  # the servers' logs


@dataclass
class Outcome:
    status: int | None  # None: no HTTP answer (client timeout, connection error)
    seconds: float
    retry_after: str | None = None
    error: str = ""

    @property
    def refused(self) -> bool:  # answered 4xx, as a bad request must be
        return self.status is not None and 400 <= self.status < 500


@dataclass
class Row:
    kind: str
    clients: int
    startup_s: float = 0.0
    rss_at_start_mib: float = 0.0  # before the warm-up request
    idle_mib: float = 0.0
    peak_mib: float = 0.0
    after_load_mib: float = 0.0
    cpu_s: float = 0.0
    outcomes: list[Outcome] = field(default_factory=list)
    bombs: list[Outcome] = field(default_factory=list)


def encode_long_song(clips: list[Path], folder: Path) -> Path:
    """CLIPS_PER_SONG clips end to end as one 44.1 kHz stereo 128 kbps CBR MP3 (a typical
    download). The channels are identical: lame keeps a mono input mono, so stereo is made here."""
    import soundfile

    if shutil.which("lame") is None:
        raise BenchmarkError("`lame` is not installed (apt-get install lame): no 10-min MP3")
    picked = [clips[number % len(clips)] for number in range(CLIPS_PER_SONG)]
    parts = [soundfile.read(path, dtype="int16", always_2d=True) for path in picked]
    rates = {rate for _, rate in parts}
    if len(rates) != 1:
        raise BenchmarkError(f"the clips have several sample rates {sorted(rates)}")
    mono = np.concatenate([samples[:, 0] for samples, _ in parts])
    wav, mp3 = folder / "song.wav", folder / "song.mp3"
    soundfile.write(wav, np.column_stack([mono, mono]), rates.pop(), subtype="PCM_16")
    command = ["lame", "--quiet", "--cbr", "-b", "128", "--resample", "44.1", "-m", "s"]
    done = subprocess.run([*command, str(wav), str(mp3)], capture_output=True, text=True)
    if done.returncode != 0:
        raise BenchmarkError(f"lame failed ({done.returncode}): {done.stderr.strip()[:500]}")
    return mp3


def build_songs(kinds: list[str], clips: list[Path], needed: int, folder: Path) -> list[Song]:
    """The request bodies of every song kind, encoded before any timing."""
    songs = []
    for kind in kinds:
        paths = clips[:needed] if kind == "30s" else [encode_long_song(clips, folder)]
        songs.append(Song(kind, [request_body(path, False) for path in paths]))
    return songs


def send(session: requests.Session, url: str, body: bytes, classes: list[str] | None) -> Outcome:
    """One request, timed; with `classes`, a 200 must pass serve.py's check_answer."""
    started = time.perf_counter()
    try:
        response = post(session, url, body, REQUEST_TIMEOUT_S)
    except requests.RequestException as error:  # counted as "other", the load goes on
        return Outcome(None, time.perf_counter() - started, error=type(error).__name__)
    seconds = time.perf_counter() - started
    if response.status_code == 200 and classes is not None:
        check_answer(response, classes, "an HTTP 200 answer")
    return Outcome(response.status_code, seconds, response.headers.get("Retry-After"))


def run_load(url: str, song: Song, clients: int, plan: Plan) -> tuple[list[Outcome], list[Outcome]]:
    """`clients` threads sending their requests back to back, and the bombs, all at once; returns
    the outcomes of both. A malformed answer stops its client and is raised once all are done."""
    per_client = plan.requests_per_client

    def client(number: int) -> list[Outcome]:
        numbers = range(number * per_client, (number + 1) * per_client)
        with requests.Session() as session:  # keep-alive, as a real client would
            return [send(session, url, song.body(n), plan.classes) for n in numbers]

    def bomb(body: bytes) -> Outcome:
        with requests.Session() as session:
            return send(session, url, body, classes=None)  # any 200 is already a failure

    with ThreadPoolExecutor(max_workers=clients + len(plan.bombs)) as pool:  # all at once
        loads = [pool.submit(client, number) for number in range(clients)]
        bombs = [pool.submit(bomb, body) for body in plan.bombs.values()]
    return [outcome for load in loads for outcome in load.result()], [b.result() for b in bombs]


def measure(champion: Champion, song: Song, clients: int, plan: Plan) -> Row:
    """One configuration on a fresh server, stopped whatever happens."""
    row = Row(song.kind, clients)
    log_path = plan.scratch / f"{song.kind}-{clients}.log"
    port = free_port()
    with project_serve(champion, plan.workers, port, log_path, STARTUP_TIMEOUT_S) as server:
        url = f"{server.url}/invocations"
        row.startup_s = server.ready_s
        sampler = RssSampler(server, SAMPLE_PERIOD_S)
        row.rss_at_start_mib = sampler.rss_mib()
        with requests.Session() as session:
            warm_up = send(session, url, song.bodies[0], plan.classes)
        print(f"  warm-up: HTTP {warm_up.status} in {warm_up.seconds:.1f} s", flush=True)
        time.sleep(SETTLE_S)
        # The peak starts at the idle RSS: a load shorter than one period shows no growth.
        row.idle_mib = sampler.peak_mib = sampler.rss_mib()
        cpu_before = server.cpu_seconds()
        with sampler:
            row.outcomes, row.bombs = run_load(url, song, clients, plan)
        row.cpu_s = server.cpu_seconds() - cpu_before
        row.peak_mib = sampler.peak_mib
        time.sleep(AFTER_LOAD_WAIT_S)
        row.after_load_mib = sampler.rss_mib()
    return row


TABLE_HEADER = (
    "| song | clients | start-up s | RSS before warm-up MiB | idle RSS MiB | peak growth MiB "
    "| after-load growth MiB | 200 | 429 | 503 | 504 | other | p50 200 s | p95 200 s "
    "| p50 429 s | Retry-After | server CPU s "
    f"| growth < {GROWTH_LIMIT_MIB} MiB | after-load growth < {AFTER_LOAD_LIMIT_MIB} MiB "
    "| bombs refused 4xx |"
)


def seconds_at(outcomes: list[Outcome], status: int, percent: float) -> str:
    """A percentile of the latencies of the answers with `status`; "-" if there are none."""
    values = [outcome.seconds for outcome in outcomes if outcome.status == status]
    return f"{np.percentile(values, percent):.2f}" if values else "-"


def table_line(row: Row) -> str:
    counts = Counter(outcome.status for outcome in row.outcomes)
    statuses = " | ".join(str(counts[status]) for status in COUNTED_STATUSES)
    other = len(row.outcomes) - sum(counts[status] for status in COUNTED_STATUSES)
    retry_after = Counter(o.retry_after for o in row.outcomes if o.retry_after is not None)
    retry = ", ".join(f"{value} s x{count}" for value, count in retry_after.items()) or "-"
    growth, after = row.peak_mib - row.idle_mib, row.after_load_mib - row.idle_mib
    bombs = f"{sum(bomb.refused for bomb in row.bombs)}/{len(row.bombs)}" if row.bombs else "-"
    latencies = [seconds_at(row.outcomes, 200, 50), seconds_at(row.outcomes, 200, 95)]
    latencies.append(seconds_at(row.outcomes, 429, 50))  # how fast a refusal comes
    return (
        f"| {row.kind} | {row.clients} | {row.startup_s:.1f} | {row.rss_at_start_mib:.0f} "
        f"| {row.idle_mib:.0f} | {growth:.0f} | {after:.0f} | {statuses} | {other} "
        f"| {' | '.join(latencies)} | {retry} | {row.cpu_s:.1f} "
        f"| {'yes' if growth < GROWTH_LIMIT_MIB else 'NO'} "
        f"| {'yes' if after < AFTER_LOAD_LIMIT_MIB else 'NO'} | {bombs} |"
    )


def print_report(rows: list[Row]) -> None:
    print(f"\n{TABLE_HEADER}\n|{'---|' * (TABLE_HEADER.count('|') - 1)}")
    for row in rows:
        print(table_line(row))
    print("\n" + "; ".join(f"{kind}: {name}" for kind, name in SONG_NAMES.items()))
    print("start-up: process start to /ping 200; RSS: sum of VmRSS over the server's processes")
    for row in rows:  # what "other" was: a status, or the client-side error of no answer
        odd = Counter(o.error or o.status for o in row.outcomes if o.status not in COUNTED_STATUSES)
        if odd:
            print(f"other ({row.kind}, {row.clients} clients): {dict(odd)}")


def repackaged(champion: Champion, folder: Path) -> Champion:
    """The model's classifier, spec and musicnn weights packaged again by this checkout's
    serving code with params.yaml's serving settings, as the promote stage would log it today,
    in a scratch store. The limits are the model's config, and MLflow ignores a serve-time
    override (SERVING_MODEL_CONFIG) of a key the model was not logged with."""
    import mlflow
    from mlflow.models import Model

    local = Path(mlflow.artifacts.download_artifacts(champion.uri, dst_path=str(folder)))
    artifacts = Model.load(str(local)).flavors["python_function"]["artifacts"]
    spec = ServingSpec.from_dict(json.loads((local / artifacts["spec"]["path"]).read_text()))
    weights = artifacts.get("musicnn_weights")
    settings = load_settings(REPO_ROOT / "params.yaml")
    config = ServedConfig.of(settings.serving, settings.data)
    store = f"sqlite:///{folder / 'store.db'}"
    mlflow.set_tracking_uri(store)
    mlflow.set_experiment("gtzan-serve-load-benchmark")
    with mlflow.start_run(run_name="repackaged-champion"):
        info = log_serving_model(
            spec,
            str(local / artifacts["classifier"]["path"]),
            config,
            musicnn_weights=local / weights["path"] if weights else None,
        )
    print(f"served:  {info.model_uri}, {champion.uri} repackaged with params.yaml's serving")
    return Champion(info.model_uri, store, champion.note)


def model_to_serve(model_uri: str) -> tuple[Champion, list[str]]:
    """--model in the project's store, else its champion; prints it, returns it and its classes."""
    from gtzan_mlops import tracking

    if model_uri:
        champion = Champion(model_uri, tracking.tracking_uri(REPO_ROOT))
    else:
        champion, reason = project_champion(load_settings(REPO_ROOT / "params.yaml"))
        if champion is None:
            raise BenchmarkError(f"no champion to serve: {reason}; pass --model URI")
    described = describe_model(champion)  # also points MLflow at the store
    print(f"model:   {champion.uri} {champion.note}\nstore:   {champion.store}")
    print(
        f"family:  {described['family']}, feature set {described['feature_set']}, "
        f"level {described['level']}"
    )
    if not described["classes"]:
        raise BenchmarkError(f"{champion.uri}: no classes in the model's metadata")
    return champion, described["classes"]


def benchmark(args: argparse.Namespace, scratch: Path) -> None:
    """Runs every configuration and prints the table; BenchmarkError if a bomb got in."""
    champion, classes = model_to_serve(args.model)
    if not args.as_logged:
        champion = repackaged(champion, scratch / "repackaged")
    clips = list_clips(CLIPS_DIR)
    songs = build_songs(args.songs, clips, max(args.clients) * args.requests_per_client, scratch)
    bombs = bomb_bodies() if args.bombs else {}
    plan = Plan(args.workers, args.requests_per_client, classes, bombs, scratch)
    print(f"machine: {os.cpu_count()} cores; server workers: {args.workers}", flush=True)
    rows = []
    for song in songs:
        for clients in args.clients:
            print(f"{song.kind}, clients={clients}: starting a fresh server", flush=True)
            rows.append(measure(champion, song, clients, plan))
    print_report(rows)
    if not all(bomb.refused for row in rows for bomb in row.bombs):
        raise BenchmarkError("a decompression bomb was not refused with a 4xx")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="", help="model URI (default: the project champion)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--requests-per-client", type=int, default=3)
    parser.add_argument("--songs", nargs="+", choices=list(SONG_NAMES), default=list(SONG_NAMES))
    parser.add_argument("--workers", type=int, default=1, help="server worker processes")
    parser.add_argument("--bombs", action="store_true", help="also send 3 bombs during each load")
    parser.add_argument(
        "--as-logged",
        action="store_true",
        help="serve the model as it was logged (default: repackaged with params.yaml's serving)",
    )
    args = parser.parse_args()
    if min(args.clients) < 1 or args.requests_per_client < 1 or args.workers < 1:
        parser.error("--clients, --requests-per-client and --workers must be >= 1")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # A SIGTERM unwinds like Ctrl-C, so that the running server is stopped by its `finally`.
    signal.signal(signal.SIGTERM, lambda number, frame: sys.exit(128 + number))
    with tempfile.TemporaryDirectory(prefix="gtzan-serve-load-") as folder:
        try:
            benchmark(args, Path(folder))
        except (BenchmarkError, ConfigError) as error:  # a bad params.yaml: said, not a trace
            print(f"benchmarks/serve_load.py: FAILED: {error}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
