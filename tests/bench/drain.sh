#!/usr/bin/env bash
# Backlog drain with several sidecars (targets: a 100k-event backlog reaches
# Polar within 1.2x the time Polar's rate limit allows, and none of our own
# requests is refused with a 429). The emulator enforces Polar's production
# limit, 500 requests a minute per organization token; the sidecars share one
# budget through PostgreSQL at their default 450 a minute. The bound is the
# least time Polar's limit allows for every request made: ceil(events / batch)
# ingest calls plus one customer creation per organization, at 500 a minute.
#   usage: tests/bench/drain.sh [events] [sidecars]
set -euo pipefail
cd "$(dirname "$0")/../.."
. tests/bench/lib.sh
N=${1:-100000}
SIDECARS=${2:-3}
BATCH=1000
RATE=500
ORGS=(acme globex initech)
PORT=55441
OUT=$(mktemp -d)

bench_build
cleanup() {
    for p in ${PIDS:-} ${EMU:-}; do kill "$p" 2>/dev/null || true; done
    scripts/cluster.sh stop drain || true
}
trap cleanup EXIT
bench_cluster drain $PORT pm_drain
"${PSQL[@]}" -c "SELECT cron.unschedule(jobid) FROM cron.job" >/dev/null
for o in "${ORGS[@]}"; do "${PSQL[@]}" -c "SELECT meter.upsert_organization('$o', '$o', '$o@example.org')" >/dev/null; done
# The backlog, recorded set-based, 1000 events a call, spread over the organizations.
"${PSQL[@]}" <<SQL >/dev/null
DO \$\$
DECLARE
    orgs text[] := '{$(IFS=,; echo "${ORGS[*]}")}';
BEGIN
    FOR c IN 0 .. ($N - 1) / 1000 LOOP
        PERFORM meter.record_events_for_org(orgs[1 + c % cardinality(orgs)],
            (SELECT jsonb_agg(jsonb_build_object('idempotency_key', 'bl-' || i, 'event_name', 'api.request',
                    'event_timestamp', now() - interval '1 minute', 'metadata', jsonb_build_object('i', i, 'model', 'm' || i % 7)))
             FROM generate_series(c * 1000 + 1, least((c + 1) * 1000, $N)) i));
    END LOOP;
END
\$\$;
SQL
TOKEN=polar_oat_drain_benchmark_00000000000000000000000
target/perf/polar-emulator --listen 127.0.0.1:18795 --tokens $TOKEN --rate-limit $RATE >"$OUT/emu.log" 2>&1 &
EMU=$!
wait_http http://127.0.0.1:18795/__admin/stats
sent() { "${PSQL[@]}" -tAc "SELECT count(*) FROM meter.meter_event WHERE polar_status = 'sent'"; }

START=$(date +%s.%N)
PIDS=
for i in $(seq "$SIDECARS"); do
    DATABASE_URL="postgres://drain_meterd@127.0.0.1:$PORT/pm_drain" POLAR_METER_LISTEN=127.0.0.1:0 LOG_FORMAT=json RUST_LOG=warn \
        POLAR_ACCESS_TOKEN=$TOKEN POLAR_API_URL=http://127.0.0.1:18795 POLAR_BATCH_SIZE=$BATCH \
        target/perf/polar-meterd serve >"$OUT/side$i.log" 2>&1 &
    PIDS="$PIDS $!"
done
until [ "$(sent)" -ge "$N" ]; do
    sleep 0.2
    for p in $PIDS; do kill -0 "$p" || { tail "$OUT"/side*.log; exit 1; }; done
done
ELAPSED=$(secs_since "$START")
STATS=$(curl -s http://127.0.0.1:18795/__admin/stats)
read -r STORED REQS DUPS REFUSED CUSTOMERS < <(python3 -c '
import json, sys
s = json.loads(sys.argv[1]); r = s["requests"]
print(s["events"], s["ingest_requests"], s["duplicates"], sum(v for k, v in r.items() if k.endswith(" 429")),
      r.get("POST /v1/customers/ 201", 0))' "$STATS")
BOUND=$(awk -v n="$N" -v b="$BATCH" -v r="$RATE" -v o="${#ORGS[@]}" 'BEGIN{req=int((n+b-1)/b)+o; printf "%.1f", req/(r/60.0)}')
RATIO=$(awk -v e="$ELAPSED" -v b="$BOUND" 'BEGIN{printf "%.2f", e/b}')
echo "events=$N sidecars=$SIDECARS elapsed=${ELAPSED}s bound=${BOUND}s ratio=$RATIO stored=$STORED ingest_requests=$REQS duplicates=$DUPS 429s=$REFUSED customers=$CUSTOMERS"
[ "$STORED" = "$N" ] || { echo "the emulator holds $STORED events, expected $N" >&2; exit 1; }
[ "$REFUSED" = 0 ] || { echo "$REFUSED requests were refused with a 429" >&2; exit 1; }
{
    echo "<!-- drain:start -->"
    echo "Measured $(date -u +%Y-%m-%d), durable cluster, optimised builds, $SIDECARS sidecars with their defaults (one shared budget of 450 Polar requests a minute). Command: \`tests/bench/drain.sh $N $SIDECARS\` (also \`make bench\`)."
    echo
    echo "| backlog | organizations | sidecars | batch | time to all \`sent\` | Polar's bound (500/min) | time / bound | ingest requests | 429s | events at Polar | duplicates |"
    echo "|---|---|---|---|---|---|---|---|---|---|---|"
    echo "| $N | ${#ORGS[@]} | $SIDECARS | $BATCH | ${ELAPSED} s | ${BOUND} s | **$RATIO** | $REQS | **$REFUSED** | $STORED | $DUPS |"
    echo "<!-- drain:end -->"
} >"$OUT/section.md"
write_section drain "$OUT/section.md"
