#!/usr/bin/env bash
# Ingest on Citus (a coordinator and two workers) against one plain node, on
# this one machine: all three Citus nodes share its two cores with the load
# generator and the sidecar, so this shows the cost per node and the shape of
# the scaling path (each organization's writes on one worker, no two-phase
# commit), not a speed-up. Both sides run with the same settings (fsync off,
# as the test clusters), 100 organizations with a key each, the sidecar with
# its defaults, and wrk sending batches of 100 and single events.
#   usage: tests/bench/citus.sh [seconds per run]
set -euo pipefail
cd "$(dirname "$0")/../.."
. tests/bench/lib.sh
SECS=${1:-15}
ORGS=100
PLAIN=25470
COORD=25460
OUT=$(mktemp -d)

bench_build
scripts/citus.sh build
cleanup() {
    [ -n "${SIDE:-}" ] && kill "$SIDE" 2>/dev/null || true
    scripts/cluster.sh stop citus-plain || true
    scripts/citus.sh stop || true
}
trap cleanup EXIT

setup() { # port: organizations and keys into $OUT/keys.PORT
    local port=$1 p=(psql -h 127.0.0.1 -p "$1" -U postgres -X -q -v ON_ERROR_STOP=1 -d pm_bench)
    "${p[@]}" -c "SELECT count(meter.upsert_organization('b' || i, 'B' || i, 'b' || i || '@example.org')) FROM generate_series(1, $ORGS) i" >/dev/null
    "${p[@]}" -tAc "SELECT string_agg((SELECT key FROM meter.create_api_key('b' || i, 'bench')), ',') FROM generate_series(1, $ORGS) i" >"$OUT/keys.$port"
    "${p[@]}" -c "DO \$\$ BEGIN CREATE ROLE bench_meterd LOGIN IN ROLE polar_meter_sidecar; EXCEPTION WHEN duplicate_object THEN NULL; END \$\$"
}
scripts/cluster.sh destroy citus-plain
scripts/cluster.sh start citus-plain $PLAIN pm_bench
psql -h 127.0.0.1 -p $PLAIN -U postgres -X -q -c "CREATE DATABASE pm_bench" -d postgres
psql -h 127.0.0.1 -p $PLAIN -U postgres -X -q -d pm_bench -c "CREATE EXTENSION polar_meter" 2>/dev/null
setup $PLAIN
scripts/citus.sh destroy
scripts/citus.sh start $COORD pm_bench
psql -h 127.0.0.1 -p $COORD -U postgres -X -q -d pm_bench -c "CREATE EXTENSION polar_meter" \
    -c "SELECT * FROM meter.citus_distribute()" >/dev/null 2>&1
setup $COORD
# Creating organizations and keys writes reference tables (two-phase commit on
# every node); from here on, only recordings run.
TWO_PC_BEFORE=$(psql -h 127.0.0.1 -p $COORD -U postgres -X -qtA -d pm_bench -c "SELECT count(*) FROM pg_dist_transaction")

TS=$(date -u -d '-1 minute' +%Y-%m-%dT%H:%M:%SZ)
run() { # port -> "batch_events/s single_events/s"
    local port=$1 keys out batch single
    keys=$(cat "$OUT/keys.$port")
    DATABASE_URL="postgres://bench_meterd@127.0.0.1:$port/pm_bench" POLAR_METER_LISTEN=127.0.0.1:18790 LOG_FORMAT=json \
        RUST_LOG=warn target/perf/polar-meterd serve >"$OUT/side.$port.log" 2>&1 &
    SIDE=$!
    wait_http http://127.0.0.1:18790/readyz
    out=$(PM_KEY=$keys PM_TS=$TS PM_RUN="cb$port$RANDOM" PM_SIZE=100 wrk -t 2 -c 8 -d "${SECS}s" --timeout 30s \
        -s tests/bench/batch.lua http://127.0.0.1:18790/api/v1/meter/batch)
    grep -q "Non-2xx" <<<"$out" && { echo "$out" >&2; exit 1; }
    batch=$(sed -n 's/^Requests\/sec: *\([0-9.]*\).*/\1/p' <<<"$out" | awk '{printf "%.0f", $1 * 100}')
    out=$(PM_KEY=$keys PM_BODY="{\"event_name\":\"api.request\",\"event_timestamp\":\"$TS\"}" PM_RUN="cs$port$RANDOM" \
        wrk -t 2 -c 32 -d "${SECS}s" -s tests/bench/meter.lua http://127.0.0.1:18790/api/v1/meter)
    grep -q "Non-2xx" <<<"$out" && { echo "$out" >&2; exit 1; }
    single=$(sed -n 's/^Requests\/sec: *\([0-9.]*\).*/\1/p' <<<"$out" | awk '{printf "%.0f", $1}')
    kill $SIDE && wait $SIDE 2>/dev/null || true
    SIDE=
    echo "$batch $single"
}
read -r P_BATCH P_SINGLE < <(run $PLAIN)
read -r C_BATCH C_SINGLE < <(run $COORD)
TWO_PC=$(($(psql -h 127.0.0.1 -p $COORD -U postgres -X -qtA -d pm_bench -c "SELECT count(*) FROM pg_dist_transaction") - TWO_PC_BEFORE))
echo "plain: batch $P_BATCH/s single $P_SINGLE/s; citus: batch $C_BATCH/s single $C_SINGLE/s; two-phase commits: $TWO_PC"
{
    echo "<!-- citus:start -->"
    echo "Measured $(date -u +%Y-%m-%d), Citus 13.2.2, all nodes on this 2-core machine with fsync off (as the test clusters), $ORGS organizations with a key each, the sidecar with its defaults. Command: \`tests/bench/citus.sh $SECS\`."
    echo
    echo "| | batches of 100, 8 connections, events/s | single events, 32 connections, events/s |"
    echo "|---|---|---|"
    echo "| one PostgreSQL node | $P_BATCH | $P_SINGLE |"
    echo "| Citus: coordinator + 2 workers | $C_BATCH | $C_SINGLE |"
    echo "| Citus / one node | $(awk -v a="$C_BATCH" -v b="$P_BATCH" 'BEGIN{printf "%.2f×", a/b}') | $(awk -v a="$C_SINGLE" -v b="$P_SINGLE" 'BEGIN{printf "%.2f×", a/b}') |"
    echo
    if [ "$TWO_PC" = 0 ]; then
        echo "Two-phase commits recorded by the coordinator while recording (pg_dist_transaction): **0**: every recording was a single-shard transaction on its organization's worker."
    else
        echo "Two-phase commits recorded by the coordinator while recording (pg_dist_transaction): **$TWO_PC**."
    fi
    echo "<!-- citus:end -->"
} >"$OUT/section.md"
write_section citus "$OUT/section.md"
