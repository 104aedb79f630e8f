"""The registered MLflow model of a version: raw images in, labels and probabilities out.

One MLflow model with two flavours, built from the version's model package:

* ``python_function`` -- :class:`FERImageModel`: takes encoded image bytes (column ``image``; a
  clip network takes column ``frames``, a list of encoded frames per row) and returns one row
  per sample with ``label``, ``probabilities`` (in ``labels`` order), ``face_found`` and the
  network's other outputs (``valence_arousal``, ``landmarks``, ``active``). It runs the package's
  own pipeline (decode → input-pipeline spec → ONNX Runtime → post-processing), the same functions
  Triton's ensemble runs, so ``mlflow models serve`` answers like the platform does;
* ``onnx`` -- the package's ``model.onnx`` (``mlflow.onnx.load_model``), same file, not a copy.

The package itself is the model's artifact ``package`` (hashes included). The code the pyfunc
needs (``fer_core``, ``serving``, this module) is logged with ``code_paths`` and its third-party
requirements are pinned, so the model loads where only the platform's requirements are installed.
Decoded uint8 arrays are accepted by the unwrapped model (``model.unwrap_python_model().predict``):
MLflow's schema enforcement only knows serialisable column types.
"""

from __future__ import annotations

import base64
import shutil
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Mapping, Sequence

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import Model
from mlflow.models.signature import ModelSignature
from mlflow.types.schema import Array, ColSpec, DataType, Schema

from serving.package import ModelPackage

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CODE_PATHS = [str(PROJECT_ROOT / name) for name in ("fer_core", "serving", "registry")]
# Models-from-code: the pyfunc is this file's FERImageModel, not a cloudpickle of it.
MODEL_FILE = str(Path(__file__).with_name("pyfunc_model.py"))
# Third-party packages the pyfunc imports at load/predict time (pinned to what is installed here).
_RUNTIME_PACKAGES = ("numpy", "pandas", "onnx", "onnxruntime", "opencv-python-headless", "pydantic-settings",
                     "PyYAML", "filelock")
ARTIFACT_PACKAGE = "package"

__all__ = ["FERImageModel", "log_package_model", "signature_for", "input_example", "pip_requirements",
           "ARTIFACT_PACKAGE"]


def pip_requirements() -> list[str]:
    """Pinned requirements of the pyfunc (the versions installed in this environment)."""
    pins = []
    for name in _RUNTIME_PACKAGES:
        try:
            pins.append(f"{name}=={importlib_metadata.version(name)}")
        except importlib_metadata.PackageNotFoundError:
            continue
    return pins


def _is_clip(package: ModelPackage) -> bool:
    return package.pipeline.kind == "clip"


def signature_for(package: ModelPackage) -> ModelSignature:
    """Input: encoded ``image`` bytes (or ``frames`` for clips); output: one row per sample."""
    inputs = Schema([ColSpec(Array(DataType.binary), "frames")] if _is_clip(package)
                    else [ColSpec(DataType.binary, "image")])
    outputs = [ColSpec(DataType.string, "label"), ColSpec(Array(DataType.double), "probabilities"),
               ColSpec(DataType.boolean, "face_found")]
    names = set(package.metadata.output_names)
    if package.metadata.extra.get("multi_label"):
        outputs.append(ColSpec(Array(DataType.boolean), "active"))
    if "valence_arousal" in names:
        outputs.append(ColSpec(Array(DataType.double), "valence_arousal"))
    if "landmarks" in names:
        outputs.append(ColSpec(Array(Array(DataType.double)), "landmarks"))
    return ModelSignature(inputs=inputs, outputs=Schema(outputs))


def input_example(package: ModelPackage, count: int = 2) -> pd.DataFrame:
    """Real held-out samples of the package's smoke set (encoded bytes)."""
    samples = package.smoke_samples()[:count]
    if _is_clip(package):
        return pd.DataFrame({"frames": [list(s) for s in samples]})
    return pd.DataFrame({"image": [s[0] for s in samples]})


def _as_bytes(value: Any) -> Any:
    if isinstance(value, str):  # JSON clients may send base64 text where MLflow did not decode it
        return base64.b64decode(value)
    return bytes(value) if isinstance(value, (bytearray, memoryview)) else value


