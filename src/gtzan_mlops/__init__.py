"""Reference MLOps pipeline for music genre classification on GTZAN."""

import os

# Nothing this project runs phones home: MLflow's usage telemetry is off unless a user turns it
# back on explicitly (set before any module of the package imports mlflow).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

__version__ = "0.1.0"
