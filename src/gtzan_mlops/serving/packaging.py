"""Logging a served model: the pyfunc's entry file and code, its spec, the native classifier,
the musicnn checkpoint with its licence notice, its config, signature, input example and the
pinned requirements of the environment it needs."""

from __future__ import annotations

import base64
import io
import json
import shutil
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

import gtzan_mlops
from gtzan_mlops.features import feature_sets, musicnn
from gtzan_mlops.features.musicnn import CHECKPOINT_FILES, MusicnnError
from gtzan_mlops.serving.spec import (
    BASE64_COLUMN,
    CLASSIFIER_ARTIFACT,
    MUSICNN_ARTIFACT,
    SPEC_ARTIFACT,
    ServingSpec,
    input_signature,
)
from gtzan_mlops.settings.schema import FeatureSettings, ServedConfig

SERVING_MODEL_NAME = "serving_model"  # the logged model's name inside its run
ENTRY_FILE = Path(__file__).with_name("model_entry.py")  # MLflow's models-from-code entry

# Distributions the served model imports besides its flavor's (models.FLAVOR_REQUIREMENTS);
# pinned to the installed versions when logged, so an environment built from the model
# (env-manager virtualenv/uv) matches the one it was trained and logged in.
_BASE_REQUIREMENTS = (
    "mlflow",
    "numpy",
    "pandas",
    "scipy",
    "scikit-learn",
    "librosa",
    "soundfile",
    "soxr",
    "pyyaml",
    "cloudpickle",
    "filelock",
    "pydantic",
)


def synthetic_example_clip(settings: FeatureSettings, seconds: float | None = None) -> bytes:
    """A small synthetic WAV (8 kHz, 8-bit: a few kB), `seconds` long (None: one segment plus a
    margin): the model's input example, which also documents the request format in the logged
    model."""
    import soundfile

    rate = 8000
    duration = seconds if seconds is not None else settings.segment_seconds + 0.5
    time = np.arange(int(duration * rate)) / rate
    rng = np.random.default_rng(0)
    tone = 0.4 * np.sin(2 * np.pi * 220.0 * time) + 0.05 * rng.standard_normal(len(time))
    buffer = io.BytesIO()
    soundfile.write(buffer, tone.astype(np.float32), rate, format="WAV", subtype="PCM_U8")
    return buffer.getvalue()


def pip_requirements(flavor: str, feature_set: str) -> list[str]:
    """The installed versions of what the served model imports (TensorFlow and Keras run the
    musicnn embedding, whatever the classifier's flavor)."""
    from gtzan_mlops.models.zoo import FLAVOR_REQUIREMENTS, installed_requirements

    names = [*_BASE_REQUIREMENTS, *FLAVOR_REQUIREMENTS.get(flavor, ())]
    if feature_sets.uses_musicnn(feature_set):
        names += [name for name in FLAVOR_REQUIREMENTS["keras"] if name not in names]
    return installed_requirements(tuple(names))


def _weights_artifact(weights: Path, scratch: Path) -> Path:
    """A folder holding only the checkpoint files the model reads, and their licence notice."""
    folder = scratch / MUSICNN_ARTIFACT
    folder.mkdir()
    for name in CHECKPOINT_FILES:
        shutil.copyfile(weights / name, folder / name)
    shutil.copyfile(Path(musicnn.__file__).with_name("MUSICNN_NOTICE"), folder / "NOTICE")
    return folder


def package_dir() -> Path:
    """The gtzan_mlops package folder, logged with the model (code_paths) so that the served
    model imports the same extraction code even where this project is not installed."""
    return Path(gtzan_mlops.__file__).resolve().parent


def log_serving_model(
    spec: ServingSpec,
    classifier_uri: str,
    config: ServedConfig,
    name: str = SERVING_MODEL_NAME,
    input_example: bool = True,
    musicnn_weights: Path | None = None,
) -> mlflow.models.model.ModelInfo:
    """Log the serving pyfunc into the active run; returns its ModelInfo (`.model_uri`).

    `classifier_uri` is the native model (e.g. `models:/m-...` or `runs:/<id>/model`); MLflow
    copies it into the pyfunc's artifacts, so the served model does not depend on the run.
    `config` becomes its model config. A model on musicnn embeddings needs `musicnn_weights`
    (the checkpoint folder): its files and licence notice are logged with the model.
    """
    with tempfile.TemporaryDirectory() as scratch:
        spec_path = Path(scratch) / "serving_spec.json"
        spec_path.write_text(json.dumps(spec.to_dict(), indent=2) + "\n", encoding="utf-8")
        artifacts = {CLASSIFIER_ARTIFACT: classifier_uri, SPEC_ARTIFACT: str(spec_path)}
        if feature_sets.uses_musicnn(spec.feature_set):
            if musicnn_weights is None:
                raise MusicnnError(f"a model on {spec.feature_set} features needs musicnn weights")
            artifacts[MUSICNN_ARTIFACT] = str(_weights_artifact(musicnn_weights, Path(scratch)))
        example = None
        if input_example:
            clip = synthetic_example_clip(spec.settings)
            example = pd.DataFrame({BASE64_COLUMN: [base64.b64encode(clip).decode("ascii")]})
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(ENTRY_FILE),
            artifacts=artifacts,
            model_config=config.model_dump(),
            signature=input_signature(spec.classes),
            input_example=example,
            code_paths=[str(package_dir())],
            pip_requirements=pip_requirements(spec.flavor, spec.feature_set),
            metadata={"gtzan": spec.to_dict()},
        )
