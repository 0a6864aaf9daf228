#!/usr/bin/env bash
# This release's sidecar against 0.3.0's, head to head: both run at once
# against one durable database of this release (a 0.3.0 sidecar is served by
# it: the rolling-upgrade window), and wrk drives POST /api/v1/meter at
# each in turn, the order alternating by repeat, so that both meet the same
# table sizes, checkpoints and neighbours on this shared machine. Each sidecar
# warms up for WARMUP seconds first (a fresh process' first seconds are slower,
# see BENCHMARKS.md). Medians of the repeats.
#   usage: tests/bench/sidecars.sh [seconds per run] [repeats] [clients] [warmup seconds]
set -euo pipefail
cd "$(dirname "$0")/../.."
. tests/bench/lib.sh
SECS=${1:-15}
REPEATS=${2:-5}
C=${3:-32}
WARMUP=${4:-30}
PORT=55444
OUT=$(mktemp -d)

bench_build
scripts/compat-sidecar.sh perf
OLD=target/compat/polar-meterd-0.3.0-perf
cleanup() {
    kill ${NEW_PID:-} ${OLD_PID:-} 2>/dev/null || true
    scripts/cluster.sh stop sidecars || true
}
trap cleanup EXIT
bench_cluster sidecars $PORT pm_sidecars
KEY=$(bench_acme_key)
TS=$(date -u -d '-1 minute' +%Y-%m-%dT%H:%M:%SZ)
BODY="{\"event_name\":\"api.request\",\"event_timestamp\":\"$TS\",\"metadata\":{\"tokens\":12,\"model\":\"m\"}}"
start() { # binary port -> pid
    DATABASE_URL="postgres://sidecars_meterd@127.0.0.1:$PORT/pm_sidecars" POLAR_METER_LISTEN=127.0.0.1:$2 \
        POLAR_METER_ADMIN_LISTEN=127.0.0.1:0 LOG_FORMAT=json RUST_LOG=warn "$1" serve >>"$OUT/side-$2.log" 2>&1 &
    echo $!
}
NEW_PID=$(start target/perf/polar-meterd 18801)
OLD_PID=$(start "$OLD" 18802)
wait_http http://127.0.0.1:18801/readyz
wait_http http://127.0.0.1:18802/readyz
run() { # port seconds -> events/s
    "${PSQL[@]}" -c CHECKPOINT
    PM_KEY=$KEY PM_BODY=$BODY PM_RUN="s$1-$RANDOM$RANDOM" PM_DELAY_MS=0 \
        wrk -t 2 -c "$C" -d "${2}s" -s tests/bench/meter.lua "http://127.0.0.1:$1/api/v1/meter" |
        sed -n 's/^Requests\/sec: *\([0-9.]*\).*/\1/p'
}
run 18801 "$WARMUP" >/dev/null
run 18802 "$WARMUP" >/dev/null
for r in $(seq "$REPEATS"); do
    if ((r % 2)); then n=$(run 18801 "$SECS"); o=$(run 18802 "$SECS"); else o=$(run 18802 "$SECS"); n=$(run 18801 "$SECS"); fi
    echo "$r $n $o" | tee -a "$OUT/runs"
done
N=$(awk '{print $2}' "$OUT/runs" | median) O=$(awk '{print $3}' "$OUT/runs" | median)
cat >"$OUT/section" <<MD
<!-- sidecars:start -->
## This sidecar against 0.3.0's, head to head ($(date -u +%Y-%m-%d))

\`tests/bench/sidecars.sh $SECS $REPEATS $C $WARMUP\`: both sidecars at once against one
durable database of this release, wrk (2 threads, $C connections, ${SECS} s a run)
driving \`POST /api/v1/meter\` at each in turn, the order alternating; each sidecar
warmed up for ${WARMUP} s first. Events/s, median of $REPEATS:

| sidecar | events/s | runs |
|---|---|---|
| 0.4 | **$(printf %.0f "$N")** ($(awk -v a="$N" -v b="$O" 'BEGIN{printf "%+.0f%%", (a/b-1)*100}')) | $(awk '{printf "%s%.0f", (NR>1?", ":""), $2}' "$OUT/runs") |
| 0.3.0 | $(printf %.0f "$O") | $(awk '{printf "%s%.0f", (NR>1?", ":""), $3}' "$OUT/runs") |
<!-- sidecars:end -->
MD
write_section sidecars "$OUT/section"
cat "$OUT/section"
