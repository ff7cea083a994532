"""Where runs and studies are stored, and what identifies the code and data behind them.

MLflow: `MLFLOW_TRACKING_URI` wins; otherwise a SQLite file `mlruns/mlflow.db` with artifacts in
`mlruns/artifacts/`, both under the *store root*. Optuna: `OPTUNA_STORAGE` (an RDB URL) wins;
otherwise one journal file per family under `optuna-journals/`, which is safe for several processes.

The store root is the repository DVC runs in. `dvc exp run --queue`/`--temp` run a stage in a
temporary copy under `.dvc/tmp/exps/` and set `DVC_ROOT` to the real repository, so runs and
studies from experiments land in the same store as those of `dvc repro`.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path
from typing import Any

import yaml

from gtzan_mlops.settings.loading import find_repo_root

TRACKING_DIR = "mlruns"
DATABASE_FILE = "mlflow.db"
ARTIFACTS_DIR = "artifacts"
# Not "optuna": a folder of that name at the root makes ruff sort `import optuna` as first-party.
OPTUNA_DIR = "optuna-journals"
# The registry alias of the served model (an alias: MLflow's model stages are deprecated).
CHAMPION_ALIAS = "champion"


def champion_uri(model_name: str) -> str:
    """The URI that names whichever version of a registered model is the champion now."""
    return f"models:/{model_name}@{CHAMPION_ALIAS}"


def store_root(root: Path | None = None) -> Path:
    """The repository whose `mlruns/` and `optuna-journals/` hold the runs: DVC's root when DVC
    runs us (the real repository, also from an experiment's temporary copy), else `root`."""
    dvc_root = os.environ.get("DVC_ROOT")
    if dvc_root:
        return Path(dvc_root).resolve()
    return (root or find_repo_root()).resolve()


def tracking_uri(root: Path | None = None) -> str:
    """`MLFLOW_TRACKING_URI`, or the project's SQLite store (an absolute URI)."""
    configured = os.environ.get("MLFLOW_TRACKING_URI")
    if configured:
        return configured
    folder = store_root(root) / TRACKING_DIR
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / DATABASE_FILE}"


def artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside the database for a SQLite store (MLflow
    would otherwise use ./mlartifacts of whatever folder a command runs in); a tracking server
    decides for itself (None)."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    return (Path(uri[len(prefix) :]).parent / ARTIFACTS_DIR).as_uri()


def use_store(root: Path | None = None) -> str:
    """Point MLflow's fluent API at the project's store; returns the URI."""
    import mlflow

    uri = tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    return uri


def launched_run_id() -> str | None:
    """The run `mlflow run` created for this command (MLFLOW_RUN_ID), taken out of the
    environment: the stage logs into it instead of a run of its own, and no later start_run
    (a trial's, a worker process's) picks it up by accident.

    Under DVC (`mlflow run . -e main` runs `dvc repro`, which hands the variable to every stage)
    it is not adopted: one run cannot hold the params of several stages, so each stage logs
    its own runs as under a plain `dvc repro`."""
    launched = os.environ.pop("MLFLOW_RUN_ID", None) or None
    return None if os.environ.get("DVC_STAGE") else launched


def ensure_experiment(name: str) -> str:
    """The id of experiment `name` in the active store, created (see `artifact_location`) if
    needed."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        if existing.lifecycle_stage == "deleted":
            client.restore_experiment(existing.experiment_id)
        return existing.experiment_id
    try:
        return client.create_experiment(
            name, artifact_location=artifact_location(mlflow.get_tracking_uri())
        )
    except mlflow.exceptions.MlflowException:
        # Another process created it between our lookup and our create.
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def optuna_storage_url(configured: str | None = None) -> str | None:
    """The Optuna studies' RDB URL: `OPTUNA_STORAGE`, then `configured`; None: journal files."""
    return os.environ.get("OPTUNA_STORAGE") or configured


def optuna_storage(family: str, root: Path | None = None, configured: str | None = None) -> Any:
    """Optuna storage for `family`: `OPTUNA_STORAGE`, then `configured` (params
    `train.optuna_storage`), each an RDB URL such as postgresql+psycopg2://host/db (the driver
    installed; SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3); else a journal file
    `optuna-journals/<family>.journal`, which several local processes can share (file lock)."""
    url = optuna_storage_url(configured)
    if url:
        return url
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    folder = store_root(root) / OPTUNA_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = str(folder / f"{family}.journal")
    return JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes (`sha256`, `md5`), read in chunks."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, algorithm).hexdigest()


def source_digest(*modules: str) -> str:
    """sha256 over the source of the named files of this package (e.g. "features/musicnn.py"):
    what decides whether a study, a cached feature or a served model came from the same code."""
    package = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for module in modules:
        digest.update((package / module).read_bytes())
    return digest.hexdigest()


