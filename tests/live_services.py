"""Helpers for the integration tests that drive real services: an MLflow tracking server on a
free local port, and a small project folder (params, synthetic feature tables, a split) that the
real stage CLIs run in."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pwd
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests
import yaml

from gtzan_mlops.features.feature_sets import write_settings
from gtzan_mlops.features.handcrafted import FEATURE_NAMES

SERVER_START_TIMEOUT_S = 180


# free_port hands out ports below Linux's ephemeral range (32768-60999), so that no outgoing
# connection or bind(0) of any process takes one between the choice and the server's own bind,
# and each pytest-xdist worker (gw0, gw1, ...) its own block, so that two workers never choose
# the same port for servers they start at the same time. A port is handed out once per process.
PORT_BLOCK_START, PORT_BLOCK_SIZE, PORT_BLOCKS = 20000, 500, 25
_handed_out: set[int] = set()


def _port_block() -> range:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # "gw3" under xdist, unset serially
    index = int(worker[2:]) + 1 if worker[2:].isdigit() else 0
    start = PORT_BLOCK_START + (index % PORT_BLOCKS) * PORT_BLOCK_SIZE
    return range(start, start + PORT_BLOCK_SIZE)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, from this test process's own
    block of ports (see PORT_BLOCK_START), never one it handed out before."""
    block = _port_block()
    offset = random.randrange(len(block))  # another pytest session on the machine starts elsewhere
    for step in range(len(block)):
        port = block[(offset + step) % len(block)]
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise AssertionError(f"no free port left in {block.start}-{block.stop - 1}")


def clean_env(**overrides: str) -> dict[str, str]:
    """The environment for a child process: this one's, without tracking or Optuna settings of
    the developer's shell, with the virtualenv's scripts first on PATH, plus `overrides`."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("MLFLOW_", "OPTUNA_"))
    }
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(
        MLFLOW_DISABLE_TELEMETRY="true",
        DO_NOT_TRACK="1",
        DVC_NO_ANALYTICS="1",
        TF_CPP_MIN_LOG_LEVEL="3",
        PYTHONUNBUFFERED="1",
    )
    env.update(overrides)
    return env


def stop_process(process: subprocess.Popen, timeout_s: float = 20) -> None:
    """Terminate a process we started (and the workers of its process group), then reap it."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, 15)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, 9)
        process.wait(timeout=timeout_s)


def wait_until_serving(
    url: str,
    process: subprocess.Popen,
    log: Path,
    health: str = "/health",
    timeout_s: float = SERVER_START_TIMEOUT_S,
) -> None:
    """Poll the server's `health` endpoint until it answers 200; fail with its log if it exits
    or has not answered within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(
                f"the server exited with {process.returncode} before answering:\n"
                f"{log.read_text(errors='replace')[-5000:]}"
            )
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"{url}{health}", timeout=5).status_code == 200:
                return
        time.sleep(0.5)
    raise AssertionError(
        f"{url} did not answer within {timeout_s:g} s:\n{log.read_text(errors='replace')[-5000:]}"
    )


@dataclasses.dataclass(frozen=True)
class RunningServer:
    url: str  # http://127.0.0.1:<port>
    process: subprocess.Popen  # the leader of the server's own process group
    log: Path  # its stdout and stderr
    ready_s: float  # from its start to its first healthy answer


@contextlib.contextmanager
def running_server(
    argv: list[str],
    port: int,
    log: Path,
    env: dict[str, str],
    cwd: Path | None = None,
    health: str = "/health",
    timeout_s: float = SERVER_START_TIMEOUT_S,
) -> Iterator[RunningServer]:
    """Run `argv`, a server that binds 127.0.0.1:`port`, in its own process group (so that its
    workers stop with it), output to `log`, until the block ends; yields it once `health`
    answers 200. Stopped (its whole process group) whatever happens."""
    with log.open("w") as log_file:
        process = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    started = time.monotonic()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(url, process, log, health, timeout_s)
        yield RunningServer(url, process, log, time.monotonic() - started)
    finally:
        stop_process(process)


def mlflow_command(command: str, options: list[str], port: int) -> list[str]:
    """`mlflow <command> <options>` on 127.0.0.1:`port`, by this environment's mlflow."""
    mlflow_cli = Path(sys.executable).parent / "mlflow"
    return [str(mlflow_cli), command, *options, "--host", "127.0.0.1", "--port", str(port)]


