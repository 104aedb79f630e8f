"""A Triton model repository on disk, written atomically and generated from model metadata.

Layout (one folder per Triton model; hidden entries are the repository's own bookkeeping)::

    <root>/<network>/config.pbtxt            backend "onnxruntime", version_policy = served versions
    <root>/<network>/labels.txt              label file of the classification outputs
    <root>/<network>/<version>/model.onnx    version = the model registry's version (not always 1)
    <root>/<network>/<version>/package.json  the version's package manifest (metadata, input pipeline, hashes)
    <root>/<network>_preprocess/             Python backend: encoded bytes -> model input
    <root>/<network>_postprocess/            Python backend: outputs -> label, probabilities, extras
    <root>/<network>_ensemble/               layout "steps": preprocess -> <network> (pinned champion) -> postprocess
                                             layout "fused": one step, <network>_pipeline
    <root>/<network>_pipeline/1/model.onnx   Python backend: bytes -> label in one execute, with its own
                                             copy of the champion's ONNX (FER_TRITON_ENSEMBLE, serving.tuning)
    <root>/../.<root name>.staging/          where versions are built before being renamed into place
    <root>/.deployment.json                  per-network deployment choices (face handling override)

Pre/post-processing is generated from the *champion's package*: its metadata and its input-pipeline
spec (config parameter ``fer_pipeline``), so a rollback restores that version's pre-processing too.
Face handling for full photos is the version's choice (its package) unless the deployment overrides
it: :meth:`ModelRepository.set_face_handling` per network, else ``FER_FACE_DETECTION`` when set.

Atomicity: a version folder is built in the staging folder (same filesystem) and moved into place
with one ``os.rename``, and every config/label file is written to a temporary file then
``os.replace``-d, so Triton (or a crash) never sees a half-written version or config. A crash can
only leave entries in the staging folder or temporary files behind; :meth:`ModelRepository.repair`
deletes them, plus any version folder without its model file (written by other means).
"""

from __future__ import annotations

import filecmp
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from fer_core.metadata import ModelMetadata
from fer_platform.settings import FACE_DETECTION_MODES, is_remote
from serving.ensembles import processing
from fer_core.data.pipeline import InputPipeline
from fer_core.metadata import metadata_from_dict, metadata_to_json
from serving.package import MANIFEST, ModelPackage, PackageError, read_onnx_metadata
from serving.tuning import ENSEMBLE_LAYOUTS, ServingTuning, measure_latency, queue_delay_from_latency

if TYPE_CHECKING:
    from fer_platform.workspace import Workspace
    from serving.s3_repository import S3Mirror
    from serving.server import TritonEndpoint

__all__ = [
    "ModelRepository",
    "network_config",
    "preprocess_config",
    "postprocess_config",
    "ensemble_config",
    "pipeline_config",
    "step_models",
    "INSTANCE_KINDS",
    "PROJECT_ROOT",
    "PYTHONPATH_ENV",
]

INSTANCE_KINDS = ("KIND_CPU", "KIND_GPU", "KIND_AUTO")
STAGING_SUFFIX = ".staging"
# The promotion's candidate ensemble: <network>_candidate_{preprocess,postprocess,ensemble}.
CANDIDATE_SUFFIX = "_candidate"
MODEL_FILE = "model.onnx"
PYTHON_MODEL_FILE = "model.py"
# The folder holding fer_core/ and serving/: the Python-backend models put it on sys.path.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Environment variable naming the folders a Triton Python-backend model must import from.
PYTHONPATH_ENV = "FER_TRITON_PYTHONPATH"

_TRITON_DTYPES = {
    "float32": "TYPE_FP32", "float16": "TYPE_FP16", "float64": "TYPE_FP64", "int64": "TYPE_INT64",
    "int32": "TYPE_INT32", "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL", "BYTES": "TYPE_STRING",
    "FP32": "TYPE_FP32", "BOOL": "TYPE_BOOL",
}
_CLASSIFICATION_KINDS = ("logits", "probabilities", "multilabel_logits")
_NETWORK_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_VERSION_POLICY = re.compile(r"^version_policy: .*$", re.MULTILINE)
_PINNED_VERSION = re.compile(r'model_name: "(?P<name>[^"]+)" model_version: (?P<version>-?\d+)')
_CHAMPION_PARAMETER = re.compile(r'key: "champion_version" value: \{ string_value: "(?P<version>\d+)" \}')
# Every Python step an ensemble of either layout can have (snapshots and load order cover them all).
STEP_SUFFIXES = ("_preprocess", "_postprocess", "_pipeline")


def step_models(stem: str, layout: str) -> list[str]:
    """The Python-backend steps of ``<stem>_ensemble`` in ``layout``; the first one holds the
    pre-processing parameters (face handling, image limits, the input pipeline)."""
    if layout not in ENSEMBLE_LAYOUTS:
        raise ValueError(f"ensemble layout must be one of {ENSEMBLE_LAYOUTS}, got {layout!r}")
    return [f"{stem}_pipeline"] if layout == "fused" else [f"{stem}_preprocess", f"{stem}_postprocess"]


