"""The model package: one versioned folder that export writes once and everything else reads.

Layout (``package/`` of the training run in MLflow, and beside ``model.onnx`` in each Triton
version folder)::

    package.json            format version, network, ModelMetadata, input-pipeline spec, code and
                            recipe fingerprints, data version, and the sha256 of every other file
    model.onnx              the network (exported by serving.export.export_onnx)
    smoke/NNN_FF.png        raw encoded held-out samples (one image, or a clip's frames)
    smoke/expected.npz      what the full pipeline answers on them: PROBABILITIES, label index and
                            every raw model output (``output:<name>``)

Reading needs neither torch nor MLflow (the Triton stubs and the pyfunc read it). A package whose
files are missing, altered (hash mismatch) or of another format version is refused with a one-line
:class:`PackageError`. :func:`package_digest` (sha256 of ``package.json``) is logged as the
training run's *parameter* ``package_sha256`` at registration: MLflow params cannot be changed
afterwards (tags can), so promotion and rollback check a downloaded package against it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from fer_core.data.pipeline import InputPipeline
from fer_core.metadata import ModelMetadata, metadata_from_dict, metadata_to_dict

__all__ = ["FORMAT_VERSION", "MANIFEST", "PackageError", "ModelPackage", "package_digest", "write_package",
           "PackageRunner", "encode_png", "read_onnx_metadata", "METADATA_KEY"]

FORMAT_VERSION = 1
MANIFEST = "package.json"
MODEL_FILE = "model.onnx"
EXPECTED_FILE = "smoke/expected.npz"
METADATA_KEY = "fer_metadata"


class PackageError(ValueError):
    """A model package is missing, altered or incompatible (the message is one line)."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def package_digest(root: str | Path) -> str:
    """sha256 of the package's ``package.json`` (which holds the hashes of all other files)."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise PackageError(f"{root} is not a model package (no {MANIFEST})")
    return _sha256(path)


def read_onnx_metadata(onnx_path: str | Path) -> ModelMetadata:
    """The metadata :func:`serving.export.export_onnx` stored in an ONNX file (one-line error if unreadable)."""
    import onnx
    from google.protobuf.message import DecodeError

    from fer_core.metadata import metadata_from_json

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except (DecodeError, OSError, ValueError) as exc:
        raise PackageError(f"{onnx_path} is not a readable ONNX file ({type(exc).__name__})") from None
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            return metadata_from_json(prop.value)
    raise PackageError(f"{onnx_path} carries no {METADATA_KEY!r} metadata; export it with serving.export.export_onnx")


def encode_png(image: np.ndarray) -> bytes:
    """Lossless PNG bytes of a uint8 grey or RGB image (decodes back to the same pixels)."""
    import cv2

    image = np.ascontiguousarray(image)
    if image.ndim == 3 and image.shape[2] == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, data = cv2.imencode(".png", image)
    if not ok:
        raise ValueError(f"cannot encode an image of shape {image.shape} as PNG")
    return data.tobytes()


@dataclass(frozen=True)
class ModelPackage:
    """An opened (and verified) model package; see the module docstring."""

    root: Path
    metadata: ModelMetadata
    pipeline: InputPipeline
    files: Mapping[str, str]
    smoke: tuple[tuple[str, ...], ...]
    info: Mapping[str, Any] = field(default_factory=dict)

    @property
    def network(self) -> str:
        return self.metadata.name

    @property
    def onnx_path(self) -> Path:
        return self.root / MODEL_FILE

    @property
    def code_fingerprint(self) -> str:
        return str(self.info.get("code_fingerprint", ""))

    @property
    def digest(self) -> str:
        return package_digest(self.root)

    @classmethod
    def open(cls, root: str | Path, *, verify: bool = True, expected_digest: str | None = None) -> "ModelPackage":
        """Read ``root``; with ``verify`` every listed file must exist with its recorded sha256, and
        with ``expected_digest`` the ``package.json`` itself must match it."""
        root = Path(root)
        manifest = root / MANIFEST
        if not manifest.is_file():
            raise PackageError(f"{root} is not a model package (no {MANIFEST})")
        if expected_digest is not None and package_digest(root) != expected_digest:
            raise PackageError(f"{manifest} was altered: sha256 {package_digest(root)[:12]} != registered "
                               f"{expected_digest[:12]}")
        try:
            raw = json.loads(manifest.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PackageError(f"{manifest} is not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc})") from None
        if not isinstance(raw, dict) or raw.get("format_version") != FORMAT_VERSION:
            found = raw.get("format_version") if isinstance(raw, dict) else None
            raise PackageError(f"{manifest}: package format version {found!r}, this platform reads {FORMAT_VERSION}")
        try:
            package = cls(root=root, metadata=metadata_from_dict(raw["metadata"]),
                          pipeline=InputPipeline.from_dict(raw["pipeline"]), files=dict(raw["files"]),
                          smoke=tuple(tuple(s) for s in raw.get("smoke", [])), info=dict(raw.get("info", {})))
        except (KeyError, TypeError, ValueError) as exc:
            raise PackageError(f"{manifest}: malformed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
        if verify:
            package.verify()
        return package

    def verify(self) -> None:
        """Every listed file exists with its recorded hash; ``PackageError`` names the first that does not."""
        if MODEL_FILE not in self.files:
            raise PackageError(f"{self.root / MANIFEST} lists no {MODEL_FILE}")
        for rel, expected in sorted(self.files.items()):
            path = self.root / rel
            if not path.is_file():
                raise PackageError(f"package {self.root}: {rel} is missing")
            if _sha256(path) != expected:
                raise PackageError(f"package {self.root}: {rel} was altered (sha256 mismatch)")

    def smoke_samples(self) -> list[list[bytes]]:
        """The raw encoded smoke samples (each a list: one image, or a clip's frames)."""
        return [[(self.root / rel).read_bytes() for rel in sample] for sample in self.smoke]

    def expected(self) -> dict[str, np.ndarray]:
        """What the package's own pipeline answered on the smoke samples at export."""
        with np.load(self.root / EXPECTED_FILE) as data:
            return {k: data[k] for k in data.files}

    def copy_to(self, folder: str | Path) -> None:
        """Copy the package's files (manifest last) into ``folder``."""
        folder = Path(folder)
        for rel in [*self.files, MANIFEST]:
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.root / rel, folder / rel)


