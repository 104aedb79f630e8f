#!/bin/sh
# Start Triton as the stacks run it (docker/compose.yaml on NVIDIA's image, docker/compose.local.yaml
# on fer-triton:local): explicit model control, driven by the platform's `fer promote` / flows.
#
# Model control (load/unload, the repository index), shared memory, logging and trace are restricted
# to requests carrying the platform's control key (serving.server.CONTROL_HEADER); over HTTP,
# inference too (Triton 2.51 sizes HTTP/JSON buffers before validating them). The key is the one the
# worker keeps beside the model repository (<FER_HOME>/triton/control.key, mode 0600, same uid):
# this script waits for it, so the worker may start after Triton.
# The key never goes on tritonserver's command line, which every local user of the host can read in
# /proc/<pid>/cmdline (Triton 2.51 has no file or environment option for it): the restricted-API
# options carry the placeholder @FER_TRITON_KEY_FILE, and the preload built from
# serving/backends/scrub_argv.c (FER_TRITON_SCRUBBER) puts the key from $FER_TRITON_KEY_FILE into
# the arguments main() parses. Without a loadable preload this script refuses to start, and the
# preload itself exits 78 when it cannot read the key: Triton never runs keyed with the placeholder.
# `--load-model=*` loads what the repository holds at start (the published champions: a restarted
# Triton serves what it served before); later changes come from the platform's keyed load calls.
set -eu
REPO="${TRITON_MODEL_REPOSITORY:-/srv/triton/models}"
KEY_FILE="${FER_TRITON_KEY_FILE:-$(dirname "$REPO")/control.key}"
BACKENDS="${TRITON_BACKEND_DIRECTORY:-/opt/tritonserver/backends}"
ADDRESS="${TRITON_ADDRESS:-0.0.0.0}"
SCRUBBER="${FER_TRITON_SCRUBBER:-/opt/fer/lib/libferscrub.so}"
HEADER=fer-control-key
# ld.so only warns about a preload it cannot load and runs the program anyway: try it first.
if ! err=$(LD_PRELOAD="$SCRUBBER" /bin/true 2>&1) || [ -n "$err" ] || ! [ -r "$SCRUBBER" ]; then
  echo "triton: the argv scrubber $SCRUBBER does not load (${err:-missing}); not starting" >&2
  exit 1
fi
waited=0
until [ -s "$KEY_FILE" ] && [ -d "$REPO" ]; do
  if [ "$waited" -ge "${FER_TRITON_KEY_WAIT_S:-600}" ]; then
    echo "triton: no $KEY_FILE / $REPO after ${waited}s (the worker creates them)" >&2
    exit 1
  fi
  [ "$waited" -eq 0 ] && echo "triton: waiting for the worker's $KEY_FILE and $REPO"
  sleep 2
  waited=$((waited + 2))
done
export FER_TRITON_KEY_FILE="$KEY_FILE"
export LD_PRELOAD="$SCRUBBER${LD_PRELOAD:+:$LD_PRELOAD}"
key=@FER_TRITON_KEY_FILE  # serving.server.KEY_PLACEHOLDER: the preload fills it in
exec tritonserver \
  --model-repository="$REPO" --backend-directory="$BACKENDS" \
  --model-control-mode=explicit --load-model='*' --strict-model-config=true --exit-on-error=false --strict-readiness=false \
  --http-address="$ADDRESS" --http-port="${TRITON_HTTP_PORT:-8000}" \
  --grpc-address="$ADDRESS" --grpc-port="${TRITON_GRPC_PORT:-8001}" \
  --metrics-address="$ADDRESS" --metrics-port="${TRITON_METRICS_PORT:-8002}" --allow-gpu-metrics=false \
  --grpc-restricted-protocol="model-repository,shared-memory,logging,trace:$HEADER=$key" \
  --http-restricted-api="model-repository,shared-memory,logging,trace,inference:$HEADER=$key" \
  --backend-config=python,shm-region-prefix-name=fer-triton \
  --log-verbose=0 "$@"
