"""The served model's entry file (MLflow "models from code"; see serving/packaging.py).

MLflow copies this file into the logged model and runs it when the model is loaded, so the model
is rebuilt from the code logged beside it (code_paths) rather than unpickled.
"""

import mlflow

from gtzan_mlops.serving.pyfunc import GenreClassifier

mlflow.models.set_model(GenreClassifier())