def _quote(text: str) -> str:
    """A protobuf text-format string literal."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _dims(shape: Iterable[int]) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def _tensor(name: str, dtype: str, shape: Iterable[int], label_file: str = "") -> str:
    if dtype not in _TRITON_DTYPES:
        raise ValueError(f"tensor {name!r}: dtype {dtype!r} has no Triton type")
    label = f" label_filename: {_quote(label_file)}" if label_file else ""
    return f"  {{ name: {_quote(name)} data_type: {_TRITON_DTYPES[dtype]} dims: {_dims(shape)}{label} }}"


def _block(key: str, tensors: list[str]) -> str:
    return f"{key} [\n" + ",\n".join(tensors) + "\n]"


def _check_common(max_batch_size: int, instances: int, instance_kind: str) -> None:
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    if instances < 1:
        raise ValueError(f"instances must be >= 1, got {instances}")
    if instance_kind not in INSTANCE_KINDS:
        raise ValueError(f"instance_kind must be one of {INSTANCE_KINDS}, got {instance_kind!r}")


def _check_versions(versions: Iterable[int]) -> list[int]:
    out = sorted({int(v) for v in versions})
    if not out or any(v < 1 for v in out):
        raise ValueError(f"served versions must be positive integers, got {list(versions)}")
    return out


def _common_tail(max_batch_size: int, instances: int, instance_kind: str, max_queue_delay_us: int,
                 preferred_batch_sizes: Sequence[int] = ()) -> list[str]:
    if int(max_queue_delay_us) < 0:
        raise ValueError(f"max_queue_delay_us must be >= 0, got {max_queue_delay_us}")
    bad = [s for s in preferred_batch_sizes if not 1 <= int(s) <= max_batch_size]
    if bad:
        raise ValueError(f"preferred batch sizes must be within 1..max_batch_size ({max_batch_size}), got {bad}")
    preferred = f"preferred_batch_size: {_dims(sorted(set(preferred_batch_sizes)))} " if preferred_batch_sizes else ""
    return [
        f"dynamic_batching {{ {preferred}max_queue_delay_microseconds: {int(max_queue_delay_us)} }}",
        f"instance_group [ {{ kind: {instance_kind} count: {int(instances)} }} ]",
    ]


def _parameters(values: dict[str, str]) -> list[str]:
    return [f"parameters {{ key: {_quote(k)} value: {{ string_value: {_quote(v)} }} }}" for k, v in values.items()]


def label_files(metadata: ModelMetadata) -> dict[str, str]:
    """Output name → label file name for classification outputs (``labels.txt`` for the primary set)."""
    files: dict[str, str] = {}
    primary_labels = metadata.label_names
    for spec in metadata.outputs:
        labels = spec.labels or ()
        if spec.kind not in _CLASSIFICATION_KINDS or not labels or len(spec.shape) != 1:
            continue
        files[spec.name] = "labels.txt" if labels == tuple(primary_labels) else f"{spec.name}_labels.txt"
    return files


def network_config(
    metadata: ModelMetadata,
    versions: Sequence[int],
    *,
    name: str | None = None,
    max_batch_size: int = 32,
    instances: int = 1,
    instance_kind: str = "KIND_CPU",
    max_queue_delay_us: int = 0,
    intra_op_threads: int = 0,
    inter_op_threads: int = 0,
    allow_spinning: bool | None = None,
    preferred_batch_sizes: Sequence[int] = (),
) -> str:
    """``config.pbtxt`` of a network served from ONNX by the ``onnxruntime`` backend.

    Thread counts of 0 and ``allow_spinning=None`` leave ONNX Runtime's defaults; ``allow_spinning``
    is written as the session config entry ``session.intra_op.allow_spinning`` (our backend passes
    ``session.*`` parameters to ONNX Runtime). :class:`ModelRepository` fills these from
    :class:`serving.tuning.ServingTuning`.
    """
    _check_common(max_batch_size, instances, instance_kind)
    labels = label_files(metadata)
    lines = [
        f"name: {_quote(name or metadata.name)}",
        'backend: "onnxruntime"',
        f"max_batch_size: {int(max_batch_size)}",
        f"version_policy: {{ specific: {{ versions: {_dims(_check_versions(versions))} }} }}",
        _block("input", [_tensor(s.name, s.dtype, s.shape) for s in metadata.inputs]),
        _block("output", [_tensor(s.name, s.dtype, s.shape, labels.get(s.name, "")) for s in metadata.outputs]),
        *_common_tail(max_batch_size, instances, instance_kind, max_queue_delay_us, preferred_batch_sizes),
    ]
    lines += _parameters(_ort_parameters(intra_op_threads, inter_op_threads, allow_spinning))
    return "\n".join(lines) + "\n"


def _ort_parameters(intra_op_threads: int, inter_op_threads: int, allow_spinning: bool | None) -> dict[str, str]:
    """ONNX Runtime's thread settings as config parameters (the native backend's names; 0 = ORT's default)."""
    if intra_op_threads < 0 or inter_op_threads < 0:
        raise ValueError(f"thread counts must be >= 0, got intra {intra_op_threads}, inter {inter_op_threads}")
    threads = {"intra_op_thread_count": intra_op_threads, "inter_op_thread_count": inter_op_threads}
    values = {k: str(int(v)) for k, v in threads.items() if v}
    if allow_spinning is not None:
        values["session.intra_op.allow_spinning"] = "1" if allow_spinning else "0"
    return values


def _ensemble_input(metadata: ModelMetadata) -> tuple[str, tuple[int, ...]]:
    """Encoded bytes per sample: one image, or a clip's frames (any count)."""
    return ("FRAMES", (-1,)) if processing.is_video_network(metadata) else ("IMAGE", (1,))


def _python_parameters(metadata: ModelMetadata, max_image_bytes: int, max_image_pixels: int,
                       face_detection: str = "off", pipeline: InputPipeline | None = None) -> list[str]:
    values = {
        "fer_metadata": metadata_to_json(metadata), "max_image_bytes": str(int(max_image_bytes)),
        "max_image_pixels": str(int(max_image_pixels)), "face_detection": face_detection,
    }
    if pipeline is not None:
        values["fer_pipeline"] = json.dumps(pipeline.to_dict(), sort_keys=True)
    return _parameters(values)


