"""`gtzan-mlops serve`: the champion behind `mlflow models serve`, from any shell.

MLflow's scoring server starts `uvicorn` by name, so `mlflow models serve` fails with
"uvicorn: not found" unless this environment's scripts are on PATH; this command puts them
there, points MLflow at the project's store and runs the real `mlflow models serve`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from gtzan_mlops.config import ConfigError, add_model_arguments, params_file


def serve_command(model_uri: str, host: str, port: int, workers: int) -> list[str]:
    return [
        str(Path(sys.executable).parent / "mlflow"),
        "models",
        "serve",
        "-m",
        model_uri,
        "--env-manager",
        "local",
        "-h",
        host,
        "-p",
        str(port),
        "-w",
        str(workers),
    ]


def main(argv: list[str] | None = None) -> int:
    from gtzan_mlops import tracking

    parser = argparse.ArgumentParser(
        prog="gtzan-mlops serve",
        description="Serve the champion (or --model) with `mlflow models serve` on loopback.",
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
        model_uri = tracking.chosen_model_uri(args)
    except ConfigError as error:
        print(f"gtzan-mlops serve: {error}; pass --model", file=sys.stderr)
        return 2
    bin_dir = str(Path(sys.executable).parent)
    environment = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        # The project's store (mlruns/mlflow.db) unless MLFLOW_TRACKING_URI says otherwise.
        "MLFLOW_TRACKING_URI": tracking.tracking_uri(params_path.resolve().parent),
    }
    command = serve_command(model_uri, args.host, args.port, args.workers)
    print(f"gtzan-mlops serve: {model_uri} on http://{args.host}:{args.port}", flush=True)
    os.execve(command[0], command, environment)
