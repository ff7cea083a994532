"""Where work runs on Ray: a session on an existing cluster, or on a local Ray started for one
stage (no dashboard, no usage stats), checked before any work: `ray_session`.

`resources.ray.address` is the GCS address `host:port` that `ray start --head --port=PORT`
prints (null: a local Ray). Before any work, each problem below is a one-line `ClusterError`
that says what is wrong and how to fix it:

- nothing answers at the address: a TCP connect bounded by CONNECT_TIMEOUT_S, then Ray's GCS
  client with GCS_CONNECT (Ray's own would retry for about 40 s);
- the cluster wants an authentication token this machine does not have (or another one);
- this machine is not a node of the cluster (see 2. below);
- the cluster runs another Ray or Python version than this driver (Ray's own check, rephrased);
- a node cannot import `gtzan_mlops` or runs another version of it: one small task per node
  reports the package's version and a digest of its .py files, compared with the driver's.

What a remote cluster needs:

1. The same Python (to the patch level), Ray (requirements.lock) and project on every node and
   on the machine that runs the stage: `pip install -e .` in the same checkout.
2. The stage's machine must be a node of the cluster: a Ray driver attaches to a raylet on its
   own host (`ray start --address=HEAD:PORT` there first, or run the stage on the head). Ray
   Client addresses (`ray://...`) are not supported.
3. Authentication (Ray 2.60): `ray start` turns token authentication on when RAY_AUTH_MODE=token
   or a token exists (RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token);
   a local `ray.init()` always does, creating ~/.ray/auth_token if missing. All nodes and the
   driver need the same token: `ray get-auth-token --generate` on the head, copy ~/.ray/auth_token
   to every machine (or export RAY_AUTH_TOKEN there), start every node with RAY_AUTH_MODE=token.
   For an explicit address Ray sends a token only under RAY_AUTH_MODE=token; `ray_session` asks
   the cluster instead: if it refuses a driver without a token and one is available here, the
   session runs in token mode (an explicit RAY_AUTH_MODE is respected). The modes must match: a
   token-mode driver on a cluster without authentication loses its actors.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

# Nothing this project runs phones home: set before this module imports ray (lazily, below).
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

CONNECT_TIMEOUT_S = 3.0  # the TCP check of a cluster's address
GCS_TIMEOUT_S = 10.0  # each question to a cluster's GCS once it answers
PROBE_TIMEOUT_S = 120.0  # a worker process per node to start and report the package it imports
AUTH_MODE = "RAY_AUTH_MODE"
# How long Ray's GCS client tries to connect (Ray's defaults: 5 s per channel, 30 s in all).
GCS_CONNECT = {"RAY_gcs_rpc_server_connect_timeout_s": "2", "RAY_py_gcs_connect_timeout_s": "3"}
PACKAGE = "gtzan_mlops"
FIX_PACKAGE = (
    "install the project on every node (`pip install -e .` in the same checkout) "
    "or run with resources.engine: local"
)


class ClusterError(RuntimeError):
    """The Ray cluster cannot run the work: what is wrong and how to fix it, on one line."""


@dataclass(frozen=True)
class RaySession:
    """A connected session: the GCS address, the alive nodes when it started, their CPUs."""

    address: str
    local: bool
    nodes: tuple[str, ...]
    cpus: int


@contextlib.contextmanager
def ray_session(
    address: str | None,
    *,
    purpose: str,
    num_cpus: int | None = None,
    runtime_env: dict[str, Any] | None = None,
) -> Iterator[RaySession]:
    """Connect to the cluster at `address` (`host:port`), or start a local Ray when None (with
    `num_cpus`, default all); check it (see the module's docstring) and disconnect when done,
    also on error. `purpose` names the work in messages and in the job's metadata."""
    import ray

    if ray.is_initialized():
        raise ClusterError(f"{purpose}: Ray is already connected in this process")
    saved_mode = os.environ.get(AUTH_MODE)
    try:
        if address is None:
            yield _start_local(purpose, num_cpus, runtime_env)
        else:
            yield _connect(address, purpose, runtime_env)
    finally:
        ray.shutdown()
        _set_ray_env({AUTH_MODE: saved_mode})


def _start_local(
    purpose: str, num_cpus: int | None, runtime_env: dict[str, Any] | None
) -> RaySession:
    import ray

    # What ray.init does for a new local Ray anyway (token mode, a token created if missing),
    # explicit so that it does not warn about it on every stage.
    if os.environ.get(AUTH_MODE) is None:
        _set_ray_env({AUTH_MODE: "token"})
    # "local", not None: None would attach to a cluster found in RAY_ADDRESS or /tmp/ray.
    options = {"num_cpus": num_cpus, "include_dashboard": False, "runtime_env": runtime_env}
    context = _ray_init(purpose, "local", options)
    nodes = tuple(node["NodeID"] for node in ray.nodes() if node["Alive"])
    cpus = int(ray.cluster_resources().get("CPU", 0))
    return RaySession(context.address_info["gcs_address"], True, nodes, cpus)


def _connect(address: str, purpose: str, runtime_env: dict[str, Any] | None) -> RaySession:
    import ray
    from ray._common.usage.usage_lib import get_cluster_metadata
    from ray._private.utils import compute_version_info

    fix = "fix resources.ray.address or run with resources.engine: local"
    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():
        raise ClusterError(
            f"{purpose}: Ray address {address!r} is not the host:port of `ray start --head` "
            f"(Ray Client addresses are not supported); {fix}"
        )
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as error:
        raise ClusterError(
            f"{purpose}: no Ray cluster answers at {address} ({error.strerror or error}): "
            f"start one there (`ray start --head --port={port}`), {fix}"
        ) from error
    gcs = _gcs_client(address, purpose, fix)
    nodes = _local_node_of(gcs, address, purpose)
    try:
        _ray_init(purpose, address, {"runtime_env": runtime_env})
    except RuntimeError as error:
        if not str(error).startswith("Version mismatch"):
            raise
        cluster = get_cluster_metadata(gcs) or {}
        ray_version, python_version = compute_version_info()
        raise ClusterError(
            f"{purpose}: the Ray cluster at {address} runs Ray {cluster.get('ray_version')} on "
            f"Python {cluster.get('python_version')}, this driver Ray {ray_version} on Python "
            f"{python_version}: install the same versions (requirements.lock) on every node, "
            "or run with resources.engine: local"
        ) from error
    except ConnectionError as error:
        cause = error.__cause__ or error
        raise ClusterError(f"{purpose}: cannot attach to {address} ({cause}); {fix}") from error
    _check_package(address, purpose, nodes)
    return RaySession(address, False, tuple(nodes), int(ray.cluster_resources().get("CPU", 0)))


def _ray_init(purpose: str, address: str, options: dict[str, Any]) -> Any:
    import ray

    job = ray.job_config.JobConfig(metadata={PACKAGE: purpose})
    return ray.init(
        address, log_to_driver=False, logging_level=logging.WARNING, job_config=job, **options
    )


def _set_ray_env(values: dict[str, str | None]) -> dict[str, str | None]:
    """Set (None: unset) RAY_* variables and make this process's Ray read them again: Ray caches
    its config and token (as Ray's own authentication_test_utils.reset_auth_token_state does).
    Returns the values they had."""
    from ray._raylet import AuthenticationTokenLoader, Config

    before = {name: os.environ.get(name) for name in values}
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
    return before


def _gcs_client(address: str, purpose: str, fix: str) -> Any:
    """A client of the cluster's GCS, in the authentication mode the cluster wants (asked without
    a token first: a cluster without authentication also accepts one, and cannot tell), that
    gives up connecting after a few seconds (GCS_CONNECT), not Ray's 40."""
    from ray._raylet import AuthenticationTokenLoader, GcsClient
    from ray.exceptions import AuthenticationError, RpcError

    refused = (
        f"{purpose}: the Ray cluster at {address} refused this machine's authentication "
        "({}): copy the head's token (`ray get-auth-token` there) to ~/.ray/auth_token or "
        "RAY_AUTH_TOKEN on this machine"
    )
    explicit = os.environ.get(AUTH_MODE)
    short = {name: os.environ.get(name, value) for name, value in GCS_CONNECT.items()}
    before = _set_ray_env({**short, AUTH_MODE: explicit or "disabled"})
    try:
        try:
            return GcsClient(address=address)
        except AuthenticationError as error:
            if not AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True):
                raise ClusterError(refused.format("no token found")) from error
            if explicit is not None:
                raise ClusterError(refused.format(f"{AUTH_MODE}={explicit}")) from error
        except RpcError as error:
            message = f"{purpose}: no Ray GCS answers at {address} ({error}); {fix}"
            raise ClusterError(message) from error
        _set_ray_env({AUTH_MODE: "token"})
        try:
            return GcsClient(address=address)
        except AuthenticationError as error:
            raise ClusterError(refused.format("token rejected")) from error
    finally:
        _set_ray_env({name: before[name] for name in GCS_CONNECT})