# The sub-packages that compute what the stages write. The others parse arguments (cli),
# validate settings (settings), record runs (tracking) or draw reports (reports): a change to
# them changes no table, split, model or metric, so no stage depends on them.
COMPUTE_PACKAGES = ("data", "features", "models", "evaluation", "serving", "promotion")


def _module_file(package: Path, dotted: str) -> Path | None:
    """The source file of `gtzan_mlops.<dotted>`, or None for a package folder or a name that
    is not a module (an imported function or class)."""
    path = package.joinpath(*dotted.split("."))
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


def module_closure(*modules: str) -> tuple[str, ...]:
    """The source files of this package that the named modules (e.g. "stages.train") import,
    directly or not, themselves included, sorted, as paths under the package
    ("stages/train.py"). Read from the code (every `import`, also inside functions), so the list
    cannot drift from it. Sub-package `__init__.py` files hold only their docstring and are left
    out (tests/code/test_code_shape.py checks that)."""
    import ast

    package = Path(__file__).resolve().parent
    seen: set[str] = set()
    pending = list(modules)
    while pending:
        module = pending.pop()
        if module in seen:
            continue
        seen.add(module)
        tree = ast.parse((package / f"{module.replace('.', '/')}.py").read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            candidates: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if node.module == __package__ or node.module.startswith(f"{__package__}."):
                    inner = node.module.removeprefix(__package__).lstrip(".")
                    prefix = f"{inner}." if inner else ""
                    candidates = [inner] if inner else []
                    candidates += [f"{prefix}{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                candidates = [
                    alias.name.removeprefix(f"{__package__}.")
                    for alias in node.names
                    if alias.name.startswith(f"{__package__}.")
                ]
            pending += [name for name in candidates if _module_file(package, name) is not None]
    return tuple(sorted(f"{module.replace('.', '/')}.py" for module in seen))


def compute_closure(*modules: str) -> tuple[str, ...]:
    """The part of `module_closure(*modules)` that computes: the named modules themselves and
    the files of COMPUTE_PACKAGES they import. A stage's dvc.yaml deps, and the code identity
    of its studies, cached features and served models."""
    own = {f"{module.replace('.', '/')}.py" for module in modules}
    return tuple(
        file
        for file in module_closure(*modules)
        if file in own or file.split("/", 1)[0] in COMPUTE_PACKAGES
    )


def git_commit(root: Path | None = None) -> str | None:
    """The checked-out commit of the workspace the stage runs in, with `-dirty` when tracked
    files differ from it; None outside git."""
    folder = root or find_repo_root()
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=folder,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"{commit}-dirty" if dirty else commit


def fetched_audio_hash(root: Path) -> str | None:
    """The md5 DVC recorded in dvc.lock for the fetch stage's audio folder (its one folder
    output, paths.raw), None if not recorded.

    DVC writes a stage's lock entry as soon as the stage finishes, so a downstream stage sees the
    hash of the data it runs on.
    """
    lock = root / "dvc.lock"
    if not lock.is_file():
        return None
    stages = (yaml.safe_load(lock.read_text(encoding="utf-8")) or {}).get("stages", {})
    for out in (stages.get("fetch") or {}).get("outs", []):
        if str(out.get("md5", "")).endswith(".dir"):
            return str(out["md5"])
    return None


def run_tags(root: Path) -> dict[str, str]:
    """Tags every run of the pipeline carries: code version, data version, DVC experiment."""
    tags = {"git_commit": git_commit(root) or "unknown"}
    raw_hash = fetched_audio_hash(root)
    if raw_hash:
        tags["dvc.data_raw_md5"] = raw_hash
    experiment = os.environ.get("DVC_EXP_NAME")
    if experiment:
        tags["dvc.exp_name"] = experiment
    return tags


def log_stage_run(
    root: Path,
    experiment: str,
    stage: str,
    run_name: str,
    params: dict[str, Any],
    metrics: dict[str, float],
    artifacts: list[Path],
    tags: dict[str, str] | None = None,
) -> str:
    """One finished MLflow run for a stage's results (params, metrics, files), tagged like every
    run of the pipeline; returns its id. Under `mlflow run`, that command's run is the one."""
    import mlflow

    launched = launched_run_id()
    with mlflow.start_run(
        run_id=launched,
        experiment_id=None if launched else ensure_experiment(experiment),
        run_name=run_name,
        tags={**run_tags(root), "gtzan.stage": stage, **(tags or {})},
    ) as run:
        mlflow.log_params(params)
        mlflow.log_metrics(metrics)
        for path in artifacts:
            mlflow.log_artifact(str(path))
    return run.info.run_id
