#!/bin/sh
# `mlflow server` as docker/compose.yaml runs it: PostgreSQL backend + registry, artifacts proxied
# to S3 (MinIO), basic-auth with its user store in PostgreSQL too.
#
# The auth app reads its database from an ini file only, so the file is written here, at start,
# from the environment (into a private tmp dir, never into the image). Passwords are URL-quoted so
# that any character works inside the URIs.
set -eu
: "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD is not set}"
: "${MLFLOW_AUTH_ADMIN_PASSWORD:?MLFLOW_AUTH_ADMIN_PASSWORD is not set}"
PGUSER="${POSTGRES_USER:-fer}"
PGHOST="${POSTGRES_HOST:-postgres}"
PGPORT="${POSTGRES_PORT:-5432}"
quoted=$(python -c 'import os, urllib.parse; print(urllib.parse.quote(os.environ["POSTGRES_PASSWORD"], safe=""))')
db_uri() { echo "postgresql://${PGUSER}:${quoted}@${PGHOST}:${PGPORT}/$1"; }

umask 077
conf_dir=$(mktemp -d)
cat > "$conf_dir/basic_auth.ini" <<INI
[mlflow]
default_permission = ${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}
database_uri = $(db_uri "${MLFLOW_AUTH_DB:-mlflow_auth}")
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
export MLFLOW_AUTH_CONFIG_PATH="$conf_dir/basic_auth.ini"
# The store URIs hold the database password: through the environment (mlflow server's own
# variables for --backend-store-uri / --registry-store-uri), not argv, which every local user of
# the host can read in /proc/<pid>/cmdline.
MLFLOW_BACKEND_STORE_URI="$(db_uri "${MLFLOW_DB:-mlflow}")"
MLFLOW_REGISTRY_STORE_URI="$MLFLOW_BACKEND_STORE_URI"
export MLFLOW_BACKEND_STORE_URI MLFLOW_REGISTRY_STORE_URI

exec mlflow server \
  --host "${MLFLOW_HOST:-0.0.0.0}" --port "${MLFLOW_PORT:-5000}" \
  --serve-artifacts --artifacts-destination "${MLFLOW_ARTIFACTS_DESTINATION:-s3://mlflow/artifacts}" \
  --allowed-hosts "${MLFLOW_ALLOWED_HOSTS:-mlflow,mlflow:5000,localhost,localhost:5000,127.0.0.1,127.0.0.1:5000}" \
  --app-name basic-auth \
  --workers "${MLFLOW_WORKERS:-2}"