def preprocess_config(
    metadata: ModelMetadata, *, max_batch_size: int = 32, instances: int = 1,
    max_image_bytes: int = processing.MAX_IMAGE_BYTES, max_image_pixels: int = processing.MAX_IMAGE_PIXELS,
    face_detection: str = "off", pipeline: InputPipeline | None = None, stem: str | None = None,
) -> str:
    """``config.pbtxt`` of ``<network>_preprocess`` (Python backend, always on CPU).

    ``pipeline`` is the served version's input-pipeline spec (the stub interprets it); its face
    handling is replaced by ``face_detection``: "off" treats requests as face crops (resized whole,
    like the training data), "haar" detects, aligns and crops the largest face first (full photos).
    """
    if pipeline is not None:
        pipeline = pipeline.with_face(face_detection)
    if face_detection not in FACE_DETECTION_MODES:
        raise ValueError(f"face_detection must be one of {FACE_DETECTION_MODES}, got {face_detection!r}")
    _check_common(max_batch_size, instances, "KIND_CPU")
    input_name, input_dims = _ensemble_input(metadata)
    spec = metadata.input
    lines = [
        f"name: {_quote((stem or metadata.name) + '_preprocess')}",
        'backend: "python"',
        f"max_batch_size: {int(max_batch_size)}",
        _block("input", [_tensor(input_name, "BYTES", input_dims)]),
        _block("output", [_tensor(spec.name, spec.dtype, spec.shape), _tensor("FACE_FOUND", "bool", (1,)),
                          _tensor("TO_INPUT", "float32", (2, 3))]),
        *_common_tail(max_batch_size, instances, "KIND_CPU", 0),
        *_python_parameters(metadata, max_image_bytes, max_image_pixels, face_detection, pipeline),
    ]
    return "\n".join(lines) + "\n"


def postprocess_config(metadata: ModelMetadata, *, max_batch_size: int = 32, instances: int = 1,
                       stem: str | None = None) -> str:
    """``config.pbtxt`` of ``<network>_postprocess`` (Python backend, always on CPU)."""
    _check_common(max_batch_size, instances, "KIND_CPU")
    spec = {s.name: s for s in metadata.outputs}
    inputs = [_tensor(n, spec[n].dtype, spec[n].shape) for n in processing.postprocess_inputs(metadata)]
    inputs.append(_tensor("TO_INPUT", "float32", (2, 3)))
    outputs = [_tensor(n, dtype, shape) for n, (dtype, shape) in processing.postprocess_outputs(metadata).items()]
    lines = [
        f"name: {_quote((stem or metadata.name) + '_postprocess')}",
        'backend: "python"',
        f"max_batch_size: {int(max_batch_size)}",
        _block("input", inputs),
        _block("output", outputs),
        *_common_tail(max_batch_size, instances, "KIND_CPU", 0),
        *_python_parameters(metadata, processing.MAX_IMAGE_BYTES, processing.MAX_IMAGE_PIXELS),
    ]
    return "\n".join(lines) + "\n"


def pipeline_config(
    metadata: ModelMetadata, champion_version: int, *, max_batch_size: int = 32, instances: int = 1,
    intra_op_threads: int = 1, inter_op_threads: int = 1, allow_spinning: bool | None = False,
    max_image_bytes: int = processing.MAX_IMAGE_BYTES, max_image_pixels: int = processing.MAX_IMAGE_PIXELS,
    face_detection: str = "off", pipeline: InputPipeline | None = None, stem: str | None = None,
) -> str:
    """``config.pbtxt`` of ``<stem>_pipeline``: the fused layout's one step (Python backend, CPU).

    Encoded bytes in, what the steps layout's ensemble answers out (``FACE_FOUND`` and the
    post-processing outputs): decode + pre-process per sample, one ONNX Runtime call (its own copy
    of the champion's ``model.onnx`` in the version folder, ``champion_version`` recorded here) and
    one post-processing call per dynamic batch. Pre-processing parameters as :func:`preprocess_config`.
    """
    if int(champion_version) < 1:
        raise ValueError(f"champion_version must be >= 1, got {champion_version}")
    if pipeline is not None:
        pipeline = pipeline.with_face(face_detection)
    if face_detection not in FACE_DETECTION_MODES:
        raise ValueError(f"face_detection must be one of {FACE_DETECTION_MODES}, got {face_detection!r}")
    _check_common(max_batch_size, instances, "KIND_CPU")
    input_name, input_dims = _ensemble_input(metadata)
    outputs = [_tensor("FACE_FOUND", "bool", (1,))]
    outputs += [_tensor(n, dtype, shape) for n, (dtype, shape) in processing.postprocess_outputs(metadata).items()]
    lines = [
        f"name: {_quote((stem or metadata.name) + '_pipeline')}",
        'backend: "python"',
        f"max_batch_size: {int(max_batch_size)}",
        _block("input", [_tensor(input_name, "BYTES", input_dims)]),
        _block("output", outputs),
        *_common_tail(max_batch_size, instances, "KIND_CPU", 0),
        *_python_parameters(metadata, max_image_bytes, max_image_pixels, face_detection, pipeline),
        *_parameters({"champion_version": str(int(champion_version)),
                      **_ort_parameters(intra_op_threads, inter_op_threads, allow_spinning)}),
    ]
    return "\n".join(lines) + "\n"


def _map(key: str, pairs: Iterable[tuple[str, str]]) -> str:
    return " ".join(f"{key} {{ key: {_quote(k)} value: {_quote(v)} }}" for k, v in pairs)


