"""Triton Python-backend models of the ensembles: ``<network>_preprocess`` and ``<network>_postprocess``
(layout ``steps``), or ``<network>_pipeline`` (layout ``fused``: both, and ONNX Runtime between them).

Imported only inside Triton's Python-backend stub (and importing no torch: only numpy, OpenCV and
the torch-free parts of ``fer_core``) (``triton_python_backend_utils`` exists there
alone). The repository writes a two-line ``model.py`` per model that puts the project root on
``sys.path`` and re-exports one of these classes as ``TritonPythonModel``; the stub additionally
needs the platform's dependencies (numpy, OpenCV) on ``PYTHONPATH`` (:mod:`serving.server` sets it).

A bad image fails only the request it came in: Triton hands the error back to that client while
the other requests of the batch succeed. Pre-processing decodes every sample on its own (decoding is
per image anyway) and stacks each request's tensors once; post-processing runs the whole dynamic
batch in one call and splits it back (per request only if that fails). Either way a step costs one
stub round trip per *batch*, not per request. The fused pipeline does all three in one execute, so
an ensemble request crosses one stub instead of three (see :mod:`serving.tuning` for why that is the
CPU default).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils  # provided by the stub

from fer_core.data.pipeline import InputPipeline, make_detector
from fer_core.metadata import metadata_from_json
from serving.ensembles import processing

_METADATA_PARAMETER = "fer_metadata"


def _parameter(config: dict[str, Any], key: str, default: str = "") -> str:
    return config.get("parameters", {}).get(key, {}).get("string_value", default)


class _Base:
    def initialize(self, args: dict[str, str]) -> None:
        self.config = json.loads(args["model_config"])
        self.metadata = metadata_from_json(_parameter(self.config, _METADATA_PARAMETER))
        self.network = self.metadata.name
        self.max_bytes = int(_parameter(self.config, "max_image_bytes", str(processing.MAX_IMAGE_BYTES)))
        self.max_pixels = int(_parameter(self.config, "max_image_pixels", str(processing.MAX_IMAGE_PIXELS)))

    def finalize(self) -> None:
        pass


class PreprocessModel(_Base):
    """Encoded image bytes (``IMAGE`` [1], or a clip's frames ``FRAMES`` [-1]) → model input,
    ``FACE_FOUND`` [1] and ``TO_INPUT`` [2, 3]."""

    def initialize(self, args: dict[str, str]) -> None:
        super().initialize(args)
        self._init_preprocessing()

    def _init_preprocessing(self) -> None:
        # The served version's input-pipeline spec (from its package; face handling as deployed).
        raw = _parameter(self.config, "fer_pipeline")
        face = _parameter(self.config, "face_detection", "off")
        self.pipeline = (InputPipeline.from_dict(json.loads(raw)) if raw
                         else InputPipeline.for_model(self.metadata)).with_face(face)
        self.detector = make_detector(self.pipeline)
        self.input_name = self.config["input"][0]["name"]
        self.tensor_name = self.metadata.input.name

    def _prepare(self, request) -> list[processing.PreparedInput]:
        """Decode and prepare every sample of one request (a ``ValueError`` names the bad one)."""
        encoded = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy()
        if encoded.dtype != np.object_:
            raise ValueError(f"{self.input_name} must hold encoded image bytes (BYTES), got {encoded.dtype}")
        prepared = []
        for i, sample in enumerate(encoded.reshape(len(encoded), -1)):
            try:
                prepared.append(processing.prepare(list(sample), self.metadata, self.detector,
                                                   self.max_bytes, self.max_pixels, self.pipeline))
            except ValueError as exc:
                raise ValueError(f"{self.network}: sample {i}: {exc}") from None
        return prepared

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            try:
                prepared = self._prepare(request)
                outputs = [  # one copy each: stacked straight into float32
                    pb_utils.Tensor(self.tensor_name, np.stack([p.tensor for p in prepared]).astype(np.float32, copy=False)),
                    pb_utils.Tensor("FACE_FOUND", np.array([[p.face_found] for p in prepared], dtype=bool)),
                    pb_utils.Tensor("TO_INPUT", np.stack([p.to_input for p in prepared]).astype(np.float32)),
                ]
                responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
            except Exception as exc:  # one bad request must not fail the others of the batch
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=_error(exc)))
        return responses


def _error(exc: Exception):
    """The request's error, one line: a client fault (``ValueError``: bad bytes, too large, wrong
    dtype or shape) is ``INVALID_ARG`` (HTTP 400, gRPC INVALID_ARGUMENT); anything else ``INTERNAL``."""
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    code = pb_utils.TritonError.INVALID_ARG if isinstance(exc, ValueError) else pb_utils.TritonError.INTERNAL
    return pb_utils.TritonError(message, code)


class PostprocessModel(_Base):
    """Raw network outputs + ``TO_INPUT`` → ``LABEL``, ``PROBABILITIES`` and the network's extras."""

    def initialize(self, args: dict[str, str]) -> None:
        super().initialize(args)
        self.input_names = processing.postprocess_inputs(self.metadata)
        self.output_names = list(processing.postprocess_outputs(self.metadata))

    def _read(self, request) -> tuple[dict[str, np.ndarray], np.ndarray]:
        raw = {n: pb_utils.get_input_tensor_by_name(request, n).as_numpy() for n in self.input_names}
        return raw, pb_utils.get_input_tensor_by_name(request, "TO_INPUT").as_numpy()

    def _respond(self, result: dict[str, np.ndarray]):
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(n, result[n]) for n in self.output_names])

    def execute(self, requests: list) -> list:
        # The whole batch in one postprocess call (one softmax/argmax over all rows), then split
        # back; only if that fails is each request redone alone, so a fault stays with its request.
        if len(requests) > 1:
            try:
                inputs = [self._read(r) for r in requests]
                sizes = [len(to_input) for _, to_input in inputs]
                raw = {n: np.concatenate([r[n] for r, _ in inputs]) for n in self.input_names}
                result = processing.postprocess(raw, self.metadata, np.concatenate([t for _, t in inputs]))
                bounds = np.cumsum([0, *sizes])
                return [self._respond({n: np.ascontiguousarray(v[a:b]) for n, v in result.items()})
                        for a, b in zip(bounds[:-1], bounds[1:])]
            except Exception:  # noqa: BLE001 -- redone per request below, which reports the error
                pass
        responses = []
        for request in requests:
            try:
                raw, to_input = self._read(request)
                responses.append(self._respond(processing.postprocess(raw, self.metadata, to_input)))
            except Exception as exc:
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=_error(exc)))
        return responses


