#!/usr/bin/env bash
# Ingest benchmark (target: HTTP ingest >= 60% of pgbench running the same
# INSERT at the same client count, both durable; sidecar RSS <= 64 MiB).
# Runs in one go on one machine, against a durable cluster of its own:
#   pgbench  INSERT meter_event + audit row      (the baseline)
#   pgbench  SELECT meter.record_event(...)      (the extension alone)
#   wrk      POST /api/v1/meter via polar-meterd (the product)
# and writes the table into BENCHMARKS.md between its ingest markers.
#   usage: tests/bench/ingest.sh [seconds per run] [client counts...]
set -euo pipefail
cd "$(dirname "$0")/../.."
. tests/bench/lib.sh
SECS=${1:-15}
shift || true
CLIENTS=("${@:-8 32 64}")
read -r -a CLIENTS <<<"${CLIENTS[*]}"
PORT=55440
B=/usr/lib/postgresql/15/bin
H=(-h 127.0.0.1 -p $PORT -U postgres)
PSQL=(psql "${H[@]}" -X -q -v ON_ERROR_STOP=1 -d pm_bench)
OUT=$(mktemp -d)

scripts/deps.sh
command -v wrk >/dev/null || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q wrk; }
cargo build -q -p polar-meterd --profile perf
cargo pgrx install -p polar_meter --profile perf --pg-config $B/pg_config >/dev/null

cleanup() {
    [ -n "${SIDE:-}" ] && kill "$SIDE" 2>/dev/null || true
    scripts/cluster.sh stop bench || true
}
trap cleanup EXIT
scripts/cluster.sh destroy bench
scripts/cluster.sh start bench $PORT postgres durable
psql "${H[@]}" -X -q -c "CREATE DATABASE pm_bench"
"${PSQL[@]}" -c "CREATE EXTENSION polar_meter" -c "INSERT INTO meter.organization VALUES ('acme', 'Acme')" \
    -c "CREATE ROLE bench_meterd LOGIN IN ROLE polar_meter_sidecar" 2>/dev/null
KEY=$("${PSQL[@]}" -tAc "SELECT key FROM meter.create_api_key('acme', 'bench')")
TS=$(date -u -d '-1 minute' +%Y-%m-%dT%H:%M:%SZ)
BODY="{\"event_name\":\"api.request\",\"event_timestamp\":\"$TS\",\"metadata\":{\"tokens\":12,\"model\":\"m\"}}"
rows() { "${PSQL[@]}" -tAc "SELECT count(*) FROM meter.meter_event"; }
pct() { sort -n | awk -v p="$1" '{a[NR]=$1} END {i=int(NR*p/100); if (i<1) i=1; printf "%.2f", a[i]/1000}'; }

pgb() { # script clients -> "tps p50_ms p99_ms"
    local script=$1 c=$2 dir
    dir=$(mktemp -d -p "$OUT")
    chmod 777 "$dir"
    "${PSQL[@]}" -c CHECKPOINT
    (cd "$dir" && $B/pgbench "${H[@]}" -n -M prepared -c "$c" -j 2 -T "$SECS" -l -D key="$KEY" -D ts="$TS" \
        -f "$OLDPWD/tests/bench/$script" pm_bench >"$dir/out" 2>&1)
    grep -q "aborted" "$dir/out" && { cat "$dir/out" >&2; exit 1; }
    local tps
    tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$dir/out")
    echo "$tps $(cat "$dir"/pgbench_log.* | awk '{print $3}' | pct 50) $(cat "$dir"/pgbench_log.* | awk '{print $3}' | pct 99)"
}

to_ms() { awk '{v=$1; if (v ~ /us$/) {sub(/us/,"",v); v/=1000} else if (v ~ /ms$/) {sub(/ms/,"",v)} else if (v ~ /s$/) {sub(/s/,"",v); v*=1000}; printf "%.2f", v}'; }

