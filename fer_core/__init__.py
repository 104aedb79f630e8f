"""fer_core: the pure library of the FER platform (data, models, losses, training, metrics).

This package never imports orchestration, tracking or serving clients (prefect, mlflow, dvc,
great_expectations, tritonclient); ``tests/test_architecture.py`` enforces it.
"""

__version__ = "0.1.0"
