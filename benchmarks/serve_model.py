"""The model the serving benchmarks serve: the project's champion, a model URI, or a DEMO
champion built in a temporary store (benchmarks/serve.py --build-demo-champion)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gtzan_mlops.settings.schema import Settings

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_EXPERIMENT = "gtzan-serve-benchmark-demo"


class BenchmarkError(RuntimeError):
    """A failed check or a server that would not start: the benchmark stops with its reason."""


@dataclass
class Champion:
    uri: str  # what the server's `-m` / `--model` gets
    store: str  # the tracking (and registry) URI it resolves in
    note: str = ""  # printed beside the URI (e.g. that it is a demo model)


def project_champion(settings: Settings) -> tuple[Champion | None, str]:
    """The project store's champion, or None and why there is none. Never creates the store:
    a missing sqlite file means no pipeline has run yet."""
    from mlflow import MlflowClient

    from gtzan_mlops import tracking
    from gtzan_mlops.promotion.champion import current_champion

    name = settings.promote.model_name
    uri = tracking.champion_uri(name)
    store = tracking.tracking_uri(REPO_ROOT)
    prefix = "sqlite:///"
    if store.startswith(prefix) and not Path(store[len(prefix) :]).is_file():
        return None, f"{store[len(prefix) :]} does not exist (the pipeline has not run yet)"
    try:
        version = current_champion(MlflowClient(tracking_uri=store, registry_uri=store), name)
    except Exception as error:  # an unreachable or broken store: say so, like no champion
        return None, f"cannot read the registry of {store}: {error}"
    if version is None:
        return None, f"{store} has no model {name!r} with the alias 'champion'"
    return Champion(uri, store, f"version {version.version}"), ""


def build_demo_champion(settings: Settings, reference: Path, folder: Path) -> Champion:
    """A DEMO champion in a fresh sqlite store in `folder`: the project's logistic-regression
    pipeline fitted on the reference table (the 57 features of 1000 GTZAN clips), logged as the
    promote stage logs a winner (serving.packaging.log_serving_model, segment level, the served
    config of params.yaml) and registered as `<promote.model_name>-demo@champion`."""
    import mlflow
    import pandas as pd

    from gtzan_mlops import tracking
    from gtzan_mlops.features.handcrafted import FEATURE_NAMES, REFERENCE_SETTINGS
    from gtzan_mlops.models.zoo import build_classic, log_classifier
    from gtzan_mlops.serving.packaging import log_serving_model
    from gtzan_mlops.serving.spec import ServingSpec
    from gtzan_mlops.settings.schema import ServedConfig

    if not reference.is_file():
        raise BenchmarkError(f"{reference}: reference feature table not found (--reference)")
    genres = list(settings.genres)
    table = pd.read_csv(reference)
    unknown = sorted(set(table["label"]) - set(genres))
    if unknown:
        raise BenchmarkError(f"{reference}: labels {unknown} are not in params genres")
    labels = table["label"].map({genre: index for index, genre in enumerate(genres)}).to_numpy()
    features = table[list(FEATURE_NAMES)]
    classifier = build_classic("logistic_regression", {"max_iter": 300}, seed=0)
    classifier.fit(features, labels)

    store = f"sqlite:///{folder / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = store  # for code that resolves the URI itself
    os.environ.pop("MLFLOW_REGISTRY_URI", None)
    mlflow.set_tracking_uri(store)
    mlflow.set_registry_uri(store)
    mlflow.set_experiment(experiment_id=tracking.ensure_experiment(DEMO_EXPERIMENT))
    spec = ServingSpec(
        family="logistic_regression",
        flavor="sklearn",
        level="segment",
        classes=tuple(genres),
        feature_settings=REFERENCE_SETTINGS.to_dict(),  # the reference table's settings
    )
    config = ServedConfig.of(settings.serving, settings.data)
    with mlflow.start_run(run_name="demo-native-logistic_regression"):
        classifier_uri = log_classifier(classifier, "sklearn", features.head(5)).model_uri
    with mlflow.start_run(run_name="demo-serving-logistic_regression", tags={"demo": "true"}):
        info = log_serving_model(spec, classifier_uri, config)
    name = settings.promote.model_name + "-demo"
    version = mlflow.register_model(info.model_uri, name, tags={"demo": "true"})
    mlflow.MlflowClient().set_registered_model_alias(name, tracking.CHAMPION_ALIAS, version.version)
    note = (
        f"version {version.version}; DEMO champion: logistic regression fitted on "
        f"{reference.name} (all 1000 GTZAN clips), not a pipeline model"
    )
    return Champion(tracking.champion_uri(name), store, note)


def describe_model(champion: Champion) -> dict[str, Any]:
    """Family, level, classes and serving settings from the logged model's MLmodel file."""
    import mlflow
    from mlflow.models import Model

    mlflow.set_tracking_uri(champion.store)
    mlflow.set_registry_uri(champion.store)
    model = Model.load(champion.uri)
    spec = (model.metadata or {}).get("gtzan", {})
    pyfunc = model.to_dict().get("flavors", {}).get("python_function", {})
    config = pyfunc.get("config") or pyfunc.get("model_config") or {}
    return {
        "family": spec.get("family", "?"),
        "level": spec.get("level", "?"),
        "feature_set": spec.get("feature_set", "?"),
        "classes": list(spec.get("classes", [])),
        "max_upload_mib": config.get("max_upload_mib"),
        "allow_audio_path": config.get("allow_audio_path"),
        "max_rows": config.get("max_rows"),
    }