def gtzan_serve_command(model_uri: str, port: int, options: list[str] | None = None) -> list[str]:
    """`gtzan-mlops serve --model URI <options>` (the guarded scoring app) on `port`."""
    command = [str(Path(sys.executable).parent / "gtzan-mlops"), "serve", "--model", model_uri]
    return [*command, *(options or []), "--port", str(port)]


@contextlib.contextmanager
def mlflow_server(
    command: str, options: list[str], log: Path, env: dict[str, str] | None = None
) -> Iterator[str]:
    """Run `mlflow <command> <options> --host 127.0.0.1 --port <free>` until the block ends;
    yields its base URL. The server is stopped (its whole process group) even if the block
    fails.

    The server's job runner (huey consumers for GenAI jobs, which the pipeline never submits) is
    off unless `env` says otherwise: it doubles the start time on a 2-core machine and leaves a
    folder in /dev/shm behind."""
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or clean_env())}
    port = free_port()
    with running_server(mlflow_command(command, options, port), port, log, env) as server:
        yield server.url


# --- a small project the real stage CLIs run in ----------------------------------------------

GENRES = ["blues", "classical", "country", "disco", "hiphop"]
GENRES += ["jazz", "metal", "pop", "reggae", "rock"]
SEGMENTS_PER_CLIP = 10
SEGMENT_SAMPLES = 66150  # 3 s at 22050 Hz


