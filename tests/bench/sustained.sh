#!/usr/bin/env bash
# Sustained end to end (target: >= 5k events/s for 10 minutes with the
# backlog and the unsealed audit tail bounded; sidecar RSS <= 64 MiB).
# Single-event HTTP ingest, paced at RATE events/s, while the same sidecar
# delivers to the emulator under Polar's production limit (500 requests a
# minute; the sidecar's budget is its default 450) and pg_cron seals the audit
# log every minute and runs the drain job every 5 minutes. Every 15 s it
# samples the backlog (events not yet sent), the unsealed audit rows and the
# sidecar's RSS. Afterwards it waits for the backlog to clear and checks that
# Polar holds every event exactly once.
#   usage: tests/bench/sustained.sh [events/s | max] [seconds] [connections]
# ("max": each connection sends its next request as soon as the last is answered.)
set -euo pipefail
cd "$(dirname "$0")/../.."
. tests/bench/lib.sh
RATE=${1:-6000}
SECS=${2:-600}
CONNS=${3:-64}
PORT=55444
OUT=$(mktemp -d)

bench_build
cleanup() {
    for p in ${SIDE:-} ${EMU:-} ${WRK:-}; do kill "$p" 2>/dev/null || true; done
    scripts/cluster.sh stop sustained || true
}
trap cleanup EXIT
bench_cluster sustained $PORT pm_sustained
"${PSQL[@]}" -c "SELECT meter.upsert_organization('acme', 'Acme', 'billing@acme.example')" >/dev/null
KEY=$("${PSQL[@]}" -tAc "SELECT key FROM meter.create_api_key('acme', 'bench')")
TOKEN=polar_oat_sustained_benchmark_0000000000000000000
target/perf/polar-emulator --listen 127.0.0.1:18793 --tokens $TOKEN --rate-limit 500 >"$OUT/emu.log" 2>&1 &
EMU=$!
wait_http http://127.0.0.1:18793/__admin/stats
DATABASE_URL="postgres://sustained_meterd@127.0.0.1:$PORT/pm_sustained" POLAR_METER_LISTEN=127.0.0.1:18794 LOG_FORMAT=json \
    RUST_LOG=warn POLAR_ACCESS_TOKEN=$TOKEN POLAR_API_URL=http://127.0.0.1:18793 target/perf/polar-meterd serve >"$OUT/side.log" 2>&1 &
SIDE=$!
wait_http http://127.0.0.1:18794/readyz
"${PSQL[@]}" -tAc "SELECT jobname, schedule FROM cron.job ORDER BY 1"

sample() { # -> "backlog unsealed rss_mib" (both counts read partial indexes only)
    "${PSQL[@]}" -tA -F ' ' -c "SELECT (SELECT count(*) FROM meter.meter_event WHERE polar_status IN ('pending', 'failed', 'in_flight')),
        (SELECT count(*) FROM meter.audit_log WHERE row_hash IS NULL)" | tr '\n' ' '
    awk '/VmRSS/{printf "%.1f\n", $2/1024}' /proc/$SIDE/status
}

# Paced closed loop: each of CONNS connections pauses so that together they
# ask for about RATE requests a second (a request's own ~1 ms counted).
if [ "$RATE" = max ]; then
    PAUSE=0
else
    PAUSE=$(awk -v c=$CONNS -v r="$RATE" 'BEGIN{d=int(1000*c/r - 1); print (d < 1) ? 1 : d}')
fi
TS=$(date -u -d '-1 minute' +%Y-%m-%dT%H:%M:%SZ)
BODY="{\"event_name\":\"api.request\",\"event_timestamp\":\"$TS\",\"metadata\":{\"tokens\":12,\"model\":\"m\"}}"
START=$(date +%s.%N)
PM_KEY=$KEY PM_BODY=$BODY PM_RUN="s$RANDOM$RANDOM" PM_DELAY_MS=$PAUSE wrk -t 2 -c $CONNS -d "${SECS}s" --latency \
    -s tests/bench/meter.lua "http://127.0.0.1:18794/api/v1/meter" >"$OUT/wrk.out" &
WRK=$!
echo "t_s backlog unsealed rss_mib" >"$OUT/samples"
while kill -0 $WRK 2>/dev/null; do
    sleep 15
    echo "$(secs_since "$START") $(sample)" | tee -a "$OUT/samples"
