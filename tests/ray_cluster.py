"""A real Ray cluster of two nodes on this machine, for the integration tests that run work on
Ray: a head and a second node started with `ray start`, each with one CPU, token
authentication on (what Ray 2.60's `ray start` does whenever a token exists), and stopped by
killing the process sessions of the two `ray start` commands, never with `ray stop` (which stops
every Ray process of the user on the machine, other tests' too). Each `ray start` leads a
session of its own, which every daemon and worker of its node inherits (the raylet gives each
worker a process group of its own, not a session): what a node runs is its session."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from live_services import clean_env, free_port

RAY_CLI = Path(sys.executable).parent / "ray"
START_TIMEOUT_S = 180
STOP_GRACE_S = 2

# Asks the cluster's GCS how many nodes are alive until `want` are (or the deadline passes), in a
# child process: the authentication mode is process-wide state in Ray, the test process keeps its
# own.
_COUNT_NODES = """
import sys, time
from ray._raylet import GcsClient
from ray.core.generated.gcs_pb2 import GcsNodeInfo
address, want, deadline = sys.argv[1], int(sys.argv[2]), time.monotonic() + float(sys.argv[3])
client = GcsClient(address=address)
while True:
    infos = client.get_all_node_info(timeout=10).values()
    alive = sum(info.state == GcsNodeInfo.GcsNodeState.ALIVE for info in infos)
    if alive == want or time.monotonic() > deadline:
        print(alive)
        sys.exit(alive != want)
    time.sleep(0.5)
