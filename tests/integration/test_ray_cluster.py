"""Ray: a real two-node cluster on this machine (tests/ray_cluster.py), and `ray_session`
attaching to it, starting a local Ray, and refusing before any work a cluster it cannot use: an
address nobody answers at, a missing or wrong token, another Ray version, workers with another
or no `gtzan_mlops`."""

from __future__ import annotations

import os
import platform
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import ray
import ray._private.services
import ray._private.utils
from live_services import free_port
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from ray_cluster import RayTestCluster, kill_worker_node, two_node_cluster

from gtzan_mlops.cluster import ClusterError, ray_session

pytestmark = [pytest.mark.slow, pytest.mark.network]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayTestCluster]:
    started = time.monotonic()
    with two_node_cluster(tmp_path_factory.mktemp("ray")) as running:
        print(f"two-node cluster up in {time.monotonic() - started:.1f} s")
        yield running


@ray.remote(num_cpus=1)
def node_of_task() -> str:
    return ray.get_runtime_context().get_node_id()


@ray.remote(num_cpus=1)
def worker_pid() -> int:
    return os.getpid()


def pinned(node: str) -> NodeAffinitySchedulingStrategy:
    return NodeAffinitySchedulingStrategy(node, soft=False)


def alive(pids: set[int]) -> set[int]:
    """The processes of `pids` still running (a zombie waits for its parent, it does not run)."""
    running = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                running.add(pid)
        except psutil.NoSuchProcess:
            continue
    return running


def wait_until_gone(pids: set[int], timeout_s: float = 30) -> set[int]:
    deadline = time.monotonic() + timeout_s
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive(pids)


def test_a_session_on_the_cluster_runs_a_task_on_each_node(cluster: RayTestCluster) -> None:
    started = time.monotonic()
    with ray_session(cluster.address, purpose="test") as session:
        print(f"connected and checked in {time.monotonic() - started:.1f} s")
        assert not session.local
        assert len(session.nodes) == 2
        assert session.cpus == 2
        refs = [
            node_of_task.options(scheduling_strategy=pinned(node)).remote()
            for node in session.nodes
        ]
        assert ray.get(refs, timeout=120) == list(session.nodes)
    assert not ray.is_initialized()
    # The session only attached: the cluster goes on with both nodes.
    cluster.wait_for_nodes(2, timeout_s=10)