def _local_node_of(gcs: Any, address: str, purpose: str) -> list[str]:
    """The alive nodes, one of them on this host: a driver attaches to a raylet of its own host
    (Ray would wait 60 s for one)."""
    from ray._private.services import find_node_ids
    from ray.core.generated.gcs_pb2 import GcsNodeInfo

    infos = gcs.get_all_node_info(timeout=GCS_TIMEOUT_S).items()
    alive = {node.hex() for node, info in infos if info.state == GcsNodeInfo.GcsNodeState.ALIVE}
    if not alive & set(find_node_ids()):
        raise ClusterError(
            f"{purpose}: this machine is not a node of the Ray cluster at {address}: run "
            f"`ray start --address={address}` here first, or run the command on the head node"
        )
    return sorted(alive)


def package_identity_probe() -> Callable[[], dict[str, str]]:
    """A function reporting the `gtzan_mlops` a process imports: its version, a sha256 over the
    names and bytes of its .py files, its folder. Local, so that Ray ships it by value and a
    worker runs it whatever version of the package it has, or none."""

    def identity() -> dict[str, str]:
        import hashlib
        import importlib
        from pathlib import Path

        try:
            package = importlib.import_module(PACKAGE)
        except ImportError as error:
            return {"error": f"{type(error).__name__}: {error}"}
        root = Path(package.__file__).resolve().parent
        digest = hashlib.sha256()
        for path in sorted(root.rglob("*.py")):
            digest.update(path.relative_to(root).as_posix().encode() + b"\0")
            digest.update(path.read_bytes())
        version = str(getattr(package, "__version__", "?"))
        return {"version": version, "digest": digest.hexdigest(), "at": str(root)}

    return identity