def synthetic_feature_tables(
    songs_per_genre: int, seed: int = 0, song_spread: float = 1.0, prefix: str = ""
) -> tuple[pd.DataFrame, ...]:
    """Synthetic clip and segment tables in the features stage's layout: each genre's songs
    scatter around the genre's centre (by `song_spread`: larger makes genres harder to tell
    apart), each song's segments around the song. Track ids are `<prefix><genre>.000NN`."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=2.0, size=(len(GENRES), len(FEATURE_NAMES)))
    clips, segments = [], []
    for index, genre in enumerate(GENRES):
        for song in range(songs_per_genre):
            track = f"{prefix}{genre}.{song:05d}"
            song_centre = centres[index] + rng.normal(scale=song_spread, size=len(FEATURE_NAMES))
            clips.append([track, genre, SEGMENT_SAMPLES * SEGMENTS_PER_CLIP, *song_centre])
            for segment in range(SEGMENTS_PER_CLIP):
                values = song_centre + rng.normal(scale=0.7, size=len(FEATURE_NAMES))
                segments.append([track, segment, genre, SEGMENT_SAMPLES, *values])
    clip_table = pd.DataFrame(clips, columns=["track_id", "genre", "length", *FEATURE_NAMES])
    segment_table = pd.DataFrame(
        segments, columns=["track_id", "segment", "genre", "length", *FEATURE_NAMES]
    )
    return clip_table, segment_table


def set_params(path: Path, updates: dict[str, object]) -> None:
    """Set dotted keys (`train.knn.n_trials`) of a params.yaml."""
    params = yaml.safe_load(path.read_text())
    for dotted, value in updates.items():
        *parents, last = dotted.split(".")
        node = params
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def run_command(command: list[str], cwd: Path, env: dict[str, str], timeout_s: float = 600) -> str:
    """Run a command in `cwd`; its output, or an AssertionError with it if the command fails."""
    result = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s
    )
    if result.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result.stdout + result.stderr


def run_stage(args: list[str], project: Path, env: dict[str, str], timeout_s: float = 600) -> str:
    """Run `gtzan-mlops <args> --params <project>/params.yaml` in the project."""
    command = [sys.executable, "-m", "gtzan_mlops", *args, "--params", str(project / "params.yaml")]
    return run_command(command, project, env, timeout_s)


# Small training budgets for tests that run the real stages: they check the wiring, not model
# quality (dotted params.yaml keys, for `set_params`).
QUICK_BUDGETS: dict[str, object] = {
    "train.random_forest.space.n_estimators": {"type": "int", "low": 10, "high": 30, "step": 10},
    "train.random_forest.defaults.n_estimators": 20,
    "train.mlp.space.max_iter": 50,
    "train.mlp.space.hidden_layers": {"type": "categorical", "choices": ["32", "32-16"]},
    "train.mlp.defaults.hidden_layers": "32",
    "train.fnn.space.epochs": 4,
    "train.fnn.space.patience": 2,
    "train.fnn_simple.space.epochs": 4,
    "train.fnn_simple.space.patience": 2,
    "train.xgboost.space.n_estimators": 40,
    "train.xgboost.space.early_stopping_rounds": 5,
    "train.pruner.n_warmup_steps": 1,
}


def small_project(
    folder: Path,
    repo_root: Path,
    families: list[str],
    n_trials: int,
    songs_per_genre: int = 5,
    updates: dict[str, object] | None = None,
    song_spread: float = 1.0,
    audio_seconds: float | None = None,
) -> Path:
    """A project folder the stage CLIs run in: the repository's params.yaml narrowed to
    `families` (trained, evaluated and promotable), `n_trials` each with QUICK_BUDGETS, then
    `updates`; synthetic feature tables (see `synthetic_feature_tables`), and the split written
    by the real `split` code.

    With `audio_seconds`, the tracks also have audio for the promote stage to play: the fetch
    stage's synthetic demo clips of that length, under the same track ids, and the duplicates
    stage's table of them. The feature tables stay made up: they do not describe that audio."""
    from gtzan_mlops.data import synthetic_demo
    from gtzan_mlops.settings.loading import load_settings
    from gtzan_mlops.stages import duplicates, fetch, split

    folder.mkdir(parents=True, exist_ok=True)
    params_path = folder / "params.yaml"
    params_path.write_text((repo_root / "params.yaml").read_text())
    set_params(
        params_path,
        {
            "train.families": list(families),
            "evaluate.candidates": list(families),
            # The synthetic tables are hand-crafted ones only, of no audio to fingerprint.
            "train.candidate_feature_sets": [],
            "split.group_duplicates": False,
            "evaluate.families": list(families),
            **{f"train.{family}.n_trials": n_trials for family in families},
            "train.demo_max_trials": None,  # `n_trials` as given, on demo audio too
            **QUICK_BUDGETS,
            **(updates or {}),
        },
    )
    if audio_seconds is not None:
        set_params(
            params_path,
            {
                "data.source": "demo",
                "data.demo.clips_per_genre": songs_per_genre,
                "data.demo.duration_s": audio_seconds,
            },
        )
        audio_params = load_settings(params_path)
        fetch.run(audio_params, folder, show_progress=False)
        duplicates.run(audio_params, folder)
    clips, segments = synthetic_feature_tables(
        songs_per_genre,
        song_spread=song_spread,
        prefix=synthetic_demo.TRACK_PREFIX if audio_seconds is not None else "",
    )
    features = folder / "data" / "features"
    features.mkdir(parents=True, exist_ok=True)
    clips.to_csv(features / "features_30_sec.csv", index=False)
    segments.to_csv(features / "features_3_sec.csv", index=False)
    params = load_settings(params_path)
    write_settings(features, params.features)  # as the features stage does
    split.run(params, folder)
    return folder


# --- a throwaway PostgreSQL server on 127.0.0.1 ------------------------------------------------

POSTGRES_PACKAGE_HINT = "install PostgreSQL with `bash .ci/system-packages.sh` (Debian: postgresql)"


def postgres_bin() -> Path | None:
    """The folder of PostgreSQL's server programs (initdb, pg_ctl): Debian keeps them out of PATH
    in /usr/lib/postgresql/<version>/bin (the newest wins); else wherever PATH has initdb."""
    folders = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda folder: int(folder.parent.name) if folder.parent.name.isdigit() else 0,
    )
    for folder in reversed(folders):
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


