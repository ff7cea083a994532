"""The server under benchmark: started and stopped by the tests' own helpers (tests/
live_services.py: a free port, its own process group, waiting for it to answer, stopping the
whole group whatever happens), and measured from /proc: the CPU time and memory of its whole
process tree (uvicorn's workers are grandchildren of the command)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from serve_model import REPO_ROOT, BenchmarkError, Champion


def _live_services() -> ModuleType:
    """tests/live_services.py, the helpers the tests start their servers with."""
    tests = str(REPO_ROOT / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import live_services

    return live_services


def free_port() -> int:
    """A free TCP port of 127.0.0.1 (the tests' own choice of ports)."""
    return _live_services().free_port()


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


@dataclass(frozen=True)
class Server:
    """A running server: its URL, the leader of its process group, how long it took to answer."""

    url: str
    pid: int
    ready_s: float  # from its start to its first answer to GET /ping

    def cpu_seconds(self) -> float:
        return sum(cpu_seconds_of(pid) for pid in process_tree(self.pid))

    def memory(self) -> list[dict[str, Any]]:
        found = (memory_of(pid) for pid in process_tree(self.pid))
        return [entry for entry in found if entry is not None]


@contextlib.contextmanager
def _running(
    argv: list[str], port: int, log: Path, env: dict[str, str], cwd: Path, timeout_s: float
) -> Iterator[Server]:
    live = _live_services()
    with contextlib.ExitStack() as stack:
        try:
            running = stack.enter_context(
                live.running_server(argv, port, log, env, cwd, "/ping", timeout_s)
            )
        except AssertionError as error:  # it exited, or did not answer in time: with its log
            raise BenchmarkError(str(error)) from None
        yield Server(running.url, running.process.pid, running.ready_s)


def _environment(champion: Champion, **extra: str) -> dict[str, str]:
    """This process's environment with the champion's store, telemetry off, and this
    environment's scripts first on PATH (MLflow starts `uvicorn` by name)."""
    return {
        **os.environ,
        "MLFLOW_TRACKING_URI": champion.store,
        "MLFLOW_REGISTRY_URI": champion.store,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        **extra,
    }


@contextlib.contextmanager
def mlflow_models_serve(
    champion: Champion,
    workers: int,
    port: int,
    log: Path,
    model_config: dict[str, Any] | None,
    timeout_s: float,
) -> Iterator[Server]:
    """`mlflow models serve -m <champion> --env-manager local -w <workers>` on `port` until the
    block ends; `model_config` overrides the logged model config, as at any serve time."""
    extra = {"SERVING_MODEL_CONFIG": json.dumps(model_config)} if model_config else {}
    options = ["serve", "-m", champion.uri, "--env-manager", "local", "-w", str(workers)]
    argv = _live_services().mlflow_command("models", options, port)
    with _running(argv, port, log, _environment(champion, **extra), log.parent, timeout_s) as up:
        yield up


@contextlib.contextmanager
def project_serve(
    champion: Champion, workers: int, port: int, log: Path, timeout_s: float
) -> Iterator[Server]:
    """The project's `gtzan-mlops serve` (the guarded scoring app, params.yaml's allocator
    settings) of `champion` on `port` until the block ends."""
    options = ["--params", str(REPO_ROOT / "params.yaml"), "--host", "127.0.0.1"]
    options += ["--set", f"resources.serve.processes={workers}"]
    argv = _live_services().gtzan_serve_command(champion.uri, port, options)
    with _running(argv, port, log, _environment(champion), log.parent, timeout_s) as up:
        yield up


class RssSampler:
    """The summed RSS of the server's process tree, sampled every `period_s` in a thread."""

    def __init__(self, server: Server, period_s: float) -> None:
        self.server, self.period_s = server, period_s
        self.peak_mib, self.stopped = 0.0, threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def rss_mib(self) -> float:
        return sum(entry.get("VmRSS", 0.0) for entry in self.server.memory())

    def _sample(self) -> None:
        while not self.stopped.wait(self.period_s):
            self.peak_mib = max(self.peak_mib, self.rss_mib())

    def __enter__(self) -> RssSampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join()
