"""MLflow models-from-code entry: the qdsize pyfunc is defined by this file, so nothing is pickled."""

import mlflow

from qdsize.ml.predict import PyfuncModel

mlflow.models.set_model(PyfuncModel())
