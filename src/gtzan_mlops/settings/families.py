"""The names of the model families, for the models (models.py) and the settings' schema
(params_schema.py) alike."""

CLASSIC_FAMILIES = (
    "naive_bayes",
    "sgd",
    "knn",
    "decision_tree",
    "random_forest",
    "svm",
    "logistic_regression",
    "mlp",
)  # scikit-learn
KERAS_FAMILIES = ("fnn", "fnn_simple")
FAMILIES = (*CLASSIC_FAMILIES, *KERAS_FAMILIES, "xgboost")
