"""`gtzan-mlops listen`: a local page to try a registered model on a song and see what it heard.

Drop an audio file on the page: it shows the genre, the probability of each genre, the timeline
of the whole song (genre probability per 3 s segment against time, with the audio player's
position on it) and which model answered (registry name, version, alias, family, feature set,
the split it was evaluated on and its test score there).

The page classifies through the same pyfunc `mlflow models serve` runs, loaded in this process:
the same limits and the same messages for a bad file. The web stack is what MLflow 3 already
installs for its scoring server, FastAPI on uvicorn; the page is one HTML file with its own
script and SVG drawing, so it needs nothing from the internet and vendors no library.
"""

from __future__ import annotations

import base64
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

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

log = logging.getLogger(__name__)

PAGE = Path(__file__).with_name("listen_page.html")
_ROW_PREFIX = re.compile(r"^row \d+: ")
_FILENAME = re.compile(r"[^\w .()\-]+")


# The registered version's tags the page shows: what it was trained on and its test score with
# the interval (promote.version_tags).
VERSION_FACTS = (
    "split",
    "leaky",
    "data_source",
    "training_clips",
    "metric_name",
    "metric_value",
    "metric_low",
    "metric_high",
    "metric_level",
    "test_clips",
)


@dataclass(frozen=True)
class ModelInfo:
    """What the page says about the model that answers."""

    uri: str
    name: str | None  # registry name, None for a model outside the registry
    version: str | None
    alias: str | None
    tags: dict[str, str]  # the version's tags (family, feature_set, split, metric_name, ...)
    spec: dict[str, Any]  # the served model's own description (family, level, feature set)

    def to_json(self) -> dict[str, Any]:
        described = {key: self.tags.get(key) for key in VERSION_FACTS}
        for key in ("family", "feature_set", "level"):  # the model's own, outside the registry
            described[key] = self.tags.get(key) or self.spec.get(key)
        return {
            "uri": self.uri,
            "name": self.name,
            "version": self.version,
            "alias": self.alias,
            **described,
        }


def describe_model(uri: str, model: Any) -> ModelInfo:
    """The registry's word on `uri` (models:/name@alias or models:/name/version), if any."""
    from mlflow import MlflowClient

    spec = dict((model.metadata.metadata or {}).get("gtzan", {}))
    match = re.fullmatch(r"models:/([^/@]+)(?:@([^/]+)|/(\d+))", uri)
    if not match:
        return ModelInfo(uri, None, None, None, {}, spec)
    name, alias, number = match.groups()
    client = MlflowClient()
    version = (
        client.get_model_version_by_alias(name, alias)
        if alias
        else client.get_model_version(name, number)
    )
    return ModelInfo(uri, name, str(version.version), alias, dict(version.tags), spec)


class Classifier:
    """The served pyfunc and what the page needs from it: one song's answer as JSON."""

    def __init__(self, uri: str, model: Any) -> None:
        from gtzan_mlops.serving.pyfunc import GenreClassifier

        self.model = model
        self.info = describe_model(uri, model)
        python_model = model.unwrap_python_model()
        if not isinstance(python_model, GenreClassifier):
            raise ConfigError(f"{uri} is not a served genre model of this project")
        self.limits = python_model.limits
        self.classes = list(python_model.spec.classes)

    def classify(self, data: bytes, filename: str) -> tuple[int, dict[str, Any]]:
        """(HTTP status, JSON body) for one uploaded file: the pyfunc's answer with its
        timeline, or its message for a bad file (never a stack trace)."""
        import pandas as pd
        from mlflow.exceptions import MlflowException

        from gtzan_mlops.serving.spec import (
            BASE64_COLUMN,
            GENRE_COLUMN,
            TIMELINE_COLUMN,
            TIMELINE_PARAM,
            WARNING_COLUMN,
            probability_column,
        )

        rows = pd.DataFrame({BASE64_COLUMN: [base64.b64encode(data).decode("ascii")]})
        try:
            output = self.model.predict(rows, params={TIMELINE_PARAM: True})
        except MlflowException as error:
            message = _ROW_PREFIX.sub("", error.message).replace(f"{BASE64_COLUMN}[0]", filename)
            return error.get_http_status_code(), {"error": message}
        except Exception:  # the pyfunc maps its own failures; anything else stays in the log
            log.exception("listen: unexpected failure on %s", filename)
            return 500, {"error": "internal error while classifying (see the server's log)"}
        row = output.iloc[0]
        warning = row[WARNING_COLUMN]
        return 200, {
            "file": filename,
            "genre": str(row[GENRE_COLUMN]),
            "classes": self.classes,
            "probabilities": {g: float(row[probability_column(g)]) for g in self.classes},
            "timeline": list(row[TIMELINE_COLUMN]),
            "warning": warning if isinstance(warning, str) else None,
        }


def create_app(classifier: Classifier) -> FastAPI:
    """The page (GET /), the model's description (GET /api/model) and the classifier
    (POST /api/classify: the file's raw bytes as the body, its name in X-Filename)."""
    app = FastAPI(title="gtzan-mlops listen", docs_url=None, redoc_url=None, openapi_url=None)
    page = PAGE.read_text(encoding="utf-8")
    max_bytes = int(classifier.limits.max_upload_mib * 2**20)

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return page

    @app.get("/api/model")
    async def model() -> dict[str, Any]:
        return {**classifier.info.to_json(), "max_upload_mib": classifier.limits.max_upload_mib}

    @app.post("/api/classify")
    async def classify(request: Request) -> JSONResponse:
        filename = _FILENAME.sub("_", request.headers.get("x-filename", "upload"))[:120]
        too_large = JSONResponse(
            {"error": f"{filename}: larger than the limit of {max_bytes / 2**20:g} MiB"},
            status_code=413,
        )
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            return too_large  # refused from the header, before the body is read
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                return too_large
            chunks.append(chunk)
        if size == 0:
            return JSONResponse({"error": f"{filename}: empty (0 bytes)"}, status_code=400)
        status, body = await run_in_threadpool(classifier.classify, b"".join(chunks), filename)
        return JSONResponse(body, status_code=status)

    return app


def main(argv: list[str] | None = None) -> int:
    parser = command_parser(
        "listen", "A local page to try a model on a song (default: the champion)."
    )
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    parser.add_argument("--port", type=port_number, default=5003, help="port (default: 5003)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    import mlflow
    import uvicorn
    from uvicorn.config import STARTUP_FAILURE

    from gtzan_mlops import tracking

    try:
        uri, _, root = model_command(args)
    except ConfigError as error:
        print(f"gtzan-mlops listen: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        tracking.use_store(root)
        classifier = Classifier(uri, mlflow.pyfunc.load_model(uri))
    except Exception as error:  # any loading failure ends the command with its reason
        print(model_load_failure("listen", uri, error), file=sys.stderr)
        return EXIT_USAGE
    print(f"gtzan-mlops listen: {uri} on http://{args.host}:{args.port}", flush=True)
    try:
        uvicorn.run(create_app(classifier), host=args.host, port=args.port, log_level="warning")
    except SystemExit as ended:  # uvicorn's start-up failure (the port is taken): a usage error
        if ended.code == STARTUP_FAILURE:
            return EXIT_USAGE
        raise
    return EXIT_OK
