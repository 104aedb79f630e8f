#!/usr/bin/env bash
# Install NVIDIA's perf_analyzer into a tool venv of its own and print the path of a wrapper that runs it.
#
#   bench/perf_tools.sh            # or: make perf-tools
#   "$(bench/perf_tools.sh)" -m ca_resnet -u 127.0.0.1:8001 -i grpc
#
# The binary ships in the tritonclient 2.41 wheel (bench/perf_tools.txt pins it); it links against
# libb64.so.0d (Debian's libb64-0d, apt-installed here when missing; needs root) and libcudart.so.12
# (the nvidia-cuda-runtime-cu12 wheel, put on LD_LIBRARY_PATH by the wrapper). Idempotent: a second
# run only checks. Everything but the last line goes to stderr, so the output can be captured.
# PERF_VENV (default <checkout>/.venv-perf) and PYTHON (default python3) override the defaults.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PERF_VENV:-$ROOT/.venv-perf}"
PYTHON="${PYTHON:-python3}"
PINS="$ROOT/bench/perf_tools.txt"
WRAPPER="$VENV/perf_analyzer"
STAMP="$VENV/.installed"

log() { echo "perf_tools: $*" >&2; }

if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating $VENV"
    "$PYTHON" -m venv "$VENV" >&2
fi
if [[ ! -f "$STAMP" || "$PINS" -nt "$STAMP" ]]; then
    log "installing $(grep -v '^#' "$PINS" | xargs)"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps -r "$PINS" >&2
    touch "$STAMP"
fi

if ! ldconfig -p | grep -q 'libb64\.so\.0d'; then
    if [[ "$(id -u)" -ne 0 ]]; then
        log "libb64.so.0d is missing: install Debian's libb64-0d (sudo apt-get install libb64-0d)"
        exit 1
    fi
    log "apt-get install libb64-0d"
    export DEBIAN_FRONTEND=noninteractive
    # Another apt-get may hold the lock for a while: wait for it instead of failing.
    apt-get install -y -q -o DPkg::Lock::Timeout=300 libb64-0d >&2 \
        || { apt-get update -q -o DPkg::Lock::Timeout=300 >&2 \
             && apt-get install -y -q -o DPkg::Lock::Timeout=300 libb64-0d >&2; }
fi

CUDART_DIR="$("$VENV/bin/python" - <<'PY'
from importlib.util import find_spec
from pathlib import Path
spec = find_spec("nvidia.cuda_runtime")
print(Path(list(spec.submodule_search_locations)[0]) / "lib" if spec else "")
PY
)"
if [[ -z "$CUDART_DIR" || ! -e "$CUDART_DIR/libcudart.so.12" ]]; then
    log "libcudart.so.12 not found in $VENV (nvidia-cuda-runtime-cu12)"; exit 1
fi

cat > "$WRAPPER.tmp" <<SH
#!/bin/sh
# Written by bench/perf_tools.sh: NVIDIA's perf_analyzer with its CUDA runtime library on the path.
LD_LIBRARY_PATH="$CUDART_DIR\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "$VENV/bin/perf_analyzer" "\$@"
SH
chmod 755 "$WRAPPER.tmp"
mv "$WRAPPER.tmp" "$WRAPPER"

# perf_analyzer has no --help exit 0; --version is the cheapest call that loads every library.
if ! version="$("$WRAPPER" --version 2>&1)"; then
    log "$WRAPPER does not run: $version"; exit 1
fi
log "$(echo "$version" | head -n 1)"
echo "$WRAPPER"
