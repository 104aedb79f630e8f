# syntax=docker/dockerfile:1
# NVIDIA's Triton container plus what the repository's Python-backend models import: the
# preprocess/postprocess models of each ensemble (serving/ensembles/triton_models.py) use
# fer_core and serving, which need numpy<2, OpenCV and (through fer_core.models) the CPU torch
# wheel. Networks themselves run on Triton's native ONNX Runtime backend (GPU when available).
#
#   docker build -f docker/triton.Dockerfile --build-arg TRITON_TAG=24.10 -t fer-triton .
ARG TRITON_TAG=24.10
FROM nvcr.io/nvidia/tritonserver:${TRITON_TAG}-py3
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
# torch here only supplies the model-metadata classes for pre/post-processing; inference does not
# use it, so the small CPU build is enough even on a GPU host.
# Versions from the platform's lock, like every other environment of the project.
COPY requirements/constraints.txt /tmp/constraints.txt
RUN pip install --no-cache-dir --extra-index-url "$TORCH_CPU_INDEX" -c /tmp/constraints.txt \
        numpy opencv-python-headless pyyaml torch
COPY fer_core/ /opt/fer/fer_core/
COPY serving/ /opt/fer/serving/
# The Python-backend stub ignores PYTHONPATH; the repository's models read this instead.
ENV FER_TRITON_PYTHONPATH=/opt/fer
# Triton runs as the image's non-root user.
USER triton-server