def ensemble_config(metadata: ModelMetadata, champion_version: int, *, max_batch_size: int = 32,
                    stem: str | None = None, layout: str = "steps",
                    max_image_bytes: int = processing.MAX_IMAGE_BYTES) -> str:
    """``config.pbtxt`` of ``<stem>_ensemble`` (stem = the network by default). Layout ``steps``: the
    network step pins ``champion_version``, the pre/post steps are ``<stem>_preprocess`` /
    ``<stem>_postprocess``; ``fused``: one step, ``<stem>_pipeline`` (which holds that version).
    Either way the champion and the image size limit are parameters, so clients read them here."""
    if int(champion_version) < 1:
        raise ValueError(f"champion_version must be >= 1, got {champion_version}")
    network = metadata.name
    stem = stem or network
    input_name, input_dims = _ensemble_input(metadata)
    post_outputs = processing.postprocess_outputs(metadata)
    raw = processing.postprocess_inputs(metadata)
    model_input = metadata.input.name
    step_models(stem, layout)  # checks the layout
    fused = [
        f'  {{ model_name: {_quote(stem + "_pipeline")} model_version: -1 '
        + _map("input_map", [(input_name, input_name)]) + " "
        + _map("output_map", [("FACE_FOUND", "FACE_FOUND"), *((n, n) for n in post_outputs)]) + " }",
    ]
    steps = fused if layout == "fused" else [
        f'  {{ model_name: {_quote(stem + "_preprocess")} model_version: -1 '
        + _map("input_map", [(input_name, input_name)]) + " "
        + _map("output_map", [(model_input, "model_input"), ("FACE_FOUND", "FACE_FOUND"), ("TO_INPUT", "to_input")])
        + " }",
        f"  {{ model_name: {_quote(network)} model_version: {int(champion_version)} "
        + _map("input_map", [(model_input, "model_input")]) + " "
        + _map("output_map", [(n, f"raw_{n}") for n in raw]) + " }",
        f'  {{ model_name: {_quote(stem + "_postprocess")} model_version: -1 '
        + _map("input_map", [(n, f"raw_{n}") for n in raw] + [("TO_INPUT", "to_input")]) + " "
        + _map("output_map", [(n, n) for n in post_outputs]) + " }",
    ]
    outputs = [_tensor("FACE_FOUND", "bool", (1,))]
    outputs += [_tensor(n, dtype, shape) for n, (dtype, shape) in post_outputs.items()]
    lines = [
        f"name: {_quote(stem + '_ensemble')}",
        'platform: "ensemble"',
        f"max_batch_size: {int(max_batch_size)}",
        _block("input", [_tensor(input_name, "BYTES", input_dims)]),
        _block("output", outputs),
        "ensemble_scheduling {\n step [\n" + ",\n".join(steps) + "\n ]\n}",
        *_parameters({"fer_metadata": metadata_to_json(metadata), "champion_version": str(int(champion_version)),
                      "ensemble_layout": layout, "max_image_bytes": str(int(max_image_bytes))}),
    ]
    return "\n".join(lines) + "\n"


def _python_model_source(class_name: str) -> str:
    return (
        f'"""Generated by serving.repository: the {class_name} of serving.ensembles.triton_models."""\n'
        "import os\nimport sys\n\n"
        "# Triton's Python-backend stub ignores PYTHONPATH: take the project root and package folders\n"
        f"# from ${PYTHONPATH_ENV} (set by serving.server.EmbeddedTriton), else this checkout's root.\n"
        f"_paths = os.environ.get({PYTHONPATH_ENV!r}, {str(PROJECT_ROOT)!r}).split(os.pathsep)\n"
        "sys.path[:0] = [p for p in _paths if p and p not in sys.path]\n\n"
        f"from serving.ensembles.triton_models import {class_name} as TritonPythonModel  # noqa: E402,F401\n"
    )


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same folder, fsync, and ``os.replace`` it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