def test_a_local_session_starts_ray_and_stops_it(
    cluster: RayTestCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Ray of its own, even with a cluster running and named in RAY_ADDRESS (which a plain
    ray.init() would attach to)."""
    monkeypatch.setenv("RAY_ADDRESS", cluster.address)
    before = {child.pid for child in psutil.Process().children(recursive=True)}
    auth_mode = os.environ.get("RAY_AUTH_MODE")
    started = time.monotonic()
    with ray_session(None, purpose="test", num_cpus=1) as session:
        print(f"local Ray up in {time.monotonic() - started:.1f} s")
        assert session.local
        assert session.address.rsplit(":", 1)[1] != cluster.address.rsplit(":", 1)[1]
        assert len(session.nodes) == 1
        assert session.cpus == 1
        assert ray.get(node_of_task.remote(), timeout=120) == session.nodes[0]
        ours = {child.pid for child in psutil.Process().children(recursive=True)} - before
        names = {psutil.Process(pid).name() for pid in alive(ours)}
        assert {"gcs_server", "raylet"} <= names
    assert not ray.is_initialized()
    assert wait_until_gone(ours) == set()
    assert os.environ.get("RAY_AUTH_MODE") == auth_mode


# Wall-clock bounds: run without the other worker's load (make test runs `-m timing` serially).
@pytest.mark.timing
@pytest.mark.parametrize("listener", ["none", "silent"])
def test_an_unreachable_address_fails_fast_with_a_fix(listener: str) -> None:
    """Nothing listens on the port (refused at once), or something that accepts connections and
    never speaks (Ray's GCS client would wait about 40 s for it)."""
    with socket.socket() as server:
        if listener == "silent":
            server.bind(("127.0.0.1", 0))
            server.listen()
            address = f"127.0.0.1:{server.getsockname()[1]}"
        else:
            address = f"127.0.0.1:{free_port()}"
        started = time.monotonic()
        with (
            pytest.raises(
                ClusterError, match=f"no Ray (cluster|GCS) answers at {re.escape(address)}"
            ) as failure,
            ray_session(address, purpose="test"),
        ):
            pytest.fail("the session started")
        elapsed = time.monotonic() - started
    print(f"{listener} listener at {address}: failed in {elapsed:.2f} s")
    assert elapsed < 20
    assert "resources.engine: local" in str(failure.value)
    assert "\n" not in str(failure.value)
    assert not ray.is_initialized()


@pytest.mark.parametrize(
    ("variable", "value", "reason"),
    [
        ("RAY_AUTH_TOKEN", "0" * 64, "token rejected"),
        ("RAY_AUTH_MODE", "disabled", "RAY_AUTH_MODE=disabled"),
    ],
    ids=["another-token", "auth-disabled"],
)
def test_a_driver_without_the_cluster_token_is_refused(
    cluster: RayTestCluster, monkeypatch: pytest.MonkeyPatch, variable: str, value: str, reason: str
) -> None:
    """The cluster runs with token authentication: another token (RAY_AUTH_TOKEN wins over
    ~/.ray/auth_token), or a driver told explicitly not to authenticate, gets a fix, not Ray's
    20 s of retries."""
    monkeypatch.setenv(variable, value)
    with (
        pytest.raises(ClusterError, match=f"refused this machine's authentication \\({reason}\\)"),
        ray_session(cluster.address, purpose="test"),
    ):
        pytest.fail("the session started")
    assert os.environ[variable] == value
    assert not ray.is_initialized()


def test_a_driver_on_no_node_of_the_cluster_is_refused(
    cluster: RayTestCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ray finds the raylets of this host by their command lines: as on a laptop outside the
    cluster, it finds none (Ray itself would wait 60 s, then fail)."""
    monkeypatch.setattr(ray._private.services, "find_node_ids", list)
    with (
        pytest.raises(ClusterError, match="this machine is not a node of the Ray cluster") as error,
        ray_session(cluster.address, purpose="test"),
    ):
        pytest.fail("the session started")
    assert f"ray start --address={cluster.address}" in str(error.value)
    assert not ray.is_initialized()


def test_a_cluster_of_another_ray_version_is_refused(
    cluster: RayTestCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The driver claims Ray 2.0.0: Ray's own check (cluster metadata in the GCS against
    `compute_version_info()` of the driver) fails exactly as on a cluster started with another
    Ray; one Ray on this machine cannot start a cluster of another version for real."""
    monkeypatch.setattr(
        ray._private.utils, "compute_version_info", lambda: ("2.0.0", platform.python_version())
    )
    with (
        pytest.raises(ClusterError, match=r"runs Ray 2\.60\.0 on Python") as failure,
        ray_session(cluster.address, purpose="test"),
    ):
        pytest.fail("the session started")
    assert "this driver Ray 2.0.0" in str(failure.value)
    assert "requirements.lock" in str(failure.value)
    assert not ray.is_initialized()


@pytest.mark.parametrize(
    ("init", "message"),
    [
        ('__version__ = "0.0.1+other"\n', r"runs gtzan_mlops 0\.0\.1\+other .*this driver 0\.1\.0"),
        (
            'raise ImportError("simulated: no gtzan_mlops on this node")\n',
            "cannot import gtzan_mlops .*simulated: no gtzan_mlops on this node",
        ),
    ],
    ids=["another-version", "not-importable"],
)
def test_workers_without_the_same_package_are_refused(
    cluster: RayTestCluster, tmp_path: Path, init: str, message: str
) -> None:
    """Workers really import another `gtzan_mlops`: the job's runtime_env puts a package of that
    name first on the workers' sys.path (py_modules), as a node with another install of the
    project (or a broken one) would have it. The driver keeps its own."""
    package = tmp_path / "gtzan_mlops"
    package.mkdir()
    (package / "__init__.py").write_text(init)
    with (
        pytest.raises(ClusterError, match=message) as failure,
        ray_session(cluster.address, purpose="test", runtime_env={"py_modules": [str(package)]}),
    ):
        pytest.fail("the session started")
    assert "pip install -e ." in str(failure.value)
    assert "resources.engine: local" in str(failure.value)
    assert not ray.is_initialized()


def test_a_stopped_cluster_leaves_no_process(tmp_path: Path) -> None:
    """A cluster of its own: workers ran on both nodes, the second node is killed (the helper a
    later test of a node dying mid-run uses), and after the block nothing it started runs."""
    with two_node_cluster(tmp_path) as own:
        with ray_session(own.address, purpose="test") as session:
            refs = [
                worker_pid.options(scheduling_strategy=pinned(n)).remote() for n in session.nodes
            ]
            workers = set(ray.get(refs, timeout=120))
            started = own.pids()
            assert workers <= started  # the raylet's workers belong to their node's session
            assert own.pids("head") and own.pids("worker")
        killed = time.monotonic()
        kill_worker_node(own)
        assert own.pids("worker") == set()
        own.wait_for_nodes(1, timeout_s=90)
        print(f"the GCS saw the second node die after {time.monotonic() - killed:.1f} s")
    assert wait_until_gone(started) == set()
    assert own.pids() == set()
