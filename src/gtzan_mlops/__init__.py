"""Reference MLOps pipeline for music genre classification on GTZAN."""

import os
import sys

# Nothing this project runs phones home: MLflow's usage telemetry is off unless a user turns it
# back on explicitly (set before any module of the package imports mlflow).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# TensorFlow's C++ log, quiet unless a user asks for it: tensorflow-cpu 2.21's tf.data logs a
# harmless "NodeDef mentions attribute use_unbounded_threadpool" error for every Keras fit, at a
# level that only 3 silences. Python-side errors still raise as usual.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# MLflow's "Downloading artifacts" bars only on a terminal: in a log (dvc repro's, CI's) each
# redraw is a line of its own, and promote downloads every model it plays the test clips to.
os.environ.setdefault(
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "true" if sys.stderr.isatty() else "false"
)

__version__ = "0.1.0"