class PipelineModel(PreprocessModel):
    """The fused layout's one step: encoded bytes → ``FACE_FOUND`` and what post-processing returns.

    Per dynamic batch: every sample decoded and prepared (a bad one fails only its request), one
    ONNX Runtime call over all good samples (its own copy of the champion's ``model.onnx`` in this
    model's version folder; the thread settings the network's own config gets), one post-processing
    call, split back per request. Should the batched call fail (samples of different shapes), each
    request is run alone, so a fault stays with its request.
    """

    def initialize(self, args: dict[str, str]) -> None:
        super().initialize(args)
        import onnxruntime as ort  # from FER_TRITON_PYTHONPATH, like the onnxruntime backend's

        options = ort.SessionOptions()
        options.intra_op_num_threads = int(_parameter(self.config, "intra_op_thread_count", "0"))
        options.inter_op_num_threads = int(_parameter(self.config, "inter_op_thread_count", "0"))
        for key, value in self.config.get("parameters", {}).items():
            if key.startswith("session."):
                options.add_session_config_entry(key, value.get("string_value", ""))
        options.log_severity_level = 3
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.raw_names = processing.postprocess_inputs(self.metadata)
        self.output_names = ["FACE_FOUND", *processing.postprocess_outputs(self.metadata)]

    def _run(self, prepared: list[processing.PreparedInput]) -> dict[str, np.ndarray]:
        tensor = np.stack([p.tensor for p in prepared]).astype(np.float32, copy=False)
        raw = dict(zip(self.raw_names, self.session.run(self.raw_names, {self.tensor_name: tensor})))
        result = processing.postprocess(raw, self.metadata, np.stack([p.to_input for p in prepared]))
        result["FACE_FOUND"] = np.array([[p.face_found] for p in prepared], dtype=bool)
        return result

    def _respond(self, result: dict[str, np.ndarray], a: int, b: int):
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor(n, np.ascontiguousarray(result[n][a:b])) for n in self.output_names])

    def execute(self, requests: list) -> list:
        responses: list = [None] * len(requests)
        good: list[tuple[int, list[processing.PreparedInput]]] = []
        for index, request in enumerate(requests):
            try:
                good.append((index, self._prepare(request)))
            except Exception as exc:  # one bad request must not fail the others of the batch
                responses[index] = pb_utils.InferenceResponse(output_tensors=[], error=_error(exc))
        if len(good) > 1:
            try:
                result = self._run([p for _, prepared in good for p in prepared])
                offset = 0
                for index, prepared in good:
                    responses[index] = self._respond(result, offset, offset + len(prepared))
                    offset += len(prepared)
                good = []
            except Exception:  # noqa: BLE001 -- redone per request below, which reports the error
                pass
        for index, prepared in good:
            try:
                responses[index] = self._respond(self._run(prepared), 0, len(prepared))
            except Exception as exc:
                responses[index] = pb_utils.InferenceResponse(output_tensors=[], error=_error(exc))
        return responses

    def finalize(self) -> None:
        self.session = None
