"""Registries: dataset versions (DVC) and model versions (MLflow Model Registry)."""
