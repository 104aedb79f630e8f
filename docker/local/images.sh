#!/bin/sh
# `make images-local`: every image of the local stack, built FROM a Debian base made on this host
# (docker/local/base.sh), for hosts that reach PyPI/Debian but no image registry.
#
#   local/debian:bookworm   debootstrap minbase + docker import
#   fer-platform:local      docker/Dockerfile (CLI, flows, trainer, MLflow and Prefect servers)
#   fer-triton:local        docker/triton-local.Dockerfile (tritonserver of nvidia-pytriton + the
#                           Python-based onnxruntime backend of serving/backends/)
#   fer-postgres:local      docker/local/postgres.Dockerfile (Debian's PostgreSQL 15)
#   fer-s3-standin:local    docker/local/s3-standin.Dockerfile (moto's S3 server: a STAND-IN for
#                           MinIO, which no registry reachable here ships)
#
# Optional build inputs, taken from pip's own configuration unless given, never copied into a layer:
#   FER_BUILD_CA      CA bundle for pip inside the build (pip config `cert`), passed as a BuildKit secret
#   FER_BUILD_WHEELS  a folder of wheels (pip config `find-links`, e.g. the CPU torch wheel), passed as
#                     a scratch image bind-mounted during the pip steps
set -eu
cd "$(dirname "$0")/../.."
DOCKER="${DOCKER:-docker}"
if ! $DOCKER buildx version > /dev/null 2>&1 && [ -x /usr/bin/docker ]; then DOCKER=/usr/bin/docker; fi
# BuildKit through the classic `docker build`: Debian's docker 20.10 client has it built in; a
# newer client needs the buildx plugin for it (set DOCKER=/usr/bin/docker or install buildx).
export DOCKER_BUILDKIT=1
BASE="${FER_BASE_IMAGE:-local/debian:bookworm}"
TAG="${FER_LOCAL_TAG:-local}"
pip_config() { python3 -m pip config get "$1" 2>/dev/null || true; }
CA="${FER_BUILD_CA-${PIP_CERT:-$(pip_config global.cert)}}"
WHEELS="${FER_BUILD_WHEELS-${PIP_FIND_LINKS:-$(pip_config global.find-links)}}"
WHEELS="${WHEELS%% *}"  # the first folder when several are configured

timed() {  # timed NAME COMMAND...: run, print and record the seconds it took
  name=$1; shift
  start=$(date +%s)
  "$@"
  echo "images: $name built in $(( $(date +%s) - start )) s"
}

timed base docker/local/base.sh "$BASE"

secret=""
if [ -n "$CA" ] && [ -s "$CA" ]; then secret="--secret id=ca,src=$CA"; echo "images: CA bundle $CA (BuildKit secret)"; fi
wheels_arg=""
if [ -n "$WHEELS" ] && [ -d "$WHEELS" ]; then
  echo "images: wheel folder $WHEELS (scratch image local/fer-wheels, bind-mounted)"
  printf 'FROM scratch\nCOPY . /\n' | $DOCKER build -q -f - -t local/fer-wheels "$WHEELS" > /dev/null
  wheels_arg="--build-arg WHEELS_IMAGE=local/fer-wheels"
fi

# shellcheck disable=SC2086  # $secret / $wheels_arg are option lists
timed platform $DOCKER build --network host -f docker/Dockerfile \
  --build-arg BASE_IMAGE="$BASE" --build-arg TORCH_INDEX_URL= $wheels_arg $secret \
  -t "fer-platform:$TAG" .
# shellcheck disable=SC2086
timed triton $DOCKER build --network host -f docker/triton-local.Dockerfile \
  --build-arg BASE_IMAGE="$BASE" $wheels_arg $secret -t "fer-triton:$TAG" .
timed postgres $DOCKER build --network host -f docker/local/postgres.Dockerfile \
  --build-arg BASE_IMAGE="$BASE" -t "fer-postgres:$TAG" docker/local
# shellcheck disable=SC2086
timed s3-standin $DOCKER build --network host -f docker/local/s3-standin.Dockerfile \
  --build-arg BASE_IMAGE="$BASE" $secret -t "fer-s3-standin:$TAG" .
$DOCKER image ls --format '{{.Repository}}:{{.Tag}}  {{.Size}}' | grep -E "^(local/debian|fer-)" | grep -v fer-wheels
