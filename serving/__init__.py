"""Serving: ONNX export, a Triton model repository, the embedded Triton server and a client.

* :mod:`serving.export` -- ``export_onnx``, ``check_parity``, ``export_checkpoint``;
* :mod:`serving.repository` -- ``ModelRepository`` (atomic installs, served versions, ensembles,
  ``set_champion``), config generation from :class:`~fer_core.models.catalog.ModelMetadata`;
* :mod:`serving.server` -- ``EmbeddedTriton`` (pytriton's ``tritonserver`` binary) and
  ``TritonEndpoint`` (tritonclient gRPC/HTTP);
* :mod:`serving.ensembles` -- the pre/post-processing steps (numpy functions + Triton Python models);
* :mod:`serving.client` -- ``FERClient`` / ``Prediction`` / ``ServingError``.

Submodules are imported on demand, so ``import serving`` stays cheap (no torch, no tritonclient).
"""
