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
`serving.packaging.log_serving_model` as the promote stage logs it.

    python benchmarks/serve.py                          # the project's champion
    python benchmarks/serve.py --build-demo-champion    # no champion yet: a demo one
    python benchmarks/serve.py --model models:/NAME/3 --requests 50 --concurrency 2 --by-path
    python benchmarks/serve.py --build-demo-champion --load 200
    python benchmarks/serve.py --clips-dir DIR --workers 2 --warmup 5
"""

from __future__ import annotations

import argparse
import os
import queue
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import requests
from serve_model import (
    BenchmarkError,
    Champion,
    build_demo_champion,
    describe_model,
    project_champion,
)
from serve_requests import Client, Run, bad_bodies, bomb_bodies, list_clips, post
from serve_server import RssSampler, Server, free_port, mlflow_models_serve

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
DEFAULT_CLIPS = SHARED_DATA / "gtzan_mini"
DEFAULT_REFERENCE = SHARED_DATA / "gtzan_reference" / "features_30_sec.csv"
TARGET_MS = 1000.0  # the target: under a second per 30 s clip
LOAD_RSS_GROWTH_MIB = 300  # --load: the server's RSS may grow by less than this over the run
RSS_PERIOD_S = 0.05  # --load: how often the server's RSS is sampled


# --- the hostile load (--load) ----------------------------------------------------------------


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

    sampler = RssSampler(server, RSS_PERIOD_S)
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


def measure(
    args: argparse.Namespace, server: Server, clips: list[Path], classes: list[str]
) -> tuple[list[Run], str, list[dict[str, Any]], list[dict[str, Any]]]:
    """The runs on a ready server: the warm-up, the timed runs (base64, and by path with
    --by-path), the bad request, then --load's hostile load. Returns the timed runs, what the
    bad request got, and the server's memory when ready and after the timed runs."""
    at_ready = server.memory()
    client = Client(f"{server.url}/invocations", clips, classes, args.request_timeout)
    client.prepare(max(args.requests, args.warmup), by_path=False)
    body_mib = np.mean([len(body) for body in client.bodies.values()]) / 2**20
    print(f"ready:   after {server.ready_s:.1f} s; base64 request bodies {body_mib:.2f} MiB each")

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
            runs.append(measured(f"{how}, {args.concurrency} clients", args.concurrency, by_path))
    at_end = server.memory()
    if args.load:
        hostile_load(server, client, args.load, args.load_clients)
    return runs, bad_request, at_ready, at_end


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
    port = free_port()
    print(
        f"server:  mlflow models serve --env-manager local -w {args.workers} on "
        f"http://127.0.0.1:{port}",
        flush=True,
    )
    log = scratch / "serve.log"
    with mlflow_models_serve(
        champion, args.workers, port, log, overrides, args.startup_timeout
    ) as server:
        runs, bad_request, at_ready, at_end = measure(args, server, clips, classes)

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
        settings = load_settings(args.params)
    except ConfigError as error:
        print(f"benchmarks/serve.py: {error}", file=sys.stderr)
        return 2
    args.genres = list(settings.genres)

    with tempfile.TemporaryDirectory(prefix="gtzan-serve-benchmark-") as folder:
        scratch = Path(folder)
        try:
            if args.model:
                from gtzan_mlops import tracking

                champion = Champion(args.model, tracking.tracking_uri(REPO_ROOT))
            else:
                found, reason = project_champion(settings)
                if args.build_demo_champion:
                    if found:
                        print(f"(the project store has a champion, {found.uri}; serving a demo)")
                    started = time.perf_counter()
                    (scratch / "store").mkdir()
                    champion = build_demo_champion(settings, args.reference, scratch / "store")
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
