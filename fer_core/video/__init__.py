"""Video: face tracking, the recognition overlay and the streamed frame pipeline of ``fer app`` / ``fer annotate``.

Pure library code (OpenCV + numpy): the recognizer that turns face crops into predictions is passed
in (Triton or ONNX Runtime adapters live in :mod:`serving.recognizers`), so nothing here imports
a serving client or the registry.

* :mod:`.tracker` -- :class:`IoUTracker`, stable box ids across frames;
* :mod:`.overlay` -- :class:`FaceAnnotation` and the drawing of boxes, labels, AUs, V/A, landmarks;
* :mod:`.pipeline` -- :class:`FrameProcessor` (detect, track, crop, recognise one frame) and
  :func:`annotate_stream` (threads + bounded queues: read, detect, infer, write overlap);
* :mod:`.source` -- opening a camera index, a video file or a stream URL with clear errors;
* :mod:`.table` -- the per-frame table in py-feat's ``Fex`` column names, streamed to CSV or Parquet.
"""
