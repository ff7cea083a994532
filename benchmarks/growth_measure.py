"""How the growth benchmark (benchmarks/growth.py) measures one stage: its command run in a
project, in a process group of its own (stopped whatever happens); its wall time; the peak of the
summed RSS (and PSS) of its process tree, sampled every SAMPLE_S seconds by TreeMemory; its CPU
time; and how many cores other work on the machine kept busy meanwhile, which slows it down."""

from __future__ import annotations

import contextlib
import resource
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
from growth_report import ANY_ENGINE

if TYPE_CHECKING:
    from growth import Stage

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_S = 0.2  # how often the process tree's memory is sampled
LOG_TAIL_LINES = 20  # of a failed stage's output, kept in the JSON
MIB = 2**20


def live_services() -> Any:
    """tests/live_services.py: the environment the tests run stage commands in."""
    tests = str(REPO_ROOT / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import live_services

    return live_services


class TreeMemory:
    """Samples, every SAMPLE_S, the summed RSS and PSS of a process and all its descendants;
    keeps the peaks (bytes) and the most processes seen at once."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_rss = self.peak_pss = self.most_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(self.pid)
            while not self._stop.is_set():
                tree = [root, *root.children(recursive=True)]
                rss = pss = 0
                for process in tree:
                    try:
                        memory = process.memory_full_info()
                    except psutil.Error:
                        continue  # ended between listing and reading
                    rss, pss = rss + memory.rss, pss + memory.pss
                self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
                self.most_processes = max(self.most_processes, len(tree))
                self._stop.wait(SAMPLE_S)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Measurement:
    stage: str
    group: str
    engine: str  # local, ray, or ANY_ENGINE for the stages resources.engine does not change
    clips: int
    status: str  # ok, failed, timeout, skipped
    wall_s: float = 0.0
    peak_rss_mib: float = 0.0
    peak_pss_mib: float = 0.0
    processes: int = 0  # the most processes of the stage's tree seen at once
    cpu_s: float = 0.0  # CPU time of the stage's processes (those reaped by their parents)
    other_cores: float = 0.0  # mean cores busy with other work on the machine meanwhile
    note: str = ""
    log_tail: list[str] = field(default_factory=list)


def _busy_cpu_s() -> float:
    """CPU seconds the machine's cores have spent busy since it started."""
    times = psutil.cpu_times()
    return times.user + times.nice + times.system + times.irq + times.softirq


def _own_cpu_s() -> float:
    """CPU seconds of this process and of the descendants it and they have reaped."""
    usages = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(usage.ru_utime + usage.ru_stime for usage in usages)


def measure(
    stage: Stage, engine: str, clips: int, project: Path, timeout_s: float | None
) -> Measurement:
    """Run the stage's command in the project; its wall time, peak memory and outcome."""
    services = live_services()
    command = [sys.executable, "-m", "gtzan_mlops", *stage.args]
    command += ["--params", str(project / "params.yaml")]
    if engine != ANY_ENGINE:
        command += ["--set", f"resources.engine={engine}"]
    env = services.clean_env()
    for name in [name for name in env if name.startswith("DVC_")]:
        del env[name]  # DVC_ROOT would send the runs to another project's store
    log = project / "logs" / f"{stage.name}-{engine}.log"
    log.parent.mkdir(exist_ok=True)
    result = Measurement(stage.name, stage.group, engine, clips, "ok")
    busy_before, own_before = _busy_cpu_s(), _own_cpu_s()
    started = time.perf_counter()
    with log.open("w") as output:
        process = subprocess.Popen(
            command, cwd=project, env=env, stdout=output, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        with TreeMemory(process.pid) as memory:
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                result.status = "timeout"
            result.wall_s = time.perf_counter() - started
    finally:
        services.stop_process(process)  # the whole process group, also on Ctrl-C
    own = _own_cpu_s() - own_before  # the stage's tree and this script's sampling
    result.cpu_s = own
    result.other_cores = max(_busy_cpu_s() - busy_before - own, 0.0) / max(result.wall_s, 1e-9)
    result.peak_rss_mib, result.peak_pss_mib = memory.peak_rss / MIB, memory.peak_pss / MIB
    result.processes = memory.most_processes
    lines = log.read_text(errors="replace").strip().splitlines()
    if result.status == "ok" and process.returncode != 0:
        result.status = "failed"
    if result.status != "ok":
        result.log_tail = lines[-LOG_TAIL_LINES:]
        result.note = lines[-1][:160] if lines else f"exit status {process.returncode}"
        if result.status == "timeout":
            result.note = f"stopped after {timeout_s:g} s"
    return result