"""


@dataclass
class RayTestCluster:
    """The running cluster: its GCS address, and the session of each node's processes."""

    address: str
    temp_dir: Path  # Ray's (short: socket paths)
    log_dir: Path  # the output of `ray start`
    env: dict[str, str]
    sessions: dict[str, int] = field(default_factory=dict)  # "head" / "worker" -> session id

    def pids(self, *nodes: str) -> set[int]:
        """Live (not zombie) processes of the named nodes (default: both)."""
        wanted = {self.sessions[node] for node in nodes or self.sessions}
        found = set()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                state, _ppid, _group, session = stat.rsplit(")", 1)[1].split()[:4]
                if int(session) in wanted and state != "Z":
                    found.add(int(entry.name))
        return found

    def wait_for_nodes(self, want: int, timeout_s: float = START_TIMEOUT_S) -> None:
        """Block until the GCS reports exactly `want` alive nodes."""
        result = subprocess.run(
            [sys.executable, "-c", _COUNT_NODES, self.address, str(want), str(timeout_s)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout_s + 60,
        )
        if result.returncode != 0:
            raise AssertionError(
                f"{self.address}: {result.stdout.strip() or '?'} alive nodes, not {want}, "
                f"after {timeout_s:.0f} s\n{result.stderr[-3000:]}\n{self.logs()}"
            )

    def logs(self) -> str:
        """The tail of the `ray start` output and of the raylets' and GCS's error logs."""
        parts = []
        for path in sorted([*self.log_dir.glob("start-*.log"), *self.temp_dir.rglob("*")]):
            if path.suffix in {".log", ".err", ".out"} and path.name.startswith(
                ("start-", "gcs_server", "raylet")
            ):
                with contextlib.suppress(OSError):
                    parts.append(f"--- {path}\n{path.read_text(errors='replace')[-1500:]}")
        return "\n".join(parts)


def _ensure_token(env: dict[str, str]) -> None:
    """The nodes and every driver find the token where Ray looks by default; create it as a local
    ray.init() would if this user has none (`ray get-auth-token --generate` writes
    ~/.ray/auth_token only when it is missing)."""
    if env.get("RAY_AUTH_TOKEN") or env.get("RAY_AUTH_TOKEN_PATH"):
        return
    if not (Path.home() / ".ray" / "auth_token").is_file():
        subprocess.run(
            [str(RAY_CLI), "get-auth-token", "--generate"],
            env=env,
            check=True,
            capture_output=True,
            timeout=120,
        )


def _start_node(cluster: RayTestCluster, node: str, options: list[str]) -> None:
    log = cluster.log_dir / f"start-{node}.log"
    argv = [
        str(RAY_CLI),
        "start",
        "--num-cpus=1",
        "--object-store-memory=200000000",
        "--disable-usage-stats",
        f"--temp-dir={cluster.temp_dir / node}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        *options,
    ]
    with log.open("w") as output:
        process = subprocess.Popen(
            argv,
            stdout=output,
            stderr=subprocess.STDOUT,
            env=cluster.env,
            start_new_session=True,  # a session of its own, inherited by all it starts
        )
    cluster.sessions[node] = process.pid
    try:
        returncode = process.wait(timeout=START_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        returncode = None
    if returncode != 0:
        raise AssertionError(f"`{' '.join(argv)}` failed ({returncode}):\n{cluster.logs()}")


def _kill(cluster: RayTestCluster, nodes: tuple[str, ...], within_s: float) -> set[int]:
    """SIGKILL the nodes' processes (again any that appear meanwhile) until none is alive or
    `within_s` have passed; returns those still alive."""
    deadline = time.monotonic() + within_s
    while (pids := cluster.pids(*nodes)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    return cluster.pids(*nodes)


def stop_cluster(cluster: RayTestCluster, *nodes: str) -> None:
    """SIGTERM the processes of the named nodes (default: both), SIGKILL what is left after
    STOP_GRACE_S, and wait until none of them is alive."""
    nodes = nodes or tuple(cluster.sessions)
    for pid in cluster.pids(*nodes):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    while cluster.pids(*nodes) and time.monotonic() < deadline:
        time.sleep(0.2)
    if survivors := _kill(cluster, nodes, within_s=30):
        raise AssertionError(f"Ray processes {sorted(survivors)} survived SIGKILL")


def kill_worker_node(cluster: RayTestCluster) -> None:
    """Kill the second node the hard way (SIGKILL to everything it runs: raylet, agents,
    workers), as a machine that dies would. The GCS declares it dead a few seconds later, after
    failed health checks: `cluster.wait_for_nodes(1)` waits for that."""
    if survivors := _kill(cluster, ("worker",), within_s=30):
        raise AssertionError(f"Ray processes {sorted(survivors)} survived SIGKILL")


@contextlib.contextmanager
def two_node_cluster(tmp_path: Path) -> Iterator[RayTestCluster]:
    """A head and a second node on 127.0.0.1, one CPU each, both alive when this yields; stopped
    (the processes it started, nothing else) whatever happens. Ray's temp dirs go to a short
    /tmp/ray-XXXX (Unix socket paths are limited to ~107 characters), removed afterwards; the
    output of the `ray start` commands stays in `tmp_path`."""
    env = clean_env(
        RAY_AUTH_MODE="token",
        RAY_USAGE_STATS_ENABLED="0",
        # The GCS asks each raylet every second (Ray: 3 s) whether it is alive, so that a killed
        # node is declared dead after about 5 s, not 15.
        RAY_health_check_period_ms="1000",
    )
    env.pop("RAY_ADDRESS", None)
    _ensure_token(env)
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    address = f"127.0.0.1:{free_port()}"
    cluster = RayTestCluster(address, temp_dir, tmp_path, env)
    try:
        _start_node(
            cluster,
            "head",
            [
                "--head",
                "--node-ip-address=127.0.0.1",
                f"--port={address.rsplit(':', 1)[1]}",
                "--include-dashboard=false",
                f"--dashboard-port={free_port()}",
                f"--ray-client-server-port={free_port()}",
            ],
        )
        # One log monitor per host (Ray's advice); worker stdout is not sent to drivers anyway.
        _start_node(cluster, "worker", [f"--address={address}", "--include-log-monitor=false"])
        cluster.wait_for_nodes(2)
        yield cluster
    finally:
        try:
            stop_cluster(cluster)
        finally:
            shutil.rmtree(temp_dir, ignore_errors=True)
