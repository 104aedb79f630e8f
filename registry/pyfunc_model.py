"""The pyfunc's model file (MLflow models-from-code): logged as ``python_model=`` a path instead of a
cloudpickled object, so loading the registered model executes this file, never unpickles code.

MLflow puts the logged ``code_paths`` (``fer_core``, ``serving``, ``registry``) on ``sys.path``
before it runs this file; :class:`registry.pyfunc.FERImageModel` then loads the package artifact.
"""

import mlflow

from registry.pyfunc import FERImageModel

mlflow.models.set_model(FERImageModel())