class PackageRunner:
    """In-process inference of a package on raw inputs: decode → pipeline → ONNX Runtime → post-processing.

    This is the pipeline the pyfunc serves and the metric gate scores; Triton's ensemble runs the
    same functions in its stubs. ``pipeline`` overrides the package's (e.g. another face handling).
    """

    def __init__(self, package: ModelPackage, pipeline: InputPipeline | None = None, threads: int = 1) -> None:
        import onnxruntime as ort

        from fer_core.data.pipeline import make_detector

        self.package = package
        self.metadata = package.metadata
        self.pipeline = pipeline or package.pipeline
        self.detector = make_detector(self.pipeline)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(package.onnx_path), options, providers=["CPUExecutionProvider"])

    def prepare(self, sample: Sequence[bytes] | Sequence[np.ndarray]):
        """One sample (encoded bytes or decoded uint8 arrays) → :class:`~serving.ensembles.processing.PreparedInput`."""
        from serving.ensembles import processing

        if all(isinstance(s, np.ndarray) for s in sample):
            decoded = [processing.check_decoded(s) for s in sample]
            if processing.is_video_network(self.metadata):
                return processing.prepare_clip(decoded, self.metadata, self.detector, self.pipeline)
            if len(decoded) != 1:
                raise ValueError(f"{self.metadata.name} takes one image per sample, got {len(decoded)}")
            return processing.prepare_image(decoded[0], self.metadata, self.detector, self.pipeline)
        return processing.prepare(list(sample), self.metadata, self.detector, pipeline=self.pipeline)

    def run_inputs(self, inputs: np.ndarray) -> dict[str, np.ndarray]:
        """Raw model outputs of a batch of model inputs."""
        names = list(self.metadata.output_names)
        return dict(zip(names, self.session.run(names, {self.metadata.input.name: inputs.astype(np.float32)})))

    def predict(self, samples: Sequence[Sequence[bytes] | Sequence[np.ndarray]], batch_size: int = 16) -> dict[str, np.ndarray]:
        """Post-processed answers (``LABEL``, ``PROBABILITIES``, extras), ``FACE_FOUND`` and every raw
        output (``output:<name>``) of ``samples``, batched."""
        from serving.ensembles import processing

        parts: list[dict[str, np.ndarray]] = []
        for start in range(0, len(samples), batch_size):
            prepared = [self.prepare(s) for s in samples[start : start + batch_size]]
            raw = self.run_inputs(np.stack([p.tensor for p in prepared]))
            to_input = np.stack([p.to_input for p in prepared])
            out = processing.postprocess(raw, self.metadata, to_input)
            out["FACE_FOUND"] = np.array([[p.face_found] for p in prepared], dtype=bool)
            out.update({f"output:{k}": v for k, v in raw.items()})
            parts.append(out)
        if not parts:
            raise ValueError("no samples to predict")
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def write_package(folder: str | Path, onnx_path: str | Path, metadata: ModelMetadata, pipeline: InputPipeline,
                  smoke: Sequence[Sequence[np.ndarray]], info: Mapping[str, Any]) -> ModelPackage:
    """Write a package into the empty ``folder`` from an exported ONNX file and raw held-out samples
    (decoded uint8 images; stored as lossless PNG). The expected answers are computed here by
    :class:`PackageRunner` on the stored bytes, so they are exactly what serving must reproduce."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if any(folder.iterdir()):
        raise PackageError(f"{folder} is not empty")
    shutil.copyfile(onnx_path, folder / MODEL_FILE)
    names: list[list[str]] = []
    (folder / "smoke").mkdir()
    for i, sample in enumerate(smoke):
        names.append([])
        for j, image in enumerate(sample):
            rel = f"smoke/{i:03d}_{j:02d}.png"
            (folder / rel).write_bytes(encode_png(image))
            names[-1].append(rel)

    def manifest(files: Mapping[str, str]) -> None:
        raw = {"format_version": FORMAT_VERSION, "network": metadata.name, "metadata": metadata_to_dict(metadata),
               "pipeline": pipeline.to_dict(), "files": dict(sorted(files.items())), "smoke": names,
               "info": dict(info)}
        (folder / MANIFEST).write_text(json.dumps(raw, indent=1, sort_keys=True) + "\n")

    files = {rel: _sha256(folder / rel) for rel in [MODEL_FILE, *(r for s in names for r in s)]}
    manifest(files)
    if names:
        draft = ModelPackage.open(folder)
        answers = PackageRunner(draft).predict(draft.smoke_samples())
        labels = answers["PROBABILITIES"].argmax(1)
        np.savez_compressed(folder / EXPECTED_FILE, label_index=labels, PROBABILITIES=answers["PROBABILITIES"],
                            **{k: v for k, v in answers.items() if k.startswith("output:")})
        files[EXPECTED_FILE] = _sha256(folder / EXPECTED_FILE)
        manifest(files)
    return ModelPackage.open(folder)
