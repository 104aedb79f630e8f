"""The model file ``fer app`` / ``fer annotate`` run locally when no Triton is given.

:func:`resolve_local_model` is the one seam between "which model" and "an ONNX file with its
metadata": today it takes an ``.onnx`` file, or a folder holding ``model.onnx`` (the layout a model
package will have), or a network name, whose ``champion`` (or another alias) is fetched from the
MLflow registry -- the ``onnx/model.onnx`` artifact its training run logged -- and cached under
``$FER_HOME/app/models/<network>-v<version>.onnx``. Nothing is downloaded from the internet.
"""

from __future__ import annotations

from pathlib import Path

from fer_platform.workspace import Workspace

__all__ = ["resolve_local_model"]


def resolve_local_model(model: str | None, network: str, alias: str = "champion", *,
                        workspace: Workspace) -> Path:
    """An ONNX file to run (see the module docstring); ``ValueError`` with a one-line reason."""
    if model:
        path = Path(model)
        if path.is_dir():
            path = path / "model.onnx"
        if not path.is_file():
            raise ValueError(f"model {model} is neither an .onnx file nor a folder holding model.onnx")
        return path
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from registry import models as reg
    from registry.export import ONNX_ARTIFACT

    version = reg.get_alias(network, alias, workspace)
    if version is None:
        raise ValueError(f"fer-{network} has no {alias!r} version in the registry; promote one, or pass --model "
                         "FILE.onnx or --url of a Triton")
    cached = workspace.root / "app" / "models" / f"{network}-v{version.version}.onnx"
    if cached.is_file():
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    try:
        downloaded = Path(MlflowClient().download_artifacts(version.run_id, ONNX_ARTIFACT, str(cached.parent)))
    except (MlflowException, OSError) as exc:
        raise ValueError(f"fer-{network} v{version.version}: cannot fetch {ONNX_ARTIFACT} of run "
                         f"{version.run_id}: {str(exc).splitlines()[0]}") from None
    downloaded.replace(cached)
    return cached