def _samples(model_input: Any, clip: bool) -> list[list[Any]]:
    """Rows of ``model_input`` as lists of encoded images (bytes) or decoded uint8 arrays."""
    if isinstance(model_input, pd.DataFrame):
        column = "frames" if clip else "image"
        if column not in model_input.columns:
            raise ValueError(f"input needs a column {column!r}, got {list(model_input.columns)}")
        values = list(model_input[column])
    elif isinstance(model_input, Mapping):
        values = list(model_input.get("frames" if clip else "image", []))
    elif isinstance(model_input, (bytes, bytearray)):
        values = [model_input]
    elif isinstance(model_input, np.ndarray) and model_input.dtype == np.uint8:
        # Image networks: (H, W) / (H, W, 3) is one image, (N, H, W) / (N, H, W, 3) a batch.
        # Clip networks: (T, H, W) / (T, H, W, 3) is one clip, (N, T, H, W[, 3]) a batch.
        rgb = model_input.shape[-1] == 3
        single_ndim = (3 if rgb else 2) + (1 if clip else 0)
        values = [model_input] if model_input.ndim == single_ndim else list(model_input)
    else:
        values = list(model_input)
    rows = []
    for value in values:
        if clip:
            frames = list(value) if not isinstance(value, np.ndarray) or value.ndim >= 3 else [value]
            rows.append([_as_bytes(f) for f in frames])
        else:
            rows.append([_as_bytes(value)])
    return rows


class FERImageModel(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc over a model package (see the module docstring)."""

    def load_context(self, context) -> None:
        from serving.package import PackageRunner

        self.package = ModelPackage.open(context.artifacts[ARTIFACT_PACKAGE])
        self.runner = PackageRunner(self.package)

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        clip = _is_clip(self.package)
        answers = self.runner.predict(_samples(model_input, clip))
        frame = pd.DataFrame({
            "label": [v[0].decode() if isinstance(v[0], bytes) else str(v[0]) for v in answers["LABEL"]],
            "probabilities": [row.astype(float).tolist() for row in answers["PROBABILITIES"]],
            "face_found": [bool(v[0]) for v in answers["FACE_FOUND"]],
        })
        for key, column in (("ACTIVE", "active"), ("VALENCE_AROUSAL", "valence_arousal"), ("LANDMARKS", "landmarks")):
            if key in answers:
                frame[column] = [row.tolist() for row in answers[key]]
        return frame


class _PackageFlavor:
    """What :meth:`mlflow.models.Model.log` calls: a pyfunc over the package plus the ``onnx`` flavour."""

    __name__ = "fer_package"

    @staticmethod
    def save_model(path: str, mlflow_model: Model, package: ModelPackage, **kwargs: Any) -> None:
        import onnx

        mlflow.pyfunc.save_model(
            path=path, mlflow_model=mlflow_model, python_model=MODEL_FILE,
            artifacts={ARTIFACT_PACKAGE: str(package.root)}, code_paths=CODE_PATHS,
            signature=signature_for(package), input_example=input_example(package),
            pip_requirements=pip_requirements(), **kwargs,
        )
        data = f"artifacts/{ARTIFACT_PACKAGE}/model.onnx"
        if not (Path(path) / data).is_file():
            raise FileNotFoundError(f"the pyfunc's package artifact lacks {data}")
        mlflow_model.add_flavor("onnx", onnx_version=onnx.__version__, data=data,
                                providers=["CPUExecutionProvider"], code=None)
        mlflow_model.save(str(Path(path) / "MLmodel"))


def log_package_model(package: ModelPackage, run_id: str, name: str = "fer_model") -> Any:
    """Log the package as an MLflow model (pyfunc + onnx) to ``run_id``; returns MLflow's ModelInfo."""
    # Inside the run, so the logged model lands in the run's experiment (not MLflow's default one,
    # whose artifact root is ./mlruns of the current folder); the run ends FINISHED again.
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        return Model.log(artifact_path=None, name=name, flavor=_PackageFlavor, run_id=run_id, package=package)
    with mlflow.start_run(run_id=run_id, nested=active is not None):
        return Model.log(artifact_path=None, name=name, flavor=_PackageFlavor, run_id=run_id, package=package)
