"""Models-from-code entry point: MLflow runs this file when it loads an exported model folder.

It only names the pyfunc class of the installed package, so the folder holds code and weights,
never pickled Python objects.
"""

from mlflow.models import set_model

from serving.pyfunc import VisionModel

set_model(VisionModel())
