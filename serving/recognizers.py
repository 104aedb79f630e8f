"""Recognizers for :mod:`fer_core.video`: face crops in, :class:`~serving.client.Prediction` out.

* :class:`TritonRecognizer` asks the champion's ensemble through :class:`~serving.client.FERClient`
  (``fer app --url`` / ``fer annotate --url``; over gRPC with ``streaming=True``: several clip
  windows of one call go out on one gRPC stream);
* :class:`OnnxRecognizer` runs an exported ONNX file in-process with ONNX Runtime, through the very
  pre- and post-processing functions the ensemble's Python steps call
  (:mod:`serving.ensembles.processing`), so a local answer equals Triton's.

Both read the model's :class:`~fer_core.models.catalog.ModelMetadata` (Triton: the ensemble's
``fer_metadata`` parameter; ONNX: the file's ``fer_metadata`` property) and expose the table layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fer_core.data.preprocess import HaarFaceDetector
from fer_core.models.catalog import ModelMetadata
from fer_core.video.output import TableLayout
from serving.ensembles import processing
from serving.export import METADATA_KEY, metadata_from_json

__all__ = ["TritonRecognizer", "OnnxRecognizer", "table_layout", "default_clip_window"]

# Frames per window for micro networks (onset + apex): the apex is estimated inside the window.
MICRO_WINDOW = 16


def default_clip_window(metadata: ModelMetadata) -> int | None:
    """Frames per sliding window of a clip network; ``None`` for image networks."""
    if not processing.is_video_network(metadata):
        return None
    frames = int(metadata.input.shape[0])
    return MICRO_WINDOW if metadata.task == "micro" and frames == 2 else max(frames, 2)


def table_layout(metadata: ModelMetadata) -> TableLayout:
    spec = {s.name: s for s in metadata.outputs}
    primary = spec[metadata.primary_output or metadata.outputs[0].name]
    landmarks = spec.get("landmarks")
    return TableLayout(labels=tuple(primary.labels or metadata.label_names),
                       multi_label=bool(metadata.extra.get("multi_label")),
                       valence_arousal="valence_arousal" in spec,
                       num_landmarks=int(landmarks.shape[0]) if landmarks is not None else 0,
                       clip=processing.is_video_network(metadata))


class TritonRecognizer:
    """The served ensemble of ``network`` at ``url`` (gRPC unless the URL says http://)."""

    def __init__(self, url: str, network: str, batch_size: int = 16, timeout_s: float = 30.0) -> None:
        from serving.client import FERClient

        protocol = "http" if url.startswith("http://") else "grpc"
        # Over gRPC a clip network's windows (one request per tracked face) go out on one stream.
        self.client = FERClient(url, protocol=protocol, batch_size=batch_size, timeout_s=timeout_s,
                                streaming=protocol == "grpc")
        self.network = network
        self.metadata = self.client._network(network)[0]  # ServingError: unreachable / unknown network
        self.clip_window = default_clip_window(self.metadata)
        self.where = f"Triton {self.client.url}"

    def layout(self) -> TableLayout:
        return table_layout(self.metadata)

    def predict(self, samples: Sequence[Any]) -> list:
        return self.client.predict(list(samples), network=self.network)

    def close(self) -> None:
        self.client.close()


class _Outputs:
    """``as_numpy`` over a dict, the interface :func:`serving.client._predictions` reads."""

    def __init__(self, outputs: dict[str, np.ndarray]) -> None:
        self._outputs = outputs

    def as_numpy(self, name: str) -> np.ndarray | None:
        return self._outputs.get(name)


class OnnxRecognizer:
    """An exported network run locally: ONNX Runtime on CPU, the ensemble's pre/post-processing.

    ``face_detection`` mirrors the serving setting: ``"off"`` (default) uses each crop whole, like
    the training data; ``"haar"`` detects and aligns inside the crop first.
    """

    def __init__(self, onnx_path: str | Path, face_detection: str = "off", threads: int = 1,
                 max_batch: int = 64) -> None:
        import onnxruntime as ort

        path = Path(onnx_path)
        if not path.is_file():
            raise ValueError(f"model file {path} does not exist")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 -- onnxruntime raises its own exception types
            raise ValueError(f"{path} is not a loadable ONNX model: {str(exc).splitlines()[0]}") from None
        props = self.session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in props:
            raise ValueError(f"{path} carries no {METADATA_KEY!r} metadata (export it with `fer export`/export_onnx)")
        self.metadata = metadata_from_json(props[METADATA_KEY])
        self.network = self.metadata.name
        self.clip_window = default_clip_window(self.metadata)
        self.detector = HaarFaceDetector() if face_detection == "haar" else None
        self.max_batch = max_batch
        self.where = f"ONNX Runtime ({path.name})"
        self._needed = processing.postprocess_inputs(self.metadata)

    def layout(self) -> TableLayout:
        return table_layout(self.metadata)

    def predict(self, samples: Sequence[Any]) -> list:
        from serving.client import _predictions

        video = processing.is_video_network(self.metadata)
        results = []
        for start in range(0, len(samples), self.max_batch):
            chunk = samples[start: start + self.max_batch]
            prepared = [processing.prepare_clip(list(s), self.metadata, self.detector) if video
                        else processing.prepare_image(s, self.metadata, self.detector) for s in chunk]
            batch = np.stack([p.tensor for p in prepared]).astype(np.float32)
            raw = dict(zip(self._needed, self.session.run(self._needed, {self.metadata.input.name: batch})))
            out = processing.postprocess(raw, self.metadata, np.stack([p.to_input for p in prepared]))
            out["FACE_FOUND"] = np.array([[p.face_found] for p in prepared], dtype=bool)
            results += _predictions(self.network, self.metadata, _Outputs(out))
        return results

    def close(self) -> None:
        pass
