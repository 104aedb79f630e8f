"""Model zoo: one model family per module, built through :func:`create_model`."""

from fer_core.models.catalog import (
    FERModel,
    ModelMetadata,
    TensorSpec,
    create_model,
    list_models,
    register_model,
)

__all__ = ["FERModel", "ModelMetadata", "TensorSpec", "create_model", "list_models", "register_model"]
