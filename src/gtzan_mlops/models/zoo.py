"""The model families: how each is built from hyperparameters, trained, logged and loaded.

Every family maps the 57 features of a clip or segment (a DataFrame with the feature columns) to
the probability of each genre, columns in the order of params `genres` (labels are indices into
it). Hyperparameters come from params.yaml (`train.<family>.space`, see `suggest`); this module
holds no tuning ranges of its own.

- classic (flavor `sklearn`): Gaussian Naive Bayes, SGD, KNN, decision tree, random forest, SVM,
  logistic regression, MLP, each a Pipeline of a StandardScaler and the estimator;
- `fnn`, `fnn_simple` (flavor `keras`): Keras networks whose first layer standardises the input
  (a Normalization layer adapted to the training rows), so the logged model takes raw features;
- `xgboost` (flavor `xgboost`): XGBClassifier.
Keras and XGBoost stop early on the validation rows and report each epoch (every few boosting
rounds) to an optional callback, which Optuna uses to prune.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from typing import Any

import numpy as np
import pandas as pd

from gtzan_mlops.features.tf_runtime import import_tensorflow
from gtzan_mlops.settings.families import CLASSIC_FAMILIES, FAMILIES, KERAS_FAMILIES
from gtzan_mlops.settings.loading import ConfigError
from gtzan_mlops.settings.schema import Choice, FloatRange, IntRange, SpaceEntry

# Called with (step, validation accuracy) during training; may raise optuna.TrialPruned.
ReportFn = Callable[[int, float], None]

XGBOOST_REPORT_EVERY = 10  # boosting rounds between reports to the pruner
SPACE_RANGES = (IntRange, FloatRange, Choice)  # the entries of a search space Optuna samples


def flavor_of(family: str) -> str:
    if family in CLASSIC_FAMILIES:
        return "sklearn"
    if family in KERAS_FAMILIES:
        return "keras"
    if family == "xgboost":
        return "xgboost"
    raise ConfigError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}")


# --- hyperparameters from params.yaml -------------------------------------------------------


def suggest(trial: Any, space: Mapping[str, SpaceEntry]) -> dict[str, Any]:
    """Hyperparameters for one Optuna trial from a search space of params.yaml
    (`train.<family>.space`, validated by the schema): each entry a fixed value, an IntRange, a
    FloatRange or a Choice. A range's `step` and `log`, when not written, are Optuna's own."""
    values: dict[str, Any] = {}
    for name, spec in space.items():
        if isinstance(spec, IntRange):
            values[name] = trial.suggest_int(name, spec.low, spec.high, **_options(spec))
        elif isinstance(spec, FloatRange):
            values[name] = trial.suggest_float(name, spec.low, spec.high, **_options(spec))
        elif isinstance(spec, Choice):
            values[name] = trial.suggest_categorical(name, list(spec.choices))
        else:
            values[name] = spec
    return values


def _options(spec: IntRange | FloatRange) -> dict[str, Any]:
    """The optional keys of a range written in params.yaml (`step`, `log`)."""
    return spec.model_dump(include={"step", "log"}, exclude_none=True)


def tunable(space: Mapping[str, SpaceEntry]) -> list[str]:
    """The names Optuna searches (the others are fixed values)."""
    return [name for name, spec in space.items() if isinstance(spec, SPACE_RANGES)]


def fixed(space: Mapping[str, SpaceEntry]) -> dict[str, Any]:
    return {name: spec for name, spec in space.items() if not isinstance(spec, SPACE_RANGES)}


# --- building and fitting -------------------------------------------------------------------


def required(hyperparameters: dict[str, Any], name: str, family: str) -> Any:
    """A hyperparameter the family cannot do without, from `train.<family>.space` (a fixed
    value or a tuned one); there is no fallback value in the code."""
    if name not in hyperparameters:
        raise ConfigError(f"train.{family}.space sets no {name!r}, which {family} needs")
    return hyperparameters[name]


def hidden_layers(text: str | int) -> tuple[int, ...]:
    """`"512-256"` -> (512, 256): MLP layer sizes as one categorical choice."""
    try:
        return tuple(int(size) for size in str(text).split("-"))
    except ValueError as error:
        raise ConfigError(f"hidden_layers must look like '512-256', got {text!r}") from error


def build_classic(
    family: str, hyperparameters: dict[str, Any], seed: int, smallest_class: int = 5
) -> Any:
    """The scaler + estimator Pipeline of a classic family. `smallest_class` (training rows of
    the rarest genre) bounds the folds of the SVM's probability calibration."""
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    values = dict(hyperparameters)
    if family == "naive_bayes":
        from sklearn.naive_bayes import GaussianNB

        estimator = GaussianNB(**values)
    elif family == "sgd":
        from sklearn.linear_model import SGDClassifier

        estimator = SGDClassifier(random_state=seed, **values)
    elif family == "knn":
        from sklearn.neighbors import KNeighborsClassifier

        estimator = KNeighborsClassifier(**values)
    elif family == "decision_tree":
        from sklearn.tree import DecisionTreeClassifier

        estimator = DecisionTreeClassifier(random_state=seed, **values)
    elif family == "random_forest":
        from sklearn.ensemble import RandomForestClassifier

        estimator = RandomForestClassifier(random_state=seed, **values)
    elif family == "svm":
        from sklearn.calibration import CalibratedClassifierCV
        from sklearn.svm import SVC

        # Probabilities (for song votes and serving) by Platt scaling on cross-validated
        # decision values: what SVC(probability=True) did before scikit-learn 1.9 deprecated it.
        # (One decision value per genre: the schema refuses decision_function_shape other than
        # ovr, SVC's own.)
        folds = max(2, min(5, smallest_class))
        estimator = CalibratedClassifierCV(SVC(**values), ensemble=False, cv=folds)
    elif family == "logistic_regression":
        from sklearn.linear_model import LogisticRegression

        estimator = LogisticRegression(random_state=seed, **values)
    elif family == "mlp":
        from sklearn.neural_network import MLPClassifier

        layers = hidden_layers(required(values, "hidden_layers", family))
        del values["hidden_layers"]
        estimator = MLPClassifier(hidden_layer_sizes=layers, random_state=seed, **values)
    else:
        raise ConfigError(f"{family!r} is not a classic family")
    return make_pipeline(StandardScaler(), estimator)


