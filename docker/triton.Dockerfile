# NVIDIA's Triton container plus what the repository's Python-backend models import: the
# preprocess/postprocess models of each ensemble (serving/ensembles/triton_models.py) use
# fer_core and serving, which need numpy<2, OpenCV and (through fer_core.models) the CPU torch
# wheel. Networks themselves run on Triton's native ONNX Runtime backend (GPU when available).
#
#   docker build -f docker/triton.Dockerfile --build-arg TRITON_TAG=24.10 -t fer-triton .
ARG TRITON_TAG=24.10

# The argv scrubber preload (serving/backends/scrub_argv.c; docker/scripts/triton.sh starts
# tritonserver with it so that the control key is never on its command line): compiled on the
# server's own image, in a stage of its own (no compiler added to the final image). The same
# command as serving.server.build_argv_scrubber and docker/triton-local.Dockerfile.
FROM nvcr.io/nvidia/tritonserver:${TRITON_TAG}-py3 AS scrubber
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
COPY serving/backends/scrub_argv.c /src/scrub_argv.c
RUN gcc -shared -fPIC -O2 -o /src/libferscrub.so /src/scrub_argv.c

FROM nvcr.io/nvidia/tritonserver:${TRITON_TAG}-py3
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
# torch here only supplies the model-metadata classes for pre/post-processing; inference does not
# use it, so the small CPU build is enough even on a GPU host. onnxruntime (CPU) is for the fused
# ensemble layout (FER_TRITON_ENSEMBLE=fused, the KIND_CPU default), whose one Python step runs the
# champion itself; the networks use the image's native onnxruntime backend.
# Versions from the platform's lock, like every other environment of the project.
COPY requirements/constraints.txt /tmp/constraints.txt
RUN pip install --no-cache-dir --extra-index-url "$TORCH_CPU_INDEX" -c /tmp/constraints.txt \
        numpy onnxruntime opencv-python-headless pyyaml torch
COPY fer_core/ /opt/fer/fer_core/
COPY fer_platform/ /opt/fer/fer_platform/
COPY serving/ /opt/fer/serving/
COPY --from=scrubber /src/libferscrub.so /opt/fer/lib/libferscrub.so
# The Python-backend stub ignores PYTHONPATH; the repository's models read this instead.
COPY docker/scripts/triton.sh /opt/fer/docker/scripts/triton.sh
ENV FER_TRITON_PYTHONPATH=/opt/fer
# Non-root, with the platform image's uid (10001): it must read the model-control key the worker
# writes into the shared repository volume with mode 0600 (docker/scripts/triton.sh).
USER 10001:10001