class ModelRepository:
    """A Triton model repository folder; see the module docstring for layout and atomicity.

    ``instance_kind`` is the default ``instance_group`` kind of the networks (``KIND_CPU`` here;
    NVIDIA's container can use ``KIND_GPU``). Pre/post-processing models always run on CPU.
    ``tuning`` (instances, ONNX Runtime threads, dynamic batching) defaults to
    :meth:`serving.tuning.ServingTuning.load` of ``tuning_env`` for the kind written, read when a
    config is written. Entry points pass ``tuning_env`` from the platform context
    (``Settings.serving_tuning``, as :meth:`of_workspace` does); without it (a repository built
    outside an entry point: benches, tests) the process environment is read.
    """

    def __init__(self, root: str | Path, *, instance_kind: str = "KIND_CPU", face_detection: str | None = None,
                 tuning: ServingTuning | None = None, tuning_env: "Mapping[str, str] | None" = None,
                 mirror: "S3Mirror | None" = None) -> None:
        if instance_kind not in INSTANCE_KINDS:
            raise ValueError(f"instance_kind must be one of {INSTANCE_KINDS}, got {instance_kind!r}")
        self.root = Path(root).resolve()
        self.instance_kind = instance_kind
        self._tuning = tuning
        self._tuning_env = tuning_env
        # A deployment-wide face handling override (see the module docstring); None = each version's own.
        # Entry points pass the settings' explicit FER_FACE_DETECTION (Workspace.face_detection_override).
        if face_detection is not None and face_detection not in FACE_DETECTION_MODES:
            raise ValueError(f"face_detection must be one of {FACE_DETECTION_MODES}, got {face_detection!r}")
        self.face_detection = face_detection
        # An s3:// repository (FER_MODEL_REPOSITORY): this folder is its working copy, see serving.s3_repository.
        self.mirror = mirror

    @classmethod
    def of_workspace(cls, workspace: "Workspace", **kwargs: Any) -> "ModelRepository":
        """The workspace's repository: ``FER_MODEL_REPOSITORY`` (a local folder, or an ``s3://`` location
        published from the working copy ``Workspace.triton_repository``) with its face-detection override."""
        from serving.s3_repository import S3Mirror

        location = workspace.model_repository
        mirror = S3Mirror(workspace.triton_repository, location, workspace.settings.s3_endpoint_url) \
            if is_remote(location) else None
        kwargs.setdefault("face_detection", workspace.face_detection_override)
        kwargs.setdefault("tuning_env", workspace.settings.serving_tuning)
        return cls(workspace.triton_repository, mirror=mirror, **kwargs)

    @property
    def triton_location(self) -> str:
        """What Triton is started with (``--model-repository``): the folder, or the mirror's s3:// URL."""
        return self.mirror.triton_location if self.mirror is not None else str(self.root)

    def publish(self) -> None:
        """Bring an s3:// repository up to date with the working copy (nothing for a local one)."""
        if self.mirror is not None:
            self.mirror.publish()

    def tuning(self, instance_kind: str | None = None) -> ServingTuning:
        """The performance settings configs are written with: ``tuning``, else those of ``tuning_env``
        (the platform context's), else those of the process environment."""
        return self._tuning or ServingTuning.load(instance_kind or self.instance_kind, env=self._tuning_env)

    def _queue_delay_us(self, tuning: ServingTuning, onnx_path: Path, metadata: ModelMetadata,
                        instance_kind: str) -> int:
        """The tuning's queue delay, or (``auto``) one derived from the network's measured latency.
        Only a CPU instance is timed: on a GPU this CPU's time says nothing about the GPU's."""
        if tuning.max_queue_delay_us is not None:
            return tuning.max_queue_delay_us
        if instance_kind == "KIND_GPU":
            return queue_delay_from_latency(0.0)
        specs = [(s.name, s.dtype, tuple(s.shape)) for s in metadata.inputs]
        try:
            latency = measure_latency(str(onnx_path), specs, intra_op_threads=tuning.intra_op_threads,
                                      inter_op_threads=tuning.inter_op_threads)
        except Exception:  # noqa: BLE001 -- the timing only tunes; a file ORT cannot run fails at Triton's load
            latency = None
        return queue_delay_from_latency(latency or 0.0)

    # -- paths and queries ----------------------------------------------------------------------

    @property
    def staging_dir(self) -> Path:
        """``<parent>/.<root name>.staging``: hidden, beside the repository (so on the same
        filesystem, which ``os.rename`` needs) but outside it (so Triton's index never lists it)."""
        return self.root.parent / f".{self.root.name}{STAGING_SUFFIX}"

    def _network_dir(self, network: str) -> Path:
        if not _NETWORK_NAME.match(network or ""):
            raise ValueError(f"network name {network!r} must be lower-case letters, digits and _")
        return self.root / network

    def _config_path(self, network: str) -> Path:
        return self._network_dir(network) / "config.pbtxt"

    def networks(self) -> list[str]:
        """Networks (ONNX models) present in the repository, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(p.parent.name for p in self.root.glob("*/config.pbtxt")
                      if not p.parent.name.startswith(".") and 'backend: "onnxruntime"' in p.read_text())

    def models(self) -> list[str]:
        """Every Triton model in the repository, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(p.parent.name for p in self.root.glob("*/config.pbtxt") if not p.parent.name.startswith("."))

    def load_order(self) -> list[str]:
        """The models to ask Triton to load: networks, then ensembles (which load their own
        pre/post-processing steps), then anything else."""
        models = self.models()
        ensembles = [m for m in models if m.endswith("_ensemble")]
        steps = {f"{e[: -len('_ensemble')]}{s}" for e in ensembles for s in STEP_SUFFIXES}
        networks = self.networks()
        others = [m for m in models if m not in networks and m not in ensembles and m not in steps]
        return networks + ensembles + others

    def versions(self, network: str) -> list[int]:
        """Complete versions on disk (a folder named by an integer holding ``model.onnx``), sorted."""
        folder = self._network_dir(network)
        if not folder.is_dir():
            return []
        return sorted(int(p.name) for p in folder.iterdir()
                      if p.is_dir() and p.name.isdigit() and (p / MODEL_FILE).is_file())

    def served_versions(self, network: str) -> list[int]:
        """The versions the network's ``version_policy`` serves."""
        config = self._config_path(network)
        if not config.is_file():
            raise ValueError(f"network {network!r} is not in the repository {self.root}")
        match = re.search(r"versions: \[([\d, ]*)\]", config.read_text())
        return [int(v) for v in match.group(1).split(",") if v.strip()] if match else []

    def _package_manifest(self, network: str, version: int) -> dict | None:
        path = self._network_dir(network) / str(int(version)) / MANIFEST
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise PackageError(f"{path} is not valid JSON") from None

    def metadata(self, network: str, version: int) -> ModelMetadata:
        """A version's metadata: from its package manifest, else embedded in its ONNX file."""
        path = self._network_dir(network) / str(int(version)) / MODEL_FILE
        if not path.is_file():
            raise ValueError(f"{network} has no version {version} in {self.root}")
        manifest = self._package_manifest(network, version)
        return metadata_from_dict(manifest["metadata"]) if manifest else read_onnx_metadata(path)

    def pipeline(self, network: str, version: int) -> InputPipeline:
        """A version's input-pipeline spec as packaged (derived from its metadata for a bare ONNX file)."""
        manifest = self._package_manifest(network, version)
        if manifest and "pipeline" in manifest:
            return InputPipeline.from_dict(manifest["pipeline"])
        return InputPipeline.for_model(self.metadata(network, version))

    def verify_version(self, network: str, version: int, digest: str | None = None) -> None:
        """The on-disk ``model.onnx`` matches its package manifest (and the manifest ``digest``);
        :class:`PackageError` otherwise."""
        folder = self._network_dir(network) / str(int(version))
        manifest = self._package_manifest(network, version)
        if manifest is None:
            raise PackageError(f"{folder} has no {MANIFEST}; reinstall the version from its package")
        if digest is not None:
            from serving.package import package_digest

            if package_digest(folder) != digest:
                raise PackageError(f"{folder / MANIFEST} differs from the registered package")
        expected = manifest.get("files", {}).get(MODEL_FILE)
        import hashlib

        if not (folder / MODEL_FILE).is_file() or hashlib.sha256((folder / MODEL_FILE).read_bytes()).hexdigest() != expected:
            raise PackageError(f"{folder / MODEL_FILE} was altered (sha256 differs from its package)")

    # -- deployment choices ---------------------------------------------------------------------

    @property
    def _deployment_file(self) -> Path:
        return self.root / ".deployment.json"

    def deployment(self) -> dict[str, dict[str, str]]:
        """Per-network deployment choices (``{"<network>": {"face": "haar"}}``)."""
        try:
            return json.loads(self._deployment_file.read_text())
        except (OSError, ValueError):
            return {}

    def face_handling(self, network: str, version: int) -> str:
        """The face handling served for ``version``: the network's deployment override, else the
        repository-wide one (``FER_FACE_DETECTION``), else the version's package."""
        override = self.deployment().get(network, {}).get("face") or self.face_detection
        return override or self.pipeline(network, version).face

    def set_face_handling(self, network: str, face: str | None,
                          endpoint: "TritonEndpoint | str | None" = None) -> bool:
        """Override (or with ``None`` clear) the face handling of ``network``'s ensemble for this
        deployment; rewrites its pre-processing config and, with ``endpoint``, reloads it on the
        running server. Returns whether the served pre-processing changed."""
        if face is not None and face not in FACE_DETECTION_MODES:
            raise ValueError(f"face handling must be one of {FACE_DETECTION_MODES}, got {face!r}")
        choices = self.deployment()
        entry = dict(choices.get(network, {}))
        if face is None:
            entry.pop("face", None)
        else:
            entry["face"] = face
        choices[network] = entry
        self.root.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(self._deployment_file, json.dumps(choices, indent=1, sort_keys=True) + "\n")
        champion = self.champion(network)
        if champion is None:
            return False
        changed = self.write_ensemble(network, champion)
        if endpoint is not None and changed:
            from serving.server import TritonEndpoint

            endpoint = endpoint if isinstance(endpoint, TritonEndpoint) else TritonEndpoint(endpoint)
            self.publish()  # an s3:// repository: Triton reloads from the bucket
            for name in [m for m in (f"{network}_preprocess", f"{network}_postprocess") if m in changed]:
                endpoint.load(name)
            endpoint.load(f"{network}_ensemble")
        return bool(changed)

    def champion(self, network: str) -> int | None:
        """The version the network's ensemble pins, ``None`` without an ensemble."""
        config = self._network_dir(network + "_ensemble") / "config.pbtxt"
        if not config.is_file():
            return None
        text = config.read_text()
        for match in _PINNED_VERSION.finditer(text):
            if match.group("name") == network:
                return int(match.group("version"))
        parameter = _CHAMPION_PARAMETER.search(text)  # the fused layout: no network step to pin
        return int(parameter.group("version")) if parameter else None

    # -- writes ---------------------------------------------------------------------------------

    def _stage(self, prefix: str) -> Path:
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=self.staging_dir, prefix=prefix + "-"))

    def _install_dir(self, staged: Path, target: Path) -> None:
        """Move a fully written staging folder into place with one rename."""
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(staged, ignore_errors=True)
            raise ValueError(f"{target} already exists; versions are immutable (remove it first)")
        os.rename(staged, target)

    def write_model(
        self,
        network: str,
        version: int,
        onnx_path: str | Path,
        metadata: ModelMetadata | None = None,
        *,
        max_batch_size: int = 32,
        instances: int | None = None,
        instance_kind: str | None = None,
        keep_versions: Sequence[int] = (),
        max_queue_delay_us: int | None = None,
        intra_op_threads: int | None = None,
    ) -> Path:
        """Install ``onnx_path`` as ``<network>/<version>/model.onnx`` and rewrite the network's config.

        The config serves ``version`` plus ``keep_versions`` (e.g. the current champion during a
        promotion). ``metadata`` defaults to the one embedded by :func:`serving.export.export_onnx`.
        ``instances``, ``max_queue_delay_us`` and ``intra_op_threads`` default to :meth:`tuning`
        (the queue delay derived from the installed version's measured latency, see
        :mod:`serving.tuning`). Returns the version folder.
        """
        version = int(version)
        if version < 1:
            raise ValueError(f"version must be >= 1 (Triton versions are positive), got {version}")
        kind = instance_kind or self.instance_kind
        tuning = self.tuning(kind)  # a malformed setting stops here, before anything is installed
        onnx_path = Path(onnx_path)
        package = None
        if onnx_path.is_dir():  # a model package: verified, installed with its manifest
            package = ModelPackage.open(onnx_path)
            metadata, onnx_path = metadata or package.metadata, package.onnx_path
        if not onnx_path.is_file():
            raise ValueError(f"ONNX file {onnx_path} does not exist")
        metadata = metadata or read_onnx_metadata(onnx_path)
        folder = self._network_dir(network)
        if metadata.name != network:
            # The config's tensor names come from metadata; a mismatched name is almost surely a mix-up.
            raise ValueError(f"metadata is for {metadata.name!r}, not {network!r}")
        missing = [v for v in keep_versions if int(v) not in self.versions(network)]
        if missing:
            raise ValueError(f"cannot keep serving versions {missing} of {network}: not in the repository")
        target = folder / str(version)
        if target.exists() and not (target / MODEL_FILE).is_file():
            shutil.rmtree(target)  # an incomplete version left by a crash of a non-atomic writer
        staged = self._stage(f"{network}-{version}")
        shutil.copyfile(onnx_path, staged / MODEL_FILE)
        _fsync_file(staged / MODEL_FILE)
        if package is not None:
            shutil.copyfile(package.root / MANIFEST, staged / MANIFEST)
            _fsync_file(staged / MANIFEST)
        self._install_dir(staged, target)
        specs = {s.name: s for s in metadata.outputs}
        for output, filename in label_files(metadata).items():
            _atomic_write_text(folder / filename, "\n".join(specs[output].labels) + "\n")
        if max_queue_delay_us is None:
            max_queue_delay_us = self._queue_delay_us(tuning, target / MODEL_FILE, metadata, kind)
        config = network_config(
            metadata, [version, *keep_versions], max_batch_size=max_batch_size,
            instances=tuning.instances if instances is None else instances,
            instance_kind=kind, max_queue_delay_us=max_queue_delay_us,
            intra_op_threads=tuning.intra_op_threads if intra_op_threads is None else intra_op_threads,
            inter_op_threads=tuning.inter_op_threads, allow_spinning=tuning.allow_spinning,
            preferred_batch_sizes=tuning.preferred_for(max_batch_size),
        )
        _atomic_write_text(folder / "config.pbtxt", config)
        return target

    def set_served_versions(self, network: str, versions: Sequence[int]) -> None:
        """Rewrite the network's ``version_policy`` to serve exactly ``versions`` (all must exist)."""
        versions = _check_versions(versions)
        missing = [v for v in versions if v not in self.versions(network)]
        if missing:
            raise ValueError(f"{network} has no versions {missing} on disk (has {self.versions(network)})")
        config = self._config_path(network)
        text = _VERSION_POLICY.sub(f"version_policy: {{ specific: {{ versions: {_dims(versions)} }} }}",
                                   config.read_text(), count=1)
        _atomic_write_text(config, text)

    def remove_version(self, network: str, version: int) -> None:
        """Delete a version that is no longer served (it disappears atomically, then is deleted)."""
        version = int(version)
        if version in self.served_versions(network):
            raise ValueError(f"{network} version {version} is served; set_served_versions without it first")
        if self.champion(network) == version:
            raise ValueError(f"{network} version {version} is the ensemble's champion")
        target = self._network_dir(network) / str(version)
        if not target.is_dir():
            raise ValueError(f"{network} has no version {version}")
        trash = self._stage(f"removed-{network}-{version}")
        os.rename(target, trash / "version")
        shutil.rmtree(trash, ignore_errors=True)

    def _write_python_model(self, name: str, class_name: str, config: str, onnx_path: Path | None = None) -> bool:
        """Write a Python-backend model (``model.py`` in ``1/``; with ``onnx_path``, a copy of it as
        ``1/model.onnx`` beside: the fused layout's own copy of the champion, since Triton loads each
        model folder on its own, from a bucket too). Returns whether anything changed."""
        folder = self.root / name
        version_dir = folder / "1"
        source = _python_model_source(class_name)
        current = version_dir / PYTHON_MODEL_FILE
        same_onnx = onnx_path is None or ((version_dir / MODEL_FILE).is_file()
                                          and filecmp.cmp(version_dir / MODEL_FILE, onnx_path, shallow=False))
        changed = False
        if not (current.is_file() and current.read_text() == source and same_onnx):
            staged = self._stage(name)
            (staged / PYTHON_MODEL_FILE).write_text(source)
            if onnx_path is not None:
                shutil.copyfile(onnx_path, staged / MODEL_FILE)
                _fsync_file(staged / MODEL_FILE)
            if version_dir.exists():
                old = self._stage(f"replaced-{name}")
                os.rename(version_dir, old / "1")
                shutil.rmtree(old, ignore_errors=True)
            self._install_dir(staged, version_dir)
            changed = True
        return self._write_if_changed(folder / "config.pbtxt", config) or changed

    def ensemble_layout(self) -> str:
        """The layout :meth:`write_ensemble` writes (``FER_TRITON_ENSEMBLE``; default by the networks'
        instance kind, see :mod:`serving.tuning`)."""
        return self.tuning().ensemble_layout

    def step_models(self, stem: str) -> list[str]:
        """The Python steps of ``<stem>_ensemble`` as written now (its config's layout; without a
        config, the layout :meth:`write_ensemble` would write)."""
        config = self.root / f"{stem}_ensemble" / "config.pbtxt"
        text = config.read_text() if config.is_file() else ""
        layout = "fused" if f'model_name: "{stem}_pipeline"' in text else \
            "steps" if text else self.ensemble_layout()
        return step_models(stem, layout)

    @staticmethod
    def _write_if_changed(path: Path, text: str) -> bool:
        if path.is_file() and path.read_text() == text:
            return False
        _atomic_write_text(path, text)
        return True

    def write_ensemble(
        self,
        network: str,
        champion_version: int,
        *,
        max_batch_size: int = 32,
        preprocess_instances: int | None = None,
        postprocess_instances: int | None = None,
        max_image_bytes: int = processing.MAX_IMAGE_BYTES,
        max_image_pixels: int = processing.MAX_IMAGE_PIXELS,
        stem: str | None = None,
        face: str | None = None,
    ) -> list[str]:
        """Write ``<network>_ensemble`` and its steps, pinned to ``champion_version``.

        Layout (:meth:`ensemble_layout`) ``steps``: ``<network>_preprocess`` and ``_postprocess``
        around the network; ``fused``: ``<network>_pipeline`` with its own copy of the champion's ONNX.
        Pre/post-processing is generated from the champion's package (metadata and input-pipeline
        spec, face handling per :meth:`face_handling`). Writes the ensemble last, so it never
        references a step that does not exist yet, then removes the other layout's steps. Returns
        the models whose files changed. ``stem`` names the models ``<stem>_preprocess`` … instead
        of ``<network>_…`` (the promotion's candidate ensemble, :meth:`candidate_stem`); ``face``
        forces the face handling.
        """
        stem = stem or network
        layout = self.ensemble_layout()
        tuning = self.tuning("KIND_CPU")  # pre/post-processing (and the fused pipeline) always run on CPU
        preprocess_instances = tuning.preprocess_instances if preprocess_instances is None else preprocess_instances
        postprocess_instances = tuning.postprocess_instances if postprocess_instances is None else postprocess_instances
        champion_version = int(champion_version)
        if champion_version not in self.versions(network):
            raise ValueError(f"{network} has no version {champion_version} on disk (has {self.versions(network)})")
        metadata = self.metadata(network, champion_version)
        pipeline = self.pipeline(network, champion_version)
        face = face or self.face_handling(network, champion_version)
        changed = []
        if layout == "fused":
            config = pipeline_config(
                metadata, champion_version, max_batch_size=max_batch_size, instances=preprocess_instances,
                intra_op_threads=tuning.intra_op_threads, inter_op_threads=tuning.inter_op_threads,
                allow_spinning=tuning.allow_spinning, max_image_bytes=max_image_bytes,
                max_image_pixels=max_image_pixels, face_detection=face, pipeline=pipeline, stem=stem)
            onnx_path = self._network_dir(network) / str(champion_version) / MODEL_FILE
            if self._write_python_model(f"{stem}_pipeline", "PipelineModel", config, onnx_path):
                changed.append(f"{stem}_pipeline")
        elif self._write_python_model(
                f"{stem}_preprocess", "PreprocessModel",
                preprocess_config(metadata, max_batch_size=max_batch_size, instances=preprocess_instances,
                                  max_image_bytes=max_image_bytes, max_image_pixels=max_image_pixels,
                                  face_detection=face, pipeline=pipeline, stem=stem)):
            changed.append(f"{stem}_preprocess")
        if layout == "steps" and self._write_python_model(
                f"{stem}_postprocess", "PostprocessModel",
                postprocess_config(metadata, max_batch_size=max_batch_size, instances=postprocess_instances,
                                   stem=stem)):
            changed.append(f"{stem}_postprocess")
        ensemble_dir = self.root / f"{stem}_ensemble"
        (ensemble_dir / "1").mkdir(parents=True, exist_ok=True)  # Triton wants a version folder, even empty
        if self._write_if_changed(ensemble_dir / "config.pbtxt",
                                  ensemble_config(metadata, champion_version, max_batch_size=max_batch_size,
                                                  stem=stem, layout=layout, max_image_bytes=max_image_bytes)):
            changed.append(f"{stem}_ensemble")
        # The other layout's steps (a changed FER_TRITON_ENSEMBLE): unreferenced now, so removed.
        self.remove_models([m for s in ENSEMBLE_LAYOUTS if s != layout for m in step_models(stem, s)])
        return changed

    def candidate_stem(self, network: str) -> str:
        """Stem of the promotion's temporary ensemble of a candidate version."""
        return f"{network}{CANDIDATE_SUFFIX}"

    def remove_models(self, names: Sequence[str]) -> None:
        """Delete whole Triton model folders (the candidate ensemble after its smoke test)."""
        for name in names:
            folder = self.root / name
            if folder.is_dir():
                trash = self._stage(f"removed-{name}")
                os.rename(folder, trash / "model")
                shutil.rmtree(trash, ignore_errors=True)

    def set_champion(self, network: str, version: int, endpoint: "TritonEndpoint | str | None" = None) -> None:
        """Pin the ensemble of ``network`` to ``version`` (atomic config rewrite) and reload it.

        Promotion: ``write_model(net, new, ..., keep_versions=[old])`` → ``endpoint.load(net)`` →
        ``set_champion(net, new, endpoint)`` → ``set_served_versions(net, [new])`` → ``endpoint.load(net)``.
        Requests keep being answered throughout, because Triton swaps a reloaded model only once the
        new one is ready. With ``endpoint`` (a :class:`TritonEndpoint` or URL) the served network and
        then the ensemble are reloaded; without, only the files change.
        """
        version = int(version)
        if version not in self.served_versions(network):
            raise ValueError(f"{network} version {version} is not served (served: {self.served_versions(network)}); "
                             "add it with set_served_versions first")
        # Every step is regenerated from the new champion's package; only what changed is rewritten
        # and reloaded (reloading a Python model restarts its stub, seconds).
        changed = self.write_ensemble(network, version)
        if endpoint is not None:
            from serving.server import TritonEndpoint, control_key

            endpoint = endpoint if isinstance(endpoint, TritonEndpoint) else \
                TritonEndpoint(endpoint, key=control_key(self.root.parent))  # model control is keyed
            self.publish()  # an s3:// repository: Triton reloads from the bucket
            if not endpoint.model_ready(network, version):
                endpoint.load(network)
            steps = [m for m in self.step_models(network) if m in changed]
            for name in steps + [f"{network}_ensemble"]:
                endpoint.load(name)
            for name in {m for s in ENSEMBLE_LAYOUTS for m in step_models(network, s)} - set(self.step_models(network)):
                if endpoint.model_ready(name):  # the other layout's steps, no longer referenced
                    endpoint.unload(name)

    def install(
        self,
        network: str,
        version: int,
        onnx_path: str | Path,
        *,
        champion: bool = True,
        keep_versions: Sequence[int] = (),
        **model_kwargs: object,
    ) -> Path:
        """One-call install: :meth:`write_model`, then (``champion``) the ensemble pinned to it."""
        path = self.write_model(network, version, onnx_path, keep_versions=keep_versions, **model_kwargs)  # type: ignore[arg-type]
        if champion:
            self.write_ensemble(network, version)
        return path

    # -- crash recovery -------------------------------------------------------------------------

    def repair(self) -> list[Path]:
        """Delete what an interrupted write can leave: staging entries, temporary config files and
        version folders without their model file. Returns what was removed."""
        removed: list[Path] = []
        if not self.root.is_dir():
            return removed
        if self.staging_dir.is_dir():
            for entry in self.staging_dir.iterdir():
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
                removed.append(entry)
        for model_dir in (p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            config = model_dir / "config.pbtxt"
            text = config.read_text() if config.is_file() else ""
            # Only models this class writes are checked; anything else in the folder is left alone.
            expected = {'backend: "onnxruntime"': MODEL_FILE, 'backend: "python"': PYTHON_MODEL_FILE}
            model_file = next((f for marker, f in expected.items() if marker in text), None)
            for entry in model_dir.iterdir():
                if entry.is_file() and entry.name.startswith(".") and entry.name.endswith(".tmp"):
                    entry.unlink()
                    removed.append(entry)
                elif entry.is_dir() and entry.name.isdigit() and model_file:
                    if not (entry / model_file).is_file():
                        shutil.rmtree(entry)
                        removed.append(entry)
        return removed

    def describe(self) -> dict[str, dict[str, object]]:
        """Per network: versions on disk, served versions and the ensemble's champion."""
        return {n: {"versions": self.versions(n), "served": self.served_versions(n), "champion": self.champion(n)}
                for n in self.networks()}

    def __repr__(self) -> str:
        return f"ModelRepository({str(self.root)!r}, networks={json.dumps(self.networks())})"
