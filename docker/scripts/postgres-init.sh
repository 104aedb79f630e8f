#!/bin/sh
# Run once by the postgres image on an empty data volume (docker-entrypoint-initdb.d), as
# $POSTGRES_USER: one database per state holder, all owned by that user.
#   mlflow       MLflow tracking + model registry (runs, params, metrics, registered models)
#   mlflow_auth  MLflow basic-auth users and permissions
#   prefect      Prefect server (deployments, flow runs, schedules, work pools)
set -eu
for db in "${MLFLOW_DB:-mlflow}" "${MLFLOW_AUTH_DB:-mlflow_auth}" "${PREFECT_DB:-prefect}"; do
  psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
       -c "CREATE DATABASE \"$db\" OWNER \"$POSTGRES_USER\";"
done
