#!/bin/sh
# The Prefect worker of docker/compose.yaml: (re)register the deployments of prefect.yaml, then
# poll the work pool and run each flow run as a subprocess of this platform container.
# `prefect deploy` updates existing deployments in place, so every worker replica may run it.
set -eu
POOL="${FER_WORK_POOL:-fer-training}"
prefect work-pool inspect "$POOL" > /dev/null 2>&1 || prefect work-pool create "$POOL" --type process
prefect --no-prompt deploy --all --prefect-file "${FER_CHECKOUT:-/opt/fer}/prefect.yaml"
exec prefect worker start --pool "$POOL" --type process --with-healthcheck \
  --limit "${FER_WORKER_CONCURRENCY:-1}" --name "worker-$(hostname)"