http() { # clients -> "rps p50_ms p99_ms non2xx requests rows_added"
    local c=$1 before after out
    "${PSQL[@]}" -c CHECKPOINT
    before=$(rows)
    out=$(PM_KEY=$KEY PM_BODY=$BODY PM_RUN="r$c-$RANDOM" wrk -t 2 -c "$c" -d "${SECS}s" --latency \
        -s tests/bench/meter.lua "http://127.0.0.1:18799/api/v1/meter")
    after=$(rows)
    local rps p50 p99 non2xx total
    rps=$(echo "$out" | sed -n 's/^Requests\/sec: *\([0-9.]*\).*/\1/p')
    p50=$(echo "$out" | awk '$1=="50%"{print $2}' | to_ms)
    p99=$(echo "$out" | awk '$1=="99%"{print $2}' | to_ms)
    non2xx=$(echo "$out" | sed -n 's/.*Non-2xx or 3xx responses: *\([0-9]*\).*/\1/p')
    total=$(echo "$out" | sed -n 's/^ *\([0-9]*\) requests in.*/\1/p')
    echo "$rps $p50 $p99 ${non2xx:-0} $total $((after - before))"
}

DATABASE_URL="postgres://bench_meterd@127.0.0.1:$PORT/pm_bench" POLAR_METER_LISTEN=127.0.0.1:18799 LOG_FORMAT=json \
    RUST_LOG=warn POLAR_METER_DB_POOL_SIZE=64 target/perf/polar-meterd serve >"$OUT/sidecar.log" 2>&1 &
SIDE=$!
for _ in $(seq 100); do curl -fs http://127.0.0.1:18799/readyz >/dev/null && break; sleep 0.1; done

ROWS=()
for c in "${CLIENTS[@]}"; do
    read -r i_tps i_p50 i_p99 < <(pgb insert.sql "$c")
    read -r h_rps h_p50 h_p99 h_bad h_total h_rows < <(http "$c")
    read -r f_tps f_p50 f_p99 < <(pgb record_event.sql "$c")
    ratio=$(awk -v a="$h_rps" -v b="$i_tps" 'BEGIN{printf "%.0f%%", 100*a/b}')
    fratio=$(awk -v a="$h_rps" -v b="$f_tps" 'BEGIN{printf "%.0f%%", 100*a/b}')
    echo "clients=$c insert=$i_tps/s http=$h_rps/s ($ratio of insert, $fratio of record_event()) record_event=$f_tps/s non2xx=$h_bad requests=$h_total rows=$h_rows"
    ROWS+=("| $c | $i_tps | $i_p50 / $i_p99 | $f_tps | $f_p50 / $f_p99 | $h_rps | $h_p50 / $h_p99 | **$ratio** | $fratio | $h_bad | $h_total / $h_rows |")
done
RSS_KB=$(awk '/VmHWM/{print $2}' /proc/$SIDE/status)
RSS=$(awk -v k="$RSS_KB" 'BEGIN{printf "%.1f", k/1024}')
echo "sidecar peak RSS: $RSS MiB"

{
    echo "<!-- ingest:start -->"
    echo "Measured $(date -u +%Y-%m-%d) on this machine ($(nproc) cores, $(free -g | awk '/Mem/{print $2}') GiB), PostgreSQL 15 with fsync and synchronous_commit on, ${SECS}s per run, pgbench and wrk each with 2 threads, sidecar pool = 64 connections."
    echo "Command: \`tests/bench/ingest.sh $SECS ${CLIENTS[*]}\` (also \`make bench\`)."
    echo
    echo "| clients | pgbench INSERT+audit tx/s | p50 / p99 ms | pgbench record_event() tx/s | p50 / p99 ms | HTTP events/s | p50 / p99 ms | HTTP / INSERT | HTTP / record_event() | non-2xx | HTTP requests / rows added |"
    echo "|---|---|---|---|---|---|---|---|---|---|---|"
    printf '%s\n' "${ROWS[@]}"
    echo
    echo "Sidecar peak RSS (VmHWM) over all HTTP runs: **$RSS MiB** (target ≤ 64 MiB)."
    echo "<!-- ingest:end -->"
} >"$OUT/section.md"
write_section ingest "$OUT/section.md"
