"""In-process inference of an exported ONNX model with exactly the serving ensemble's pre- and
post-processing (:mod:`serving.ensembles.processing`), so answers equal Triton's.

``LocalPredictor(onnx_path)`` reads the model's metadata from the ONNX file and predicts from the
same encoded bytes a :class:`serving.client.FERClient` would send. It is the small loader that
``fer evaluate`` uses by default; it only needs the ONNX file, so it can point at a model package's
ONNX artifact as well as the registry run's ``onnx/model.onnx``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from fer_core.data.preprocess import HaarFaceDetector
from serving.client import Prediction
from serving.ensembles import processing
from serving.export import _onnx_session, read_onnx_metadata


class LocalPredictor:
    """ONNX Runtime on this machine, pre/post-processing as in the ensemble."""

    def __init__(self, onnx_path: str | Path, face_detection: str = "off", batch_size: int = 32) -> None:
        if face_detection not in ("off", "haar"):
            raise ValueError(f"face_detection must be 'off' or 'haar', got {face_detection!r}")
        self.metadata = read_onnx_metadata(onnx_path)
        self.session = _onnx_session(onnx_path)
        self.detector = HaarFaceDetector() if face_detection == "haar" else None
        self.batch_size = batch_size
        self.labels = processing_labels(self.metadata)

    def predict(self, samples: Sequence[Sequence[bytes]], network: str | None = None) -> list[Prediction]:
        """One prediction per sample; a sample is the encoded image (or a clip's frames) as a list."""
        network = network or self.metadata.name
        step = 1 if processing.is_video_network(self.metadata) else self.batch_size
        out: list[Prediction] = []
        for start in range(0, len(samples), step):
            prepared = []
            for i, sample in enumerate(samples[start:start + step], start):
                try:
                    prepared.append(processing.prepare(list(sample), self.metadata, self.detector))
                except ValueError as exc:
                    raise ValueError(f"{network}: sample {i}: {exc}") from None
            batch = np.stack([p.tensor for p in prepared]).astype(np.float32)
            names = processing.postprocess_inputs(self.metadata)
            raw = dict(zip(names, self.session.run(names, {self.metadata.input.name: batch})))
            result = processing.postprocess(raw, self.metadata, np.stack([p.to_input for p in prepared]))
            for j, p in enumerate(prepared):
                va = result.get("VALENCE_AROUSAL")
                lm = result.get("LANDMARKS")
                active = result.get("ACTIVE")
                out.append(Prediction(
                    network=network,
                    label=result["LABEL"][j, 0].decode(),
                    probabilities={n: float(v) for n, v in zip(self.labels, result["PROBABILITIES"][j])},
                    face_found=bool(p.face_found),
                    active=tuple(n for n, on in zip(self.labels, active[j]) if on) if active is not None else None,
                    valence=float(va[j, 0]) if va is not None else None,
                    arousal=float(va[j, 1]) if va is not None else None,
                    landmarks=tuple((float(x), float(y)) for x, y in lm[j]) if lm is not None else None,
                ))
        return out


def processing_labels(metadata) -> tuple[str, ...]:
    """The primary output's class names (what PROBABILITIES is indexed by)."""
    spec = {s.name: s for s in metadata.outputs}[metadata.primary_output or metadata.outputs[0].name]
    return tuple(spec.labels or metadata.label_names)