@dataclass
class FitResult:
    """A trained model and what early stopping found."""

    model: Any  # has predict_proba(DataFrame) -> (n, n_classes)
    budget: int | None = None  # epochs (Keras) or boosting rounds (XGBoost) worth training
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, validation accuracy)


def set_seeds(seed: int) -> None:
    """Seed Python, NumPy and (if loaded) TensorFlow, and make TF ops deterministic."""
    import random
    import sys

    random.seed(seed)
    np.random.seed(seed)
    if "tensorflow" in sys.modules or "keras" in sys.modules:
        import keras

        tf = import_tensorflow()

        keras.utils.set_random_seed(seed)
        tf.config.experimental.enable_op_determinism()


def _features(rows: pd.DataFrame) -> np.ndarray:
    return np.ascontiguousarray(rows.to_numpy(dtype=np.float32))


class KerasClassifier:
    """A Keras softmax network with the predict_proba interface of the other families."""

    def __init__(self, network: Any):
        self.network = network

    def predict_proba(self, rows: pd.DataFrame | np.ndarray) -> np.ndarray:
        import_tensorflow()
        import keras

        values = _features(rows) if isinstance(rows, pd.DataFrame) else np.asarray(rows, "float32")
        # A direct call skips predict()'s data pipeline and compiled predict function: faster
        # for the ten rows of a served clip, and no tf.function retracing for each new row count.
        probabilities = self.network(values, training=False)
        return np.asarray(keras.ops.convert_to_numpy(probabilities), dtype=np.float64)


def build_network(
    family: str,
    hyperparameters: dict[str, Any],
    n_features: int,
    n_classes: int,
    train_features: np.ndarray,
) -> Any:
    """The uncompiled Keras network of `fnn` (Dense 1024-512-256-128-64, each with batch norm and
    dropout) or `fnn_simple` (Dense 512-256-64 with dropout), softmax over the genres."""
    import_tensorflow()
    import keras

    normalise = keras.layers.Normalization(name="standardise")
    normalise.adapt(train_features)
    layers: list[Any] = [keras.Input(shape=(n_features,), name="features"), normalise]
    dropout = float(required(hyperparameters, "dropout", family))
    if family == "fnn":
        for width in (1024, 512, 256, 128, 64):
            layers += [
                keras.layers.Dense(width, activation="relu"),
                keras.layers.BatchNormalization(),
                keras.layers.Dropout(dropout),
            ]
    elif family == "fnn_simple":
        for width in (512, 256, 64):
            layers += [keras.layers.Dense(width, activation="relu"), keras.layers.Dropout(dropout)]
    else:
        raise ConfigError(f"{family!r} is not a Keras family")
    layers.append(keras.layers.Dense(n_classes, activation="softmax", name="genre"))
    return keras.Sequential(layers, name=family)


