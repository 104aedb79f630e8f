#!/bin/sh
# moto's S3 server as a durable stand-in for MinIO (see docker/local/s3-standin.Dockerfile):
# record every request to /data and replay the recording at start (the buckets: the minio-init service).
set -eu
PORT="${S3_PORT:-9000}"
HOST="${S3_HOST:-127.0.0.1}"
export MOTO_ENABLE_RECORDING=true MOTO_RECORDER_FILEPATH="${S3_RECORDING:-/data/recording.jsonl}"
touch "$MOTO_RECORDER_FILEPATH"
READY=/tmp/s3-standin.ready  # the health check: set once the replay is done
rm -f "$READY"
/opt/venv/bin/moto_server -H "$HOST" -p "$PORT" &
server=$!
trap 'kill -TERM "$server" 2>/dev/null; wait "$server"' TERM INT
/opt/venv/bin/python - "$HOST" "$PORT" "$MOTO_RECORDER_FILEPATH" <<'PY'
import os, sys, time, urllib.request
host, port, recording = sys.argv[1:4]
url = f"http://{host}:{port}"
for _ in range(120):
    try:
        urllib.request.urlopen(f"{url}/moto-api/", timeout=2)
        break
    except OSError:
        time.sleep(0.5)
else:
    sys.exit("s3-standin: moto_server did not start")
if os.path.getsize(recording):
    request = urllib.request.Request(f"{url}/moto-api/recorder/replay-recording", method="POST")
    urllib.request.urlopen(request, timeout=600)
    print(f"s3-standin: replayed {sum(1 for _ in open(recording))} recorded requests", flush=True)
print(f"s3-standin: ready on {url}", flush=True)
PY
touch "$READY"
wait "$server"
