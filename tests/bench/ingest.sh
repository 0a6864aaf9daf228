#!/usr/bin/env bash
# Single-event ingest (targets: POST /api/v1/meter >= 1.5x pgbench's
# one-event-per-transaction INSERT + audit row at 32 clients, both durable;
# p99 < 10 ms at half that rate; sidecar RSS <= 64 MiB). In one run, against
# a durable cluster of its own, for each client count and each repeat:
#   pgbench  INSERT meter_event + audit row, one event per transaction (the baseline)
#   wrk      POST /api/v1/meter via polar-meterd (group commit)
#   pgbench  SELECT meter.record_event(...), one per transaction
# then a paced run at half the 32-client HTTP rate, for its latency. Reports
# medians of the repeats (paired: each repeat runs all three back to back,
# the baseline and HTTP taking turns going first).
#   usage: tests/bench/ingest.sh [seconds per run] [repeats] [client counts...]
set -euo pipefail
cd "$(dirname "$0")/../.."
. tests/bench/lib.sh
SECS=${1:-15}
# Five paired repeats: on this shared 2-core machine HTTP runs of one setting
# differ by up to a fifth (every ratio is printed), and a median of five is steadier.
REPEATS=${2:-5}
shift 2 || true
read -r -a CLIENTS <<<"${*:-8 32 64}"
PORT=55440
H=(-h 127.0.0.1 -p $PORT -U postgres)
OUT=$(mktemp -d)
chmod 777 "$OUT"

bench_build
cleanup() {
    [ -n "${SIDE:-}" ] && kill "$SIDE" 2>/dev/null || true
    scripts/cluster.sh stop bench || true
}
trap cleanup EXIT
bench_cluster bench $PORT pm_bench
KEY=$(bench_acme_key)
TS=$(date -u -d '-1 minute' +%Y-%m-%dT%H:%M:%SZ)
BODY="{\"event_name\":\"api.request\",\"event_timestamp\":\"$TS\",\"metadata\":{\"tokens\":12,\"model\":\"m\"}}"
rows() { "${PSQL[@]}" -tAc "SELECT count(*) FROM meter.meter_event"; }

pgb() { # script clients -> "tps p50_ms p99_ms"
    local script=$1 c=$2 dir
    dir=$(mktemp -d -p "$OUT")
    chmod 777 "$dir"
    "${PSQL[@]}" -c CHECKPOINT
    (cd "$dir" && $B/pgbench "${H[@]}" -n -M prepared -c "$c" -j 2 -T "$SECS" -l -D key="$KEY" -D ts="$TS" \
        -f "$OLDPWD/tests/bench/$script" pm_bench >"$dir/out" 2>&1)
    grep -q "aborted" "$dir/out" && { cat "$dir/out" >&2; exit 1; }
    echo "$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$dir/out") $(cat "$dir"/pgbench_log.* | awk '{print $3}' | pct 50) $(cat "$dir"/pgbench_log.* | awk '{print $3}' | pct 99)"
}

http() { # clients [delay ms] -> "rps p50_ms p99_ms non2xx requests rows_added"
    local c=$1 pause=${2:-0} before after out
    "${PSQL[@]}" -c CHECKPOINT
    before=$(rows)
    out=$(PM_KEY=$KEY PM_BODY=$BODY PM_RUN="r$c-$RANDOM$RANDOM" PM_DELAY_MS=$pause wrk -t 2 -c "$c" -d "${SECS}s" \
        --latency -s tests/bench/meter.lua "http://127.0.0.1:18799/api/v1/meter")
    after=$(rows)
    echo "$(echo "$out" | sed -n 's/^Requests\/sec: *\([0-9.]*\).*/\1/p') \
$(echo "$out" | awk '$1=="50%"{print $2}' | to_ms) $(echo "$out" | awk '$1=="99%"{print $2}' | to_ms) \
$(echo "$out" | sed -n 's/.*Non-2xx or 3xx responses: *\([0-9]*\).*/\1/p' | grep . || echo 0) \
$(echo "$out" | sed -n 's/^ *\([0-9]*\) requests in.*/\1/p') $((after - before))"
}

# One side of a pair each, into the variables the loop below reports.
baseline_run() { read -r i_tps i_p50 i_p99 < <(pgb insert.sql "$1"); }
http_run() { read -r h_rps h_p50 h_p99 h_bad h_total h_rows < <(http "$1"); }

