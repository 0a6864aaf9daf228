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

# Polar: the real one (or the sandbox) when POLAR_ACCESS_TOKEN is set,
# otherwise the local emulator, so that everything works offline.
stop_pid polar-emulator
EMULATOR=127.0.0.1:8788
if [ -z "${POLAR_ACCESS_TOKEN:-}" ]; then
    EMU_TOKEN=polar_oat_emulator_local_development_token_0000000
    POLAR_EMULATOR_LISTEN=$EMULATOR POLAR_EMULATOR_TOKENS=$EMU_TOKEN \
        nohup target/debug/polar-emulator >>"$RUN/polar-emulator.log" 2>&1 &
    echo $! >"$RUN/polar-emulator.pid"
    export POLAR_ACCESS_TOKEN=$EMU_TOKEN POLAR_API_URL=http://$EMULATOR
    POLAR_TARGET="the local Polar emulator at http://$EMULATOR (see what it holds: curl -s http://$EMULATOR/__admin/events)"
else
    export POLAR_API_URL=${POLAR_API_URL:-https://api.polar.sh}
    POLAR_TARGET="$POLAR_API_URL"
fi

# The sidecar, as the least-privilege role.
SIDECAR_URL=postgres://polar_meterd@127.0.0.1:$PORT/polar_meter
LISTEN=${POLAR_METER_LISTEN:-127.0.0.1:8787}
stop_pid polar-meterd
DATABASE_URL=$SIDECAR_URL POLAR_METER_LISTEN=$LISTEN LOG_FORMAT=${LOG_FORMAT:-json} \
    nohup target/debug/polar-meterd serve >>"$RUN/polar-meterd.log" 2>&1 &
echo $! >"$RUN/polar-meterd.pid"
for _ in $(seq 100); do
    curl -fsS "http://$LISTEN/readyz" >/dev/null 2>&1 && break
    kill -0 "$(cat "$RUN/polar-meterd.pid")" 2>/dev/null || { tail -n 20 "$RUN/polar-meterd.log"; exit 1; }
    sleep 0.1
done
curl -fsS "http://$LISTEN/readyz" >/dev/null || { echo "polar-meterd is not ready; see $RUN/polar-meterd.log"; exit 1; }

cat <<MSG

polar-meter is up.
  PostgreSQL   postgres://postgres@127.0.0.1:$PORT/polar_meter    (DBA)
  sidecar DB   $SIDECAR_URL (EXECUTE-only role)
  polar-meterd http://$LISTEN   (logs: .pm/run/polar-meterd.log)
  Polar        $POLAR_TARGET
  stop with    make down

First steps (README.md, "First steps"; copy and paste):

MSG
# The README's block is the one place these steps live (a test runs it).
awk '/<!-- first-steps -->/{f=1; next} f && /^```sh/{p=1; next} p && /^```/{exit} p' README.md |
    sed -e "s/-p 54329/-p $PORT/" -e "s|127.0.0.1:8787|$LISTEN|" |
    if [ -n "${EMU_TOKEN:-}" ]; then cat; else grep -v '__admin'; fi | sed 's/^/  /'
