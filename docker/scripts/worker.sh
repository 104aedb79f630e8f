#!/bin/sh
# The Prefect worker of docker/compose.yaml: (re)register the deployments of prefect.yaml, then
# poll the work pool and run each flow run as a subprocess of this platform container.
# `prefect deploy` updates existing deployments in place, so every worker replica may run it.
set -eu
POOL="${FER_WORK_POOL:-fer-training}"
# The model repository Triton reads and its model-control key (docker/scripts/triton.sh waits for
# both): created here, by the owner of the volume, with the key mode 0600.
python -c 'from fer_platform.workspace import Workspace; from serving.server import control_key
w = Workspace.load().ensure(); w.triton_repository.mkdir(parents=True, exist_ok=True)
control_key(w.triton_repository.parent)'
prefect work-pool inspect "$POOL" > /dev/null 2>&1 || prefect work-pool create "$POOL" --type process
prefect --no-prompt deploy --all --prefect-file "${FER_CHECKOUT:-/opt/fer}/prefect.yaml"
exec prefect worker start --pool "$POOL" --type process --with-healthcheck \
  --limit "${FER_WORKER_CONCURRENCY:-1}" --name "worker-$(hostname)"
