"""`gtzan-mlops serve`: the champion on MLflow's scoring server, guarded, from any shell.

`mlflow models serve --env-manager local` runs uvicorn on MLflow's scoring app; this command runs
uvicorn on the same app inside the project's request guard (serving/guard.py build_app: JSON only,
bounded bodies, early 429s, time from arrival, no traces), on the project's store. It starts
uvicorn by this environment's path, so it works in a fresh shell (a bare `mlflow models serve`
fails with "uvicorn: not found" unless the environment's scripts are on PATH).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from gtzan_mlops.cli import add_model_arguments, chosen_model_uri, params_file
from gtzan_mlops.settings.loading import ConfigError, load_settings


def serve_command(host: str, port: int, workers: int) -> list[str]:
    """uvicorn on the guarded scoring app, which loads the model named in SERVED_MODEL_ENV."""
    return [
        str(Path(sys.executable).parent / "uvicorn"),
        "--factory",
        "gtzan_mlops.serving.guard:build_app",
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]


def main(argv: list[str] | None = None) -> int:
    from gtzan_mlops import tracking
    from gtzan_mlops.serving.guard import SERVED_MODEL_ENV

    parser = argparse.ArgumentParser(
        prog="gtzan-mlops serve",
        description="Serve the champion (or --model), guarded, on loopback.",
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default: loopback; for others, a proxy in front: deploy/)",
    )
    parser.add_argument("--port", type=int, default=5001, help="port (default: 5001)")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    args = parser.parse_args(argv)
    try:
        params_path = params_file(args)
        allocator = load_settings(params_path).resources.serve
    except ConfigError as error:
        print(f"gtzan-mlops serve: {error}", file=sys.stderr)
        return 2
    try:
        model_uri = chosen_model_uri(args)
    except ConfigError as error:
        print(f"gtzan-mlops serve: {error}; pass --model", file=sys.stderr)
        return 2
    bin_dir = str(Path(sys.executable).parent)
    environment = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        # The project's store (mlruns/mlflow.db) unless MLFLOW_TRACKING_URI says otherwise.
        "MLFLOW_TRACKING_URI": tracking.tracking_uri(params_path.resolve().parent),
        SERVED_MODEL_ENV: model_uri,
    }
    environment.setdefault("MALLOC_ARENA_MAX", str(allocator.malloc_arena_max))
    mmap_threshold = str(allocator.malloc_mmap_threshold_kib * 1024)
    environment.setdefault("MALLOC_MMAP_THRESHOLD_", mmap_threshold)
    command = serve_command(args.host, args.port, args.workers)
    print(f"gtzan-mlops serve: {model_uri} on http://{args.host}:{args.port}", flush=True)
    os.execve(command[0], command, environment)