DATABASE_URL="postgres://bench_meterd@127.0.0.1:$PORT/pm_bench" POLAR_METER_LISTEN=127.0.0.1:18799 \
    LOG_FORMAT=json RUST_LOG=warn target/perf/polar-meterd serve >"$OUT/sidecar.log" 2>&1 &
SIDE=$!
wait_http http://127.0.0.1:18799/readyz

for r in $(seq "$REPEATS"); do
    for c in "${CLIENTS[@]}"; do
        # The pair in alternating order, so that neither side always meets
        # the larger table (nothing is truncated between runs) or the later
        # moment of the shared VM.
        if ((r % 2)); then baseline_run "$c"; http_run "$c"; else http_run "$c"; baseline_run "$c"; fi
        read -r f_tps f_p50 f_p99 < <(pgb record_event.sql "$c")
        [ "$h_bad" = 0 ] && [ "$h_total" -le "$h_rows" ] || { echo "HTTP run lost events: $h_bad non-2xx, $h_total requests, $h_rows rows" >&2; exit 1; }
        echo "$c $r $i_tps $i_p50 $i_p99 $h_rps $h_p50 $h_p99 $f_tps $f_p50 $f_p99 $h_total $h_rows" | tee -a "$OUT/runs"
    done
done

# One row per client count: medians over the repeats, and the ratio range.
ROWS=()
for c in "${CLIENTS[@]}"; do
    col() { awk -v c="$c" -v k="$1" '$1==c {print $k}' "$OUT/runs" | median; }
    ratios=$(awk -v c="$c" '$1==c {printf "%.2f\n", $6/$3}' "$OUT/runs" | sort -g | tr '\n' ' ')
    ratio=$(awk -v c="$c" '$1==c {print $6/$3}' "$OUT/runs" | median)
    ROWS+=("| $c | $(col 3) | $(col 4) / $(col 5) | $(col 6) | $(col 7) / $(col 8) | **$(printf %.2f "$ratio")×** ($ratios) | $(col 9) | $(col 10) / $(col 11) | $(awk -v c="$c" '$1==c {r+=$12; w+=$13} END {print r " / " w}' "$OUT/runs") |")
done

# Half the 32-client HTTP rate, paced, for its latency.
HALF_C=32
FULL=$(awk -v c=$HALF_C '$1==c {print $6}' "$OUT/runs" | median)
PAUSE=$(awk -v c=$HALF_C -v r="$FULL" 'BEGIN{d=int(1000*c/(r/2) - 1); print (d < 1) ? 1 : d}')
read -r p_rps p_p50 p_p99 p_bad p_total p_rows < <(http $HALF_C "$PAUSE")
echo "paced: target $(awk -v r="$FULL" 'BEGIN{print r/2}')/s, got $p_rps/s, p50 $p_p50 ms, p99 $p_p99 ms"
RSS=$(rss_mib "$SIDE")

{
    echo "<!-- ingest:start -->"
    echo "Measured $(date -u +%Y-%m-%d) on this machine ($(nproc) cores, $(free -g | awk '/Mem/{print $2}') GiB), PostgreSQL 15 with fsync and synchronous_commit on, ${SECS} s per run, $REPEATS paired repeats (the baseline first in odd repeats, HTTP first in even ones; medians shown, the ratio of every repeat in brackets), pgbench and wrk each with 2 threads, the sidecar with its defaults."
    echo "Command: \`tests/bench/ingest.sh $SECS $REPEATS ${CLIENTS[*]}\` (also \`make bench\`)."
    echo
    echo "| clients | pgbench INSERT + audit, 1 event/tx, tx/s | p50 / p99 ms | HTTP \`POST /api/v1/meter\` events/s | p50 / p99 ms | HTTP / INSERT | pgbench \`record_event()\` tx/s | p50 / p99 ms | HTTP requests / rows added |"
    echo "|---|---|---|---|---|---|---|---|---|"
    printf '%s\n' "${ROWS[@]}"
    echo
    echo "Paced at half the 32-client HTTP rate ($(printf %.0f "$(awk -v r="$FULL" 'BEGIN{print r/2}')")/s asked, 32 connections, a ${PAUSE} ms pause before each request): **$p_rps events/s, p50 $p_p50 ms, p99 $p_p99 ms** (target p99 < 10 ms), $p_bad non-2xx."
    echo
    echo "Sidecar peak RSS (VmHWM) over all HTTP runs: **$RSS MiB** (target ≤ 64 MiB)."
    echo "<!-- ingest:end -->"
} >"$OUT/section.md"
write_section ingest "$OUT/section.md"
