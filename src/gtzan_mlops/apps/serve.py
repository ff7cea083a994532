"""`gtzan-mlops serve`: the champion on MLflow's scoring server, guarded, from any shell.

`mlflow models serve --env-manager local` runs uvicorn on MLflow's scoring app; this command runs
uvicorn on the same app inside the project's request guard (serving/guard.py build_app: JSON only,
bounded bodies, early 429s, time from arrival, no traces), on the project's store, with
`resources.serve.processes` server processes. It starts uvicorn with this environment's Python,
so it works in a fresh shell (a bare `mlflow models serve` fails with "uvicorn: not found" unless
the environment's scripts are on PATH).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from gtzan_mlops.cli import (
    EXIT_OK,
    EXIT_USAGE,
    add_model_arguments,
    command_parser,
    model_command,
    model_load_failure,
    port_number,
)
from gtzan_mlops.settings.loading import ConfigError

# The server process: uvicorn's command line, its start-up failure mapped to EXIT_USAGE.
_SERVER = "import sys; from gtzan_mlops.apps.serve import run_uvicorn; sys.exit(run_uvicorn())"


def serve_command(host: str, port: int, processes: int) -> list[str]:
    """uvicorn on the guarded scoring app, which loads the model named in SERVED_MODEL_ENV."""
    return [
        sys.executable,
        "-c",
        _SERVER,
        "--factory",
        "gtzan_mlops.apps.serve:build_served_app",
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(processes),
    ]


def build_served_app() -> Any:
    """uvicorn's --factory: the guarded app (serving/guard.py build_app) of the model named in
    SERVED_MODEL_ENV. A model that cannot be loaded or served ends the server with one line and
    EXIT_USAGE, as in predict and listen, not with uvicorn's traceback and status 1."""
    from gtzan_mlops.serving.guard import SERVED_MODEL_ENV, build_app

    try:
        return build_app()
    except Exception as error:  # any loading failure ends the server with its reason
        print(
            model_load_failure("serve", os.environ[SERVED_MODEL_ENV], error),
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(EXIT_USAGE) from None


def run_uvicorn(argv: list[str] | None = None) -> int:
    """uvicorn's own command line (`argv`, else this process's), in this process; its start-up
    failure (the model does not load, the port is taken: uvicorn's status 3) is a usage or
    configuration error, EXIT_USAGE, as in every other command."""
    from uvicorn.config import STARTUP_FAILURE
    from uvicorn.main import main as uvicorn_main

    try:
        uvicorn_main.main(sys.argv[1:] if argv is None else argv, prog_name="uvicorn")
    except SystemExit as ended:
        if ended.code == STARTUP_FAILURE:
            return EXIT_USAGE
        raise
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    from gtzan_mlops import tracking
    from gtzan_mlops.serving.guard import SERVED_MODEL_ENV

    parser = command_parser(
        "serve",
        "Serve the champion (or --model), guarded, on loopback, in resources.serve.processes "
        "server processes.",
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default: loopback; for others, a proxy in front: deploy/)",
    )
    parser.add_argument("--port", type=port_number, default=5001, help="port (default: 5001)")
    args = parser.parse_args(argv)
    try:
        model_uri, settings, root = model_command(args, reads_settings=True)
    except ConfigError as error:
        print(f"gtzan-mlops serve: {error}", file=sys.stderr)
        return EXIT_USAGE
    assert settings is not None and root is not None  # read: reads_settings
    resources = settings.resources.serve
    bin_dir = str(Path(sys.executable).parent)
    environment = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        # The project's store (mlruns/mlflow.db) unless MLFLOW_TRACKING_URI says otherwise.
        "MLFLOW_TRACKING_URI": tracking.tracking_uri(root),
        SERVED_MODEL_ENV: model_uri,
    }
    environment.setdefault("MALLOC_ARENA_MAX", str(resources.malloc_arena_max))
    mmap_threshold = str(resources.malloc_mmap_threshold_kib * 1024)
    environment.setdefault("MALLOC_MMAP_THRESHOLD_", mmap_threshold)
    command = serve_command(args.host, args.port, resources.processes)
    print(f"gtzan-mlops serve: {model_uri} on http://{args.host}:{args.port}", flush=True)
    os.execve(command[0], command, environment)
