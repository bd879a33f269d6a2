"""MLflow "model from code" entry point of the d2v encoder (see ``d2v.tracking.pyfunc``).

``log_encoder`` logs this file as the pyfunc's ``python_model``: loading the model runs this
file (which only imports ``d2v``) instead of unpickling a Python object.
"""

import mlflow

from d2v.tracking.pyfunc import EncoderModel

mlflow.models.set_model(EncoderModel())
