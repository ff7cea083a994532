"""TensorFlow's import-time notices stay out of the stages' logs; other output does not."""

from __future__ import annotations

import os
import subprocess
import sys

_SCRIPT = """
import os, sys
os.write(2, b"before the import\\n")
from gtzan_mlops.features.tf_runtime import import_tensorflow
tf = import_tensorflow()
import keras
model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
model.predict(tf.constant([[1.0]]))  # verbose "auto": a progress bar on a terminal only
print(tf.constant(2).numpy() + 1)
"""


def test_tensorflow_imports_without_its_start_up_notices():
    env = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "3"
    assert "oneDNN" not in result.stderr and "absl::InitializeLog" not in result.stderr
    assert "before the import" in result.stderr  # the process's own output is untouched
    assert "step" not in result.stdout + result.stderr  # no Keras progress bar in a log
