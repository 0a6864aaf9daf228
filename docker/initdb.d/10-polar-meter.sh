#!/usr/bin/env bash
# First start only: the database, pg_cron, polar_meter and the sidecar's
# least-privilege login (password from POLAR_METERD_PASSWORD).
set -euo pipefail
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" <<SQL
CREATE DATABASE polar_meter;
SQL
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname polar_meter <<SQL
CREATE EXTENSION pg_cron;
CREATE EXTENSION polar_meter;
CREATE ROLE polar_meterd LOGIN PASSWORD '${POLAR_METERD_PASSWORD:?set POLAR_METERD_PASSWORD}' IN ROLE polar_meter_sidecar;
SQL
