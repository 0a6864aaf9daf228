#!/usr/bin/env bash
# Batch ingest (target: POST /api/v1/meter/batch >= 25k events/s durable),
# beside pgbench inserting ten events + ten audit rows per transaction, in one
# run against a durable cluster of its own, at the same client counts.
#   usage: tests/bench/batch.sh [seconds per run] [client counts...]
set -euo pipefail
cd "$(dirname "$0")/../.."
. tests/bench/lib.sh
SECS=${1:-15}
shift || true
read -r -a CLIENTS <<<"${*:-8 16}"
SIZES=(100 1000)
PORT=55443
H=(-h 127.0.0.1 -p $PORT -U postgres)
OUT=$(mktemp -d)
chmod 777 "$OUT"

bench_build
cleanup() {
    [ -n "${SIDE:-}" ] && kill "$SIDE" 2>/dev/null || true
    scripts/cluster.sh stop batch || true
}
trap cleanup EXIT
bench_cluster batch $PORT pm_batch
KEY=$(bench_acme_key)
TS=$(date -u -d '-1 minute' +%Y-%m-%dT%H:%M:%SZ)
rows() { "${PSQL[@]}" -tAc "SELECT count(*) FROM meter.meter_event"; }

DATABASE_URL="postgres://batch_meterd@127.0.0.1:$PORT/pm_batch" POLAR_METER_LISTEN=127.0.0.1:18798 \
    LOG_FORMAT=json RUST_LOG=warn target/perf/polar-meterd serve >"$OUT/sidecar.log" 2>&1 &
SIDE=$!
wait_http http://127.0.0.1:18798/readyz

ROWS=()
for c in "${CLIENTS[@]}"; do
    "${PSQL[@]}" -c CHECKPOINT
    dir=$(mktemp -d -p "$OUT") && chmod 777 "$dir"
    (cd "$dir" && $B/pgbench "${H[@]}" -n -M prepared -c "$c" -j 2 -T "$SECS" -l \
        -f "$OLDPWD/tests/bench/insert10.sql" pm_batch >"$dir/out" 2>&1)
    tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$dir/out")
    base=$(awk -v t="$tps" 'BEGIN{printf "%.0f", t*10}')
    base_p99=$(cat "$dir"/pgbench_log.* | awk '{print $3}' | pct 99)
    for size in "${SIZES[@]}"; do
        "${PSQL[@]}" -c CHECKPOINT
        before=$(rows)
        out=$(PM_KEY=$KEY PM_TS=$TS PM_RUN="b$c-$size-$RANDOM$RANDOM" PM_SIZE=$size wrk -t 2 -c "$c" -d "${SECS}s" \
            --latency --timeout 30s -s tests/bench/batch.lua "http://127.0.0.1:18798/api/v1/meter/batch")
        added=$(( $(rows) - before ))
        rps=$(echo "$out" | sed -n 's/^Requests\/sec: *\([0-9.]*\).*/\1/p')
        reqs=$(echo "$out" | sed -n 's/^ *\([0-9]*\) requests in.*/\1/p')
        bad=$(echo "$out" | sed -n 's/.*Non-2xx or 3xx responses: *\([0-9]*\).*/\1/p' | grep . || echo 0)
        p99=$(echo "$out" | awk '$1=="99%"{print $2}' | to_ms)
        evs=$(awk -v r="$rps" -v s="$size" 'BEGIN{printf "%.0f", r*s}')
        [ "$bad" = 0 ] && [ "$added" -ge $((reqs * size)) ] || { echo "batch run lost events: $bad non-2xx, $reqs requests of $size, $added rows" >&2; exit 1; }
        ratio=$(awk -v a="$evs" -v b="$base" 'BEGIN{printf "%.2f", a/b}')
        echo "clients=$c size=$size http=$evs ev/s pgbench10=$base ev/s ratio=$ratio rows=$added"
        ROWS+=("| $c | $base | $base_p99 | $size | **$evs** | $p99 | $ratio× | $((reqs * size)) / $added |")
    done
done
RSS=$(rss_mib "$SIDE")
{
    echo "<!-- batch:start -->"
    echo "Measured $(date -u +%Y-%m-%d) on this machine ($(nproc) cores), PostgreSQL 15 with fsync and synchronous_commit on, ${SECS} s per run, pgbench and wrk each with 2 threads, the sidecar with its defaults."
    echo "Command: \`tests/bench/batch.sh $SECS ${CLIENTS[*]}\` (also \`make bench\`)."
    echo
    echo "| clients | pgbench, 10 events + 10 audit rows per tx, events/s | p99 ms (per tx) | batch size | HTTP \`POST /api/v1/meter/batch\` events/s | p99 ms (per request) | HTTP / pgbench | events sent / rows added |"
    echo "|---|---|---|---|---|---|---|---|"
    printf '%s\n' "${ROWS[@]}"
    echo
    echo "Sidecar peak RSS (VmHWM): **$RSS MiB**."
    echo "<!-- batch:end -->"
} >"$OUT/section.md"
write_section batch "$OUT/section.md"