def _check_package(address: str, purpose: str, nodes: list[str]) -> None:
    """One task per node (pinned to it, no CPU needed) compares its package with the driver's."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = package_identity_probe()
    task = ray.remote(num_cpus=0, max_retries=0)(probe)
    refs = [
        task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()
        for node in nodes
    ]
    try:
        found = ray.get(refs, timeout=PROBE_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError as error:
        raise ClusterError(
            f"{purpose}: the nodes of the Ray cluster at {address} did not run a worker within "
            f"{PROBE_TIMEOUT_S:.0f} s; check the nodes' logs, or run with resources.engine: local"
        ) from error
    except ray.exceptions.RayError as error:
        cause = getattr(error, "cause", None) or error
        summary = f"{type(cause).__name__}: {cause}".splitlines()[0]
        raise ClusterError(
            f"{purpose}: a worker of the Ray cluster at {address} failed to report its "
            f"{PACKAGE} ({summary}); {FIX_PACKAGE}"
        ) from error
    expected = probe()  # after the workers' reports: the closest in time
    for node, identity in zip(nodes, found, strict=True):
        where = f"{purpose}: node {node[:12]} of the Ray cluster at {address}"
        if "error" in identity:
            raise ClusterError(
                f"{where} cannot import {PACKAGE} ({identity['error']}): {FIX_PACKAGE}"
            )
        if (identity["version"], identity["digest"]) != (expected["version"], expected["digest"]):
            raise ClusterError(
                f"{where} runs {PACKAGE} {identity['version']} (source {identity['digest'][:12]}"
                f", at {identity['at']}), this driver {expected['version']} (source "
                f"{expected['digest'][:12]}): {FIX_PACKAGE}"
            )


def failure_line(error: BaseException) -> str:
    """What Ray work failed of, on one line: the task's own exception when it raised one, else
    Ray's error (e.g. its worker process or node died), as `Type: first line`."""
    from ray.exceptions import RayTaskError

    cause = (error.cause if isinstance(error, RayTaskError) else None) or error
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0]}" if lines else type(cause).__name__
