"""A Python-based Triton backend named ``onnxruntime``: runs ``<version>/model.onnx`` with ONNX Runtime.

The ``tritonserver`` of the ``nvidia-pytriton`` wheel has no native ONNX Runtime backend. This file
(copied to ``<backend-dir>/onnxruntime/model.py`` next to the Python backend's library and stub by
:func:`serving.server.build_backend_directory`) stands in for it, so one model repository whose
configs say ``backend: "onnxruntime"`` runs both here and on NVIDIA's Triton container, where the
native backend picks the same ``model.onnx`` up.

It depends only on numpy and onnxruntime. All requests of a dynamic batch are concatenated and run
as one ONNX Runtime call (that is what makes dynamic batching pay off), then split back. Honoured
config parameters (the native backend's names): ``intra_op_thread_count``, ``inter_op_thread_count``;
and every ``session.*`` parameter is an ONNX Runtime session config entry (e.g.
``session.intra_op.allow_spinning`` = "0": pool threads that spin while waiting for work steal the
CPU from the stub and Triton's own threads on a small machine).

Marshalling, measured to matter here (``bench/serving.py`` prints the per-step split): the inputs
are read with ``as_numpy()`` straight from the Python backend's shared memory (no copy); one
request is fed to ONNX Runtime as is (no concatenation), several are concatenated once; each
response's output is a view into the batched result when ONNX Runtime's output is contiguous.
"""

import json
import os
import sys

# Triton's Python-backend stub ignores PYTHONPATH; serving.server.EmbeddedTriton passes the package
# folders (numpy, onnxruntime) in FER_TRITON_PYTHONPATH instead. Unset (NVIDIA's container with the
# packages installed in its own Python) this changes nothing.
sys.path[:0] = [p for p in os.environ.get("FER_TRITON_PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402


def _parameter(config, key, default):
    return config.get("parameters", {}).get(key, {}).get("string_value", default)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        filename = config.get("default_model_filename") or "model.onnx"
        path = os.path.join(args["model_repository"], args["model_version"], filename)
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(_parameter(config, "intra_op_thread_count", "0"))
        options.inter_op_num_threads = int(_parameter(config, "inter_op_thread_count", "0"))
        for key, value in config.get("parameters", {}).items():
            if key.startswith("session."):
                options.add_session_config_entry(key, value.get("string_value", ""))
        options.log_severity_level = 3
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.input_names = [i["name"] for i in config["input"]]
        self.output_names = [o["name"] for o in config["output"]]
        self.input_dtypes = {
            i["name"]: pb_utils.triton_string_to_numpy(i["data_type"]) for i in config["input"]
        }

    def _read(self, request):
        """The request's inputs (views of shared memory), or the error message of a wrong dtype."""
        arrays = {}
        for name in self.input_names:
            array = pb_utils.get_input_tensor_by_name(request, name).as_numpy()
            if array.dtype != self.input_dtypes[name]:
                return None, f"input {name!r} must be {self.input_dtypes[name].__name__}, got {array.dtype}"
            arrays[name] = array
        return arrays, None

    def execute(self, requests):
        read = [self._read(request) for request in requests]
        valid = [arrays for arrays, error in read if error is None]
        outputs = {}
        if len(valid) == 1:  # one request: fed as is, no concatenation
            outputs = dict(zip(self.output_names, self.session.run(self.output_names, valid[0])))
        elif valid:
            feed = {n: np.concatenate([arrays[n] for arrays in valid]) for n in self.input_names}
            outputs = dict(zip(self.output_names, self.session.run(self.output_names, feed)))
        responses, offset = [], 0
        for arrays, error in read:
            if error is not None:
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(error, pb_utils.TritonError.INVALID_ARG)))
                continue
            size = len(arrays[self.input_names[0]])
            # A row slice of a C-contiguous array is contiguous: pb_utils.Tensor copies it into the
            # response's shared memory once, with no intermediate copy.
            tensors = [pb_utils.Tensor(n, np.ascontiguousarray(outputs[n][offset: offset + size]))
                       for n in self.output_names]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            offset += size
        return responses

    def finalize(self):
        self.session = None