@contextlib.contextmanager
def postgres_server(databases: list[str]) -> Iterator[str]:
    """A new PostgreSQL cluster in a temporary folder, listening on 127.0.0.1 on a free port
    (trust authentication, user `postgres`), with `databases` created; yields the server's
    SQLAlchemy URL without a database (postgresql+psycopg2://postgres@127.0.0.1:<port>): add
    /<database>. Stopped and deleted after.

    PostgreSQL refuses to run as root: as root the cluster belongs to, and runs as, the
    `postgres` system user that the Debian package creates."""
    import psycopg2

    programs = postgres_bin()
    if programs is None:
        raise AssertionError(f"PostgreSQL's initdb/pg_ctl not found: {POSTGRES_PACKAGE_HINT}")
    as_user: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="gtzan-postgres-"))  # in /tmp, not under root's 0700
    if os.geteuid() == 0:
        try:
            account = pwd.getpwnam("postgres")
        except KeyError as error:
            shutil.rmtree(folder, ignore_errors=True)
            raise AssertionError(f"no `postgres` system user: {POSTGRES_PACKAGE_HINT}") from error
        os.chown(folder, account.pw_uid, account.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, log = folder / "data", folder / "postgres.log"
    port = free_port()

    def run(program: str, *args: str) -> None:
        result = subprocess.run(
            [*as_user, str(programs / program), *args],
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=180,
        )
        if result.returncode != 0:
            server_log = log.read_text(errors="replace")[-3000:] if log.is_file() else ""
            raise AssertionError(
                f"{program} {' '.join(args)} failed ({result.returncode}):\n"
                f"{result.stdout}\n{result.stderr}\n{server_log}"
            )

    started = False
    try:
        run("initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "--no-locale")
        # Only TCP on 127.0.0.1, the socket in our folder; no fsync (a throwaway cluster).
        options = f"-h 127.0.0.1 -p {port} -k {folder} -F"
        run("pg_ctl", "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "120", "start")
        started = True
        connection = psycopg2.connect(
            host="127.0.0.1", port=port, user="postgres", dbname="postgres"
        )
        try:
            connection.autocommit = True  # CREATE DATABASE runs outside a transaction
            with connection.cursor() as cursor:
                for database in databases:
                    cursor.execute(f'CREATE DATABASE "{database}"')
        finally:
            connection.close()
        # SQLAlchemy 2.1 (MLflow's and Optuna's RDB stores) reads plain postgresql:// as the
        # psycopg 3 driver; psycopg2 is the one installed.
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}"
    finally:
        if started:
            with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
                run("pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)


CHROMIUM = Path("/usr/bin/chromium")  # Debian package `chromium` (.ci/system-packages.sh)
# A fresh profile (user_data_dir) per test, and nothing that phones home: this machine's network
# refuses background connections.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
]


@contextlib.contextmanager
def chromium_page(tmp_path: Path, timeout_ms: float = 60_000) -> Iterator:
    """A page of headless Chromium (the Debian build, driven by Playwright) on a fresh profile."""
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing: install it with `bash .ci/system-packages.sh`")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1600, "height": 1000},
        )
        try:
            page = context.new_page()
            page.set_default_timeout(timeout_ms)
            yield page
        finally:
            context.close()


# --- a throwaway S3-compatible server (moto) on 127.0.0.1 --------------------------------------

# Fake credentials for moto: clients read them from the environment only (never ~/.aws), and
# no client asks the EC2 metadata service for credentials or a region.
S3_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    # Paths that never exist (dvc-s3 and botocore skip a missing file): no ~/.aws settings.
    "AWS_CONFIG_FILE": "/dev/null/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/dev/null/aws-credentials",
}


@contextlib.contextmanager
def s3_server(log: Path) -> Iterator[str]:
    """moto's standalone S3 server (`moto_server`, in memory) on a free port of 127.0.0.1 until
    the block ends; yields its endpoint URL (http://127.0.0.1:<port>). Any credentials are
    accepted: use S3_TEST_ENV. Stopped (its process group) whatever happens."""
    port = free_port()
    argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    with running_server(argv, port, log, clean_env(), health="/moto-api/data.json") as server:
        yield server.url


@contextlib.contextmanager
def gtzan_serve(
    model_uri: str, env: dict[str, str], log_path: Path, cwd: Path | None = None
) -> Iterator[str]:
    """`gtzan-mlops serve --model URI` (the guarded scoring app) on a free port with `env`;
    yields its base URL and stops it whatever happens."""
    port = free_port()
    with running_server(gtzan_serve_command(model_uri, port), port, log_path, env, cwd) as server:
        yield server.url
