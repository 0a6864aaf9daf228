#!/usr/bin/env bash
# `make up`: a local PostgreSQL 15 (durable, pg_cron preloaded) on
# 127.0.0.1:54329 with database polar_meter, pg_cron and polar_meter
# installed, and a least-privilege login role for the sidecar.
# `make down` (scripts/up.sh down) stops what this started.
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${PM_DEV_PORT:-54329}
RUN=$PWD/.pm/run
PSQL=(psql -h 127.0.0.1 -p "$PORT" -U postgres -X -q -v ON_ERROR_STOP=1)

stop_pid() {
    local f=$RUN/$1.pid
    if [ -f "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null; then
        kill -TERM "$(cat "$f")"
        for _ in $(seq 50); do kill -0 "$(cat "$f")" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -f "$f"
}

if [ "${1:-}" = down ]; then
    stop_pid polar-meterd
    stop_pid polar-emulator
    scripts/cluster.sh stop dev
    echo "stopped"
    exit 0
fi

mkdir -p "$RUN"
scripts/cluster.sh start dev "$PORT" polar_meter durable
"${PSQL[@]}" -tAc "SELECT 1 FROM pg_database WHERE datname = 'polar_meter'" | grep -q 1 ||
    "${PSQL[@]}" -c "CREATE DATABASE polar_meter"
"${PSQL[@]}" -d polar_meter -c "CREATE EXTENSION IF NOT EXISTS pg_cron" \
    -c "CREATE EXTENSION IF NOT EXISTS polar_meter"
"${PSQL[@]}" -d polar_meter -c "ALTER EXTENSION polar_meter UPDATE" 2>/dev/null || true
"${PSQL[@]}" -tAc "SELECT 1 FROM pg_roles WHERE rolname = 'polar_meterd'" | grep -q 1 ||
    "${PSQL[@]}" -c "CREATE ROLE polar_meterd LOGIN IN ROLE polar_meter_sidecar"

cat <<MSG

polar-meter is up.
  PostgreSQL   postgres://postgres@127.0.0.1:$PORT/polar_meter   (DBA: psql -h 127.0.0.1 -p $PORT -U postgres polar_meter)
  sidecar role postgres://polar_meterd@127.0.0.1:$PORT/polar_meter (EXECUTE-only)
MSG