done
wait $WRK || true
INGEST_SECS=$(secs_since "$START")
REQS=$(sed -n 's/^ *\([0-9]*\) requests in.*/\1/p' "$OUT/wrk.out")
BAD=$(sed -n 's/.*Non-2xx or 3xx responses: *\([0-9]*\).*/\1/p' "$OUT/wrk.out" | grep . || echo 0)
P99=$(awk '$1=="99%"{print $2}' "$OUT/wrk.out" | to_ms)
GOT=$(awk -v n="$REQS" -v s="$SECS" 'BEGIN{printf "%.0f", n/s}')
ROWS=$("${PSQL[@]}" -tAc "SELECT count(*) FROM meter.meter_event")

# Drain what is left, then check exactly once at Polar.
T0=$(date +%s.%N)
until [ "$("${PSQL[@]}" -tAc "SELECT count(*) FROM meter.meter_event WHERE polar_status IN ('pending', 'failed', 'in_flight')")" = 0 ]; do
    sleep 1
    kill -0 $SIDE || { tail "$OUT/side.log"; exit 1; }
done
DRAIN_AFTER=$(secs_since "$T0")
read -r STORED DUPS REFUSED < <(curl -s http://127.0.0.1:18793/__admin/stats | python3 -c '
import json, sys
s = json.load(sys.stdin)
print(s["events"], s["duplicates"], sum(v for k, v in s["requests"].items() if k.endswith(" 429")))')
RSS_PEAK=$(rss_mib $SIDE)
CHAIN=$("${PSQL[@]}" -tAc "SELECT meter.seal_audit_log(); SELECT coalesce((SELECT problem FROM meter.verify_audit_chain('acme')), 'intact')" | tail -1)
# Bounded: the second half of the run never exceeds the first half's peak by
# more than one minute of ingest (what one cron period or one paused minute adds).
read -r B1 B2 U1 U2 BLAST ULAST < <(awk -v h="$((SECS / 2))" 'NR>1 {
    if ($1 <= h) {b1 = ($2 > b1) ? $2 : b1; u1 = ($3 > u1) ? $3 : u1} else {b2 = ($2 > b2) ? $2 : b2; u2 = ($3 > u2) ? $3 : u2}
    bl = $2; ul = $3} END {print b1+0, b2+0, u1+0, u2+0, bl+0, ul+0}' "$OUT/samples")
VERDICT=$(awk -v b1="$B1" -v b2="$B2" -v u1="$U1" -v u2="$U2" -v s="$((GOT * 60))" 'BEGIN{print (b2 <= b1 + s && u2 <= u1 + s) ? "bounded" : "growing"}')
echo "rate asked=$RATE got=$GOT/s requests=$REQS non2xx=$BAD rows=$ROWS backlog max ${B1}/${B2} unsealed max ${U1}/${U2} -> $VERDICT; drained ${DRAIN_AFTER}s after; polar=$STORED dups=$DUPS 429s=$REFUSED rss peak=${RSS_PEAK}MiB chain=$CHAIN"
[ "$BAD" = 0 ] && [ "$STORED" = "$ROWS" ] && [ "$CHAIN" = intact ] || { echo "exactly-once or the chain failed" >&2; exit 1; }
{
    echo "<!-- sustained:start -->"
    echo "Measured $(date -u +%Y-%m-%d), durable cluster with pg_cron (seal every minute, drain every 5 minutes), optimised builds, one sidecar with its defaults delivering to the emulator at Polar's production limit. Command: \`tests/bench/sustained.sh $RATE $SECS $CONNS\` (also \`make bench\`)."
    echo
    echo "| asked | got (events/s) | for | HTTP p99 | backlog peak, 1st / 2nd half | unsealed audit peak, 1st / 2nd half | backlog / unsealed at the end | verdict | cleared after the run | events at Polar / recorded | duplicates | 429s | sidecar RSS peak | audit chain |"
    echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    echo "| $RATE ($CONNS connections) | **$GOT** | ${SECS} s | $P99 ms | $B1 / $B2 | $U1 / $U2 | $BLAST / $ULAST | **$VERDICT** | ${DRAIN_AFTER} s | $STORED / $ROWS | $DUPS | $REFUSED | **$RSS_PEAK MiB** | $CHAIN |"
    echo
    echo "Delivery's ceiling here is the rate budget: 450 requests a minute of 1000 events, 7,500 events/s."
    echo "<!-- sustained:end -->"
} >"$OUT/section.md"
write_section sustained "$OUT/section.md"
