#!/bin/sh
# First start on an empty data folder: initdb with POSTGRES_USER as the superuser (password auth,
# scram-sha-256), then the platform's databases (MLflow, MLflow auth, Prefect; names as in
# docker/scripts/postgres-init.sh). Every start: postgres on POSTGRES_LISTEN:POSTGRES_PORT.
set -eu
: "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD is not set}"
USER_NAME="${POSTGRES_USER:-fer}"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  pwfile=$(mktemp)
  printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
  initdb --username="$USER_NAME" --pwfile="$pwfile" --auth=scram-sha-256 --encoding=UTF8 > /dev/null
  rm -f "$pwfile"
  pg_ctl -D "$PGDATA" -o "-c listen_addresses='' -c unix_socket_directories=/var/run/postgresql" -w start > /dev/null
  for db in "${MLFLOW_DB:-mlflow}" "${MLFLOW_AUTH_DB:-mlflow_auth}" "${PREFECT_DB:-prefect}"; do
    PGPASSWORD="$POSTGRES_PASSWORD" psql -v ON_ERROR_STOP=1 -h /var/run/postgresql -U "$USER_NAME" -d postgres -q \
      -c "CREATE DATABASE \"$db\" OWNER \"$USER_NAME\";"
  done
  pg_ctl -D "$PGDATA" -m fast -w stop > /dev/null
  echo "postgres: initialised $PGDATA"
fi
exec postgres -D "$PGDATA" -c listen_addresses="${POSTGRES_LISTEN:-127.0.0.1}" -c port="${POSTGRES_PORT:-5432}" \
  -c unix_socket_directories=/var/run/postgresql
