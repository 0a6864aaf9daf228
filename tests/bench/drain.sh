#!/usr/bin/env bash
# Backlog benchmark (target: a 100k-event backlog reaches Polar within 20%
# of the time the rate limit allows). The emulator enforces Polar's
# production limit (500 requests/minute); the sidecar is allowed the same.
# Lower bound = ceil(events / batch) requests / (500/60 per second).
#   usage: tests/bench/drain.sh [events] [batch size]
set -euo pipefail
cd "$(dirname "$0")/../.."
. tests/bench/lib.sh
N=${1:-100000}
BATCH=${2:-1000}
RATE=500
PORT=55441
B=/usr/lib/postgresql/15/bin
PSQL=(psql -h 127.0.0.1 -p $PORT -U postgres -X -q -v ON_ERROR_STOP=1 -d pm_drain)
OUT=$(mktemp -d)

scripts/deps.sh
cargo build -q -p polar-meterd -p polar-emulator --profile perf
cargo pgrx install -p polar_meter --profile perf --pg-config $B/pg_config >/dev/null

cleanup() {
    for p in ${SIDE:-} ${EMU:-}; do kill "$p" 2>/dev/null || true; done
    scripts/cluster.sh stop drain || true
}
trap cleanup EXIT
scripts/cluster.sh destroy drain
scripts/cluster.sh start drain $PORT postgres durable
psql -h 127.0.0.1 -p $PORT -U postgres -X -q -c "CREATE DATABASE pm_drain"
"${PSQL[@]}" -c "CREATE EXTENSION polar_meter" -c "CREATE ROLE drain_meterd LOGIN IN ROLE polar_meter_sidecar" 2>/dev/null
"${PSQL[@]}" -c "INSERT INTO meter.organization (id, name) VALUES ('acme', 'Acme'), ('globex', 'Globex'), ('initech', 'Initech')"
"${PSQL[@]}" -c "SELECT count(meter.record_event_for_org((ARRAY['acme','globex','initech'])[1 + i % 3], 'bl-' || i, 'api.request',
    now() - interval '1 minute', jsonb_build_object('i', i, 'model', 'm' || (i % 7)))) FROM generate_series(1, $N) i" >/dev/null

TOKEN=polar_oat_drain_benchmark_00000000000000000000000
target/perf/polar-emulator --listen 127.0.0.1:18795 --tokens $TOKEN --rate-limit $RATE >"$OUT/emu.log" 2>&1 &
EMU=$!
for _ in $(seq 100); do curl -s -o /dev/null http://127.0.0.1:18795/v1/events/ && break; sleep 0.1; done
sent() { "${PSQL[@]}" -tAc "SELECT count(*) FILTER (WHERE polar_status = 'sent') FROM meter.meter_event"; }

START=$(date +%s.%N)
DATABASE_URL="postgres://drain_meterd@127.0.0.1:$PORT/pm_drain" POLAR_METER_LISTEN=127.0.0.1:18796 LOG_FORMAT=json RUST_LOG=warn \
    POLAR_ACCESS_TOKEN=$TOKEN POLAR_API_URL=http://127.0.0.1:18795 POLAR_RATE_LIMIT=$RATE POLAR_BATCH_SIZE=$BATCH \
    target/perf/polar-meterd serve >"$OUT/side.log" 2>&1 &
SIDE=$!
until [ "$(sent)" -ge "$N" ]; do
    sleep 0.2
    kill -0 $SIDE || { tail "$OUT/side.log"; exit 1; }
done
END=$(date +%s.%N)
HELD=$(curl -s http://127.0.0.1:18795/__admin/events | python3 -c 'import json,sys; d=json.load(sys.stdin); print(len(d["events"]), d["ingest_requests"], d["duplicates"])')
read -r STORED REQS DUPS <<<"$HELD"
ELAPSED=$(awk -v a="$START" -v b="$END" 'BEGIN{printf "%.1f", b-a}')
BOUND=$(awk -v n="$N" -v b="$BATCH" -v r="$RATE" 'BEGIN{req=int((n+b-1)/b); printf "%.1f", req/(r/60.0)}')
RATIO=$(awk -v e="$ELAPSED" -v b="$BOUND" 'BEGIN{printf "%.2f", e/b}')
echo "events=$N batch=$BATCH elapsed=${ELAPSED}s bound=${BOUND}s ratio=$RATIO stored=$STORED ingest_requests=$REQS duplicates=$DUPS"
[ "$STORED" = "$N" ] || { echo "emulator holds $STORED, expected $N"; exit 1; }

{
    echo "<!-- drain:start -->"
    echo "Measured $(date -u +%Y-%m-%d), durable cluster, optimised builds. Command: \`tests/bench/drain.sh $N $BATCH\` (also \`make bench\`)."
    echo
    echo "| backlog | batch | rate limit | time to all \`sent\` | rate-limit bound | time / bound | ingest requests | events at Polar | duplicates |"
    echo "|---|---|---|---|---|---|---|---|---|"
    echo "| $N | $BATCH | $RATE/min | ${ELAPSED} s | ${BOUND} s | **$RATIO** | $REQS | $STORED | $DUPS |"
    echo "<!-- drain:end -->"
} >"$OUT/section.md"
write_section drain "$OUT/section.md"
