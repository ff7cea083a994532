"""Several processes working on one study: the stage starts `resources.train.workers` processes
(`gtzan-mlops train --join`) that share its study through the storage and its parent MLflow run,
or as many Ray tasks with `resources.engine: ray` (ray_workers.py), and a worker started by hand
(on another machine) joins the same way. Each samples from its own seeded stream; the study stops
them all once it holds `n_trials` finished trials."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from gtzan_mlops.cluster import RaySession
from gtzan_mlops.models.ray_workers import WorkerError, run_on_ray
from gtzan_mlops.models.study import StudySettings, open_study, recorded_parent_run
from gtzan_mlops.models.training_data import TrainingData
from gtzan_mlops.models.trials import optimise


def start_workers(
    settings: StudySettings,
    feature_set: str,
    name: str,
    root: Path,
    stage_arguments: list[str],
) -> list[subprocess.Popen]:
    """`settings.workers` processes joining study `name` (each `gtzan-mlops train --join`),
    reading the same params (`stage_arguments`: --params and --set of this command) and running
    to the same `n_trials` (a --set of its own: the stage's may come from settings built in
    code, not from a command line)."""
    processes = []
    for worker in range(1, settings.workers + 1):
        command = [
            sys.executable,
            "-m",
            "gtzan_mlops",
            "train",
            "--family",
            settings.family,
            "--features",
            feature_set,
            "--join",
            "--study-name",
            name,
            "--worker",
            str(worker),
            *stage_arguments,
            "--set",
            f"train.{settings.family}.n_trials={settings.tuning.n_trials}",
        ]
        processes.append(subprocess.Popen(command, cwd=root))
    return processes


def run_trials(
    study: Any,
    settings: StudySettings,
    data: TrainingData,
    parent_run_id: str,
    tags: dict,
    root: Path,
    stage_arguments: list[str],
    cluster: RaySession | None = None,
) -> None:
    """The study's trials: in Ray tasks when the stage runs on a `cluster` (see
    ray_workers.tuning_cluster), else in worker processes when `resources.train.workers` is above
    one (waiting for them all), else in this process."""
    if cluster is not None:
        run_on_ray(study, settings, data, parent_run_id, tags, root)
        return
    if settings.workers <= 1:
        optimise(study, settings, data, parent_run_id, tags)
        return
    processes = start_workers(settings, data.feature_set, study.study_name, root, stage_arguments)
    codes = {worker: process.wait() for worker, process in enumerate(processes, start=1)}
    failed = {worker: code for worker, code in codes.items() if code != 0}
    if failed:
        statuses = ", ".join(
            f"worker {worker} exit status {code}" for worker, code in failed.items()
        )
        raise WorkerError(
            f"train {settings.family}: Optuna worker processes failed ({statuses}; their output "
            "is above); the finished trials are kept, rerun to go on"
        )


def join_study(
    settings: StudySettings,
    data: TrainingData,
    name: str,
    root: Path,
    worker: int | None,
    tags: dict,
) -> None:
    """Run trials of the stage's study `name` (it must exist, with its parent run) until it holds
    `n_trials` finished ones. A worker started by hand (`worker` None, e.g. on another machine)
    gets a sampler stream of its own: with the stage's seed it would propose the same parameters
    as the stage's own process."""
    stream = worker if worker is not None else os.getpid()
    study = open_study(settings, name, root, worker=stream, create=False)
    optimise(study, settings, data, recorded_parent_run(study), tags)
