"""TensorFlow, imported without its start-up notices in every stage's log.

tensorflow-cpu 2.21 logs through absl before absl is initialised, so TF_CPP_MIN_LOG_LEVEL does
not reach its import-time notices ("oneDNN custom operations are on", the CPU feature guard):
every process that imports it would print them. The import runs with the process's stderr
captured; everything but those notices is written back, so a real error still shows.
"""

from __future__ import annotations

import os
import sys
import tempfile
from types import ModuleType

# Start-up lines that say nothing about this run.
_NOTICES = (
    "All log messages before absl::InitializeLog() is called are written to STDERR",
    "oneDNN custom operations are on",
    "This TensorFlow binary is optimized to use available CPU instructions",
    "To enable the following instructions:",
)


def import_tensorflow() -> ModuleType:
    """`import tensorflow` (Keras then imports quietly too); the module. Off a terminal, Keras's
    progress bars (ANSI frames from every predict, e.g. MLflow's input-example check) are off."""
    tensorflow = sys.modules.get("tensorflow") or _import_quietly()
    if not sys.stdout.isatty():  # also when something else imported TensorFlow first
        import keras

        keras.utils.disable_interactive_logging()
    return tensorflow


def _import_quietly() -> ModuleType:
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines(keepends=True):
                if not any(notice in line for notice in _NOTICES):
                    sys.stderr.write(line)
            sys.stderr.flush()
    return tensorflow
