"""The models-from-code entry: MLflow executes this file to get the served model.

``register`` logs it as the pyfunc's ``python_model``; nothing in the package imports it.
"""

from mlflow.models import set_model

from wsimil.serve.pyfunc import FoldEnsembleModel

set_model(FoldEnsembleModel())
