#!/usr/bin/env bash
# Recording right after a fresh install: single-event HTTP ingest at 32
# clients, in back-to-back intervals, starting on an empty meter_event, once
# with the sidecar's defaults and once with its connections never replaced
# (POLAR_METER_DB_CONNECTION_MAX_AGE_SECS=0), each on a fresh cluster.
# PostgreSQL caches a generic plan per connection; one made while the table
# is nearly empty can read an organization's whole index range on every
# idempotency-key lookup once the table has grown, until autovacuum's ANALYZE
# replans it. Recording new events no longer looks keys up (only replays
# do), so both lines should stay alike: this shows recording keeps its rate
# as the table fills, whatever the connections' age.
#   usage: tests/bench/fresh.sh [seconds per interval] [intervals]
set -euo pipefail
cd "$(dirname "$0")/../.."
. tests/bench/lib.sh
SECS=${1:-12}
INTERVALS=${2:-5}
PORT=55445
OUT=$(mktemp -d)

bench_build
cleanup() {
    [ -n "${SIDE:-}" ] && kill "$SIDE" 2>/dev/null || true
    scripts/cluster.sh stop fresh || true
}
trap cleanup EXIT

# one_run MAX_AGE -> one line of events/s per interval, then the row count
# and when autovacuum first analyzed meter_event (seconds after the start).
one_run() {
    local age=$1 start rates=() rows analyzed
    bench_cluster fresh $PORT pm_fresh >/dev/null
    local key ts body
    key=$(bench_acme_key)
    ts=$(date -u -d '-1 minute' +%Y-%m-%dT%H:%M:%SZ)
    body="{\"event_name\":\"api.request\",\"event_timestamp\":\"$ts\",\"metadata\":{\"tokens\":12,\"model\":\"m\"}}"
    env ${age:+POLAR_METER_DB_CONNECTION_MAX_AGE_SECS=$age} DATABASE_URL="postgres://fresh_meterd@127.0.0.1:$PORT/pm_fresh" \
        POLAR_METER_LISTEN=127.0.0.1:18795 LOG_FORMAT=json RUST_LOG=warn target/perf/polar-meterd serve >"$OUT/side.log" 2>&1 &
    SIDE=$!
    wait_http http://127.0.0.1:18795/readyz
    start=$(date +%s.%N)
    for i in $(seq "$INTERVALS"); do
        rates+=("$(PM_KEY=$key PM_BODY=$body PM_RUN="f$i-$RANDOM$RANDOM" PM_DELAY_MS=0 wrk -t 2 -c 32 -d "${SECS}s" \
            -s tests/bench/meter.lua "http://127.0.0.1:18795/api/v1/meter" | sed -n 's/^Requests\/sec: *\([0-9.]*\).*/\1/p' | cut -d. -f1)")
    done
    rows=$("${PSQL[@]}" -tAc "SELECT count(*) FROM meter.meter_event")
    analyzed=$("${PSQL[@]}" -tAc "SELECT coalesce(round(extract(epoch FROM last_autoanalyze) - $start)::text, 'not yet')
        FROM pg_stat_user_tables WHERE relname = 'meter_event'")
    kill "$SIDE"
    wait "$SIDE" 2>/dev/null || true
    SIDE=
    scripts/cluster.sh stop fresh >/dev/null
    echo "${rates[*]} | $rows | $analyzed"
}

DEFAULTS=$(one_run "")
echo "defaults: $DEFAULTS"
KEPT=$(one_run 0)
echo "never replaced: $KEPT"

row() { # label "r1 r2 ... | rows | analyzed"
    local rates rows analyzed
    rates=$(echo "$2" | cut -d'|' -f1 | xargs | sed 's/ / \/ /g')
    rows=$(echo "$2" | cut -d'|' -f2 | xargs)
    analyzed=$(echo "$2" | cut -d'|' -f3 | xargs)
    echo "| $1 | $rates | $rows | $analyzed |"
}
{
    echo "<!-- fresh:start -->"
    echo "Measured $(date -u +%Y-%m-%d) on this machine ($(nproc) cores), a fresh durable cluster for each line, 32 clients, $INTERVALS intervals of $SECS s back to back from an empty \`meter_event\`."
    echo "Command: \`tests/bench/fresh.sh $SECS $INTERVALS\` (also \`make bench\`)."
    echo
    echo "| sidecar | events/s in each interval | rows at the end | autovacuum's first ANALYZE (s after the start) |"
    echo "|---|---|---|---|"
    row "defaults (connections replaced after 5 s, then as old as the pool was, at most 60 s)" "$DEFAULTS"
    row "connections never replaced (\`POLAR_METER_DB_CONNECTION_MAX_AGE_SECS=0\`)" "$KEPT"
    echo "<!-- fresh:end -->"
} >"$OUT/section.md"
write_section fresh "$OUT/section.md"
