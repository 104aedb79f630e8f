# Triton for hosts without NVIDIA's registry (make images-local; CPU only): the real `tritonserver`
# 2.51 shipped in the nvidia-pytriton wheel, with the Python backend and the repository's
# Python-based backend *named* `onnxruntime` (serving/backends/onnxruntime/model.py, assembled by
# serving.server.build_backend_directory). A model repository whose configs say
# `backend: "onnxruntime"` runs here and unchanged on NVIDIA's image (docker/triton.Dockerfile).
#
#   DOCKER_BUILDKIT=1 docker build -f docker/triton-local.Dockerfile \
#       --build-arg BASE_IMAGE=local/debian:bookworm [--secret id=ca,src=CA] -t fer-triton:local .
#
# Build inputs as in docker/Dockerfile (CA secret, WHEELS_IMAGE), none left in a layer. The Python
# backend's stub embeds the system libpython3.11, so the base must be Debian bookworm (Python 3.11).
ARG BASE_IMAGE=debian:bookworm-slim
ARG WHEELS_IMAGE=scratch

FROM ${WHEELS_IMAGE} AS wheels

# The argv scrubber preload (serving/backends/scrub_argv.c; docker/scripts/triton.sh starts
# tritonserver with it so that the control key is never on its command line): compiled on the same
# base as the server runs on, in a stage of its own (no compiler in the final image). The same
# command as serving.server.build_argv_scrubber and docker/triton.Dockerfile.
FROM ${BASE_IMAGE} AS scrubber
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
COPY serving/backends/scrub_argv.c /src/scrub_argv.c
RUN gcc -shared -fPIC -O2 -o /src/libferscrub.so /src/scrub_argv.c

FROM ${BASE_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# python3/libpython3.11: the stub's interpreter; libglib: OpenCV (pre/post-processing models).
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv libpython3.11 libglib2.0-0 ca-certificates \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log \
 && python3 -m venv /opt/venv

WORKDIR /opt/fer
COPY requirements/constraints.txt requirements/constraints.txt
# What the ensembles' Python models import (fer_core.data, serving.ensembles) and the ONNX Runtime
# backend; nvidia-pytriton only for its server files (--no-deps: its Python API is not used).
RUN --mount=type=secret,id=ca,required=false --mount=type=bind,from=wheels,target=/wheels \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && if [ -n "$(ls -A /wheels 2>/dev/null)" ]; then export PIP_FIND_LINKS=/wheels; fi \
 && /opt/venv/bin/pip install -c requirements/constraints.txt --no-deps nvidia-pytriton \
 && /opt/venv/bin/pip install -c requirements/constraints.txt \
        numpy onnxruntime opencv-python-headless pyyaml pillow filelock

COPY fer_core/ fer_core/
COPY fer_platform/ fer_platform/
COPY serving/ serving/
COPY docker/scripts/triton.sh /opt/fer/docker/scripts/triton.sh
COPY --from=scrubber /src/libferscrub.so /opt/fer/lib/libferscrub.so
# The server binary on PATH and the backends where NVIDIA's image has them, so docker/scripts/triton.sh
# starts either image the same way.
RUN pkg=$(/opt/venv/bin/python -c 'import importlib.util as u; print(u.find_spec("pytriton").submodule_search_locations[0])') \
 && ln -s "$pkg/tritonserver/bin/tritonserver" /usr/local/bin/tritonserver \
 && ln -s "$(dirname "$pkg")/nvidia_pytriton.libs" /opt/tritonserver-libs \
 && /opt/venv/bin/python -c 'from serving.server import build_backend_directory; build_backend_directory("/opt/tritonserver/backends")' \
 && /opt/venv/bin/python -c 'import serving.ensembles.processing, onnxruntime, cv2' \
 && useradd --create-home --uid 10001 --shell /usr/sbin/nologin fer
ENV LD_LIBRARY_PATH=/opt/tritonserver-libs \
    FER_TRITON_PYTHONPATH=/opt/fer:/opt/venv/lib/python3.11/site-packages \
    OMP_NUM_THREADS=1
# Same uid as the platform image: it reads the model-control key the worker writes (mode 0600).
USER fer
ENTRYPOINT ["/bin/sh", "/opt/fer/docker/scripts/triton.sh"]