def fit_keras(
    family: str,
    hyperparameters: dict[str, Any],
    train: tuple[pd.DataFrame, np.ndarray],
    n_classes: int,
    seed: int,
    valid: tuple[pd.DataFrame, np.ndarray] | None = None,
    budget: int | None = None,
    report: ReportFn | None = None,
) -> FitResult:
    """Train with Adam; with `valid`, stop `patience` epochs after the validation loss stops
    falling and keep the best epoch's weights, else train exactly `budget` epochs.

    The loss, not the accuracy, picks the epoch: on a small validation set the accuracy of an
    early, barely trained epoch can be the highest by luck, and a refit for that many epochs
    underfits (seen on the 70 real clips: 3 epochs, 0.77 validation, 0.40 test accuracy).
    """
    import_tensorflow()
    import keras

    set_seeds(seed)
    features, labels = _features(train[0]), np.asarray(train[1])
    network = build_network(family, hyperparameters, features.shape[1], n_classes, features)
    network.compile(
        optimizer=keras.optimizers.Adam(
            learning_rate=float(required(hyperparameters, "learning_rate", family))
        ),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    curve: list[tuple[int, float]] = []  # (epoch, validation accuracy): reported to the pruner
    losses: list[float] = []
    callbacks: list[Any] = []
    validation = None
    epochs = int(budget or required(hyperparameters, "epochs", family))
    if valid is not None:
        validation = (_features(valid[0]), np.asarray(valid[1]))
        callbacks.append(
            keras.callbacks.EarlyStopping(
                monitor="val_loss",
                patience=int(required(hyperparameters, "patience", family)),
                restore_best_weights=True,
            )
        )

        class Report(keras.callbacks.Callback):
            def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
                logs = logs or {}
                losses.append(float(logs.get("val_loss", np.inf)))
                value = float(logs.get("val_accuracy", np.nan))
                curve.append((epoch + 1, value))
                if report is not None:
                    report(epoch + 1, value)

        callbacks.append(Report())
    network.fit(
        features,
        labels,
        epochs=epochs,
        batch_size=int(required(hyperparameters, "batch_size", family)),
        validation_data=validation,
        callbacks=callbacks,
        shuffle=True,
        verbose=0,
    )
    # The epoch whose weights EarlyStopping restored: the first with the lowest loss.
    best = int(np.argmin(losses)) + 1 if losses else epochs
    return FitResult(KerasClassifier(network), budget=best, curve=curve)


def fit_xgboost(
    hyperparameters: dict[str, Any],
    train: tuple[pd.DataFrame, np.ndarray],
    n_classes: int,
    seed: int,
    valid: tuple[pd.DataFrame, np.ndarray] | None = None,
    budget: int | None = None,
    report: ReportFn | None = None,
) -> FitResult:
    """XGBClassifier; with `valid`, boosting stops `early_stopping_rounds` after the validation
    log loss stops falling, else it runs exactly `budget` rounds."""
    import xgboost

    # Early stopping is a setting of the fit (with validation rows), not of XGBClassifier.
    values = {k: v for k, v in hyperparameters.items() if k != "early_stopping_rounds"}
    curve: list[tuple[int, float]] = []

    class Report(xgboost.callback.TrainingCallback):
        def after_iteration(self, model: Any, epoch: int, evals_log: dict) -> bool:
            errors = evals_log.get("validation_0", {}).get("merror")
            if errors and (epoch + 1) % XGBOOST_REPORT_EVERY == 0:
                curve.append((epoch + 1, 1.0 - float(errors[-1])))
                if report is not None:
                    report(epoch + 1, 1.0 - float(errors[-1]))
            return False

    settings: dict[str, Any] = {
        "objective": "multi:softprob",
        "num_class": n_classes,
        "tree_method": "hist",
        "random_state": seed,
        "n_jobs": 1,  # one thread: deterministic, and Optuna workers get a core each
        **values,
    }
    if budget is not None:
        settings["n_estimators"] = budget
    if valid is not None:
        # The last eval metric drives early stopping: log loss; merror is reported to Optuna.
        settings.update(
            eval_metric=["merror", "mlogloss"],
            early_stopping_rounds=int(
                required(hyperparameters, "early_stopping_rounds", "xgboost")
            ),
            callbacks=[Report()],
        )
    model = xgboost.XGBClassifier(**settings)
    fit_args: dict[str, Any] = {"verbose": False}
    if valid is not None:
        fit_args["eval_set"] = [(valid[0], np.asarray(valid[1]))]
    model.fit(train[0], np.asarray(train[1]), **fit_args)
    rounds = int(model.best_iteration) + 1 if valid is not None else settings["n_estimators"]
    return FitResult(model, budget=rounds, curve=curve)


def fit_family(
    family: str,
    hyperparameters: dict[str, Any],
    train: tuple[pd.DataFrame, np.ndarray],
    n_classes: int,
    seed: int,
    valid: tuple[pd.DataFrame, np.ndarray] | None = None,
    budget: int | None = None,
    report: ReportFn | None = None,
) -> FitResult:
    """Train `family` on (features, label indices). `valid` enables early stopping (Keras,
    XGBoost) and reporting; `budget` fixes the epochs or rounds instead (a refit)."""
    missing = sorted(set(range(n_classes)) - set(np.unique(train[1]).tolist()))
    if missing:
        raise ValueError(
            f"{family}: the training rows lack genre indices {missing}; every genre needs "
            "training examples (more clips per genre, or another split)"
        )
    flavor = flavor_of(family)
    if flavor == "keras":
        return fit_keras(family, hyperparameters, train, n_classes, seed, valid, budget, report)
    if flavor == "xgboost":
        return fit_xgboost(hyperparameters, train, n_classes, seed, valid, budget, report)
    set_seeds(seed)
    model = build_classic(family, hyperparameters, seed, int(np.bincount(train[1]).min()))
    model.fit(train[0], np.asarray(train[1]))
    return FitResult(model)


# --- logging and loading through MLflow -----------------------------------------------------

# Distributions each flavor's native model needs to load (pinned when logged).
FLAVOR_REQUIREMENTS: dict[str, tuple[str | tuple[str, ...], ...]] = {
    "sklearn": ("scikit-learn", "numpy", "pandas", "scipy", "skops"),
    "xgboost": (("xgboost-cpu", "xgboost"), "numpy", "pandas", "scikit-learn"),
    "keras": (("tensorflow-cpu", "tensorflow"), "keras", "numpy", "pandas"),
}


def installed_requirements(names: tuple[str | tuple[str, ...], ...]) -> list[str]:
    """`name==version` of each installed distribution (a tuple: the first one installed)."""
    pinned = []
    for name in names:
        for candidate in (name,) if isinstance(name, str) else name:
            try:
                pinned.append(f"{candidate}=={importlib_metadata.version(candidate)}")
                break
            except importlib_metadata.PackageNotFoundError:
                continue
    return pinned


def log_classifier(model: Any, flavor: str, example: pd.DataFrame, name: str = "model") -> Any:
    """Log a trained model in the active run with a signature and an input example (a few
    feature rows); returns MLflow's ModelInfo (`.model_uri` is what load_classifier takes)."""
    import mlflow
    from mlflow.models import infer_signature

    if flavor == "keras":
        # MLflow's Keras flavor takes tensor signatures only: the example goes in as an array.
        example = _features(example)
    signature = infer_signature(example, model.predict_proba(example))
    common = {
        "name": name,
        "signature": signature,
        "input_example": example,
        "pip_requirements": installed_requirements(FLAVOR_REQUIREMENTS[flavor]),
    }
    if flavor == "sklearn":
        return mlflow.sklearn.log_model(
            model,
            pyfunc_predict_fn="predict_proba",
            skops_trusted_types=own_skops_types(model),
            **common,
        )
    if flavor == "xgboost":
        return mlflow.xgboost.log_model(model, **common)
    if flavor == "keras":
        return log_keras_model(model.network, **common)
    raise ConfigError(f"unknown flavor {flavor!r}")


def log_keras_model(network: Any, **options: Any) -> Any:
    """`mlflow.keras.log_model`, working around mlflow/mlflow#16183 (open in 3.17.2): the Keras
    flavor writes the input example before it creates the model folder. This saver creates the
    folder, then hands over to `mlflow.keras.save_model` unchanged."""
    import os
    from types import SimpleNamespace

    import mlflow.keras
    from mlflow.models import Model

    def save_model(path: str, **kwargs: Any) -> None:
        os.makedirs(path, exist_ok=True)
        mlflow.keras.save_model(path=path, **kwargs)

    flavor = SimpleNamespace(__name__="mlflow.keras", save_model=save_model)
    return Model.log(artifact_path=None, flavor=flavor, model=network, **options)


def own_skops_types(model: Any) -> list[str]:
    """The types of `model` that skops does not trust by default (e.g. the tree storage of
    decision trees and forests). We built the model in this process, so the logged model may
    trust exactly these; loading it elsewhere then needs no blanket trust."""
    import skops.io

    return sorted(skops.io.get_untrusted_types(data=skops.io.dumps(model)))


def load_classifier(model_uri: str, flavor: str) -> Any:
    """A logged model (URI or local folder) with predict_proba(DataFrame of features)."""
    import mlflow

    if flavor == "sklearn":
        return mlflow.sklearn.load_model(model_uri)
    if flavor == "xgboost":
        return mlflow.xgboost.load_model(model_uri)
    if flavor == "keras":
        import_tensorflow()  # before mlflow.keras imports it, unquietly
        import mlflow.keras

        return KerasClassifier(mlflow.keras.load_model(model_uri))
    raise ConfigError(f"unknown flavor {flavor!r}")
