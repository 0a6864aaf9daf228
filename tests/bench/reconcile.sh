#!/usr/bin/env bash
# Reconciliation at scale (targets: a clean 1M-event day over 100 customers
# with one event name each reconciled in <= 200 Polar requests; a day with 1%
# missing at Polar still names every missing event), end to end: 1M events
# recorded (set-based, with their audit rows) over 100 organizations in one
# past day, delivered by a sidecar to the emulator, then reconciled by the
# sidecar in counts mode, clean; then with every 100th event forgotten by the
# emulator. Polar's requests are counted by the emulator. The sidecar's rate
# budget is raised so that the time shown is our own; the time Polar's
# production limit would add is requests / 450 per minute.
# Also measures storage: bytes per event of meter_event and audit_log.
#   usage: tests/bench/reconcile.sh [events] [organizations]
set -euo pipefail
cd "$(dirname "$0")/../.."
. tests/bench/lib.sh
N=${1:-1000000}
ORGS=${2:-100}
PORT=55442
OUT=$(mktemp -d)

bench_build
cleanup() {
    for p in ${SIDE:-} ${EMU:-}; do kill "$p" 2>/dev/null || true; done
    scripts/cluster.sh stop rec || true
}
trap cleanup EXIT
bench_cluster rec $PORT pm_rec
"${PSQL[@]}" -c "SELECT cron.unschedule(jobid) FROM cron.job" >/dev/null
DAY_END=$(date -u +%Y-%m-%dT00:00:00Z)
"${PSQL[@]}" <<SQL >/dev/null
SELECT meter.upsert_organization('org' || i, 'Org ' || i, 'org' || i || '@example.org') FROM generate_series(1, $ORGS) i;
DO \$\$
BEGIN
    FOR c IN 0 .. ($N - 1) / 1000 LOOP
        PERFORM meter.record_events_for_org('org' || (1 + c % $ORGS),
            (SELECT jsonb_agg(jsonb_build_object('idempotency_key', 'k' || i, 'event_name', 'api.request',
                    'event_timestamp', timestamptz '$DAY_END' - interval '1 day' + (i % 86000) * interval '1 second',
                    'metadata', jsonb_build_object('tokens', i % 1000)))
             FROM generate_series(c * 1000 + 1, least((c + 1) * 1000, $N)) i));
        COMMIT;
    END LOOP;
END
\$\$;
SQL
echo "recorded $N events"
TOKEN=polar_oat_reconcile_benchmark_0000000000000000000
target/perf/polar-emulator --listen 127.0.0.1:18791 --tokens $TOKEN --rate-limit 1000000 >"$OUT/emu.log" 2>&1 &
EMU=$!
wait_http http://127.0.0.1:18791/__admin/stats
DATABASE_URL="postgres://rec_meterd@127.0.0.1:$PORT/pm_rec" POLAR_METER_LISTEN=127.0.0.1:18792 LOG_FORMAT=json RUST_LOG=warn \
    POLAR_ACCESS_TOKEN=$TOKEN POLAR_API_URL=http://127.0.0.1:18791 POLAR_RATE_LIMIT=1000000 \
    target/perf/polar-meterd serve >"$OUT/side.log" 2>&1 &
SIDE=$!
T0=$(date +%s.%N)
until [ "$("${PSQL[@]}" -tAc "SELECT count(*) FROM meter.meter_event WHERE polar_status = 'sent'")" -ge "$N" ]; do
    sleep 1
    kill -0 $SIDE || { tail "$OUT/side.log"; exit 1; }
done
echo "delivered in $(secs_since "$T0") s"

# Storage, with the audit chain sealed.
"${PSQL[@]}" -c "SELECT meter.seal_audit_log(2000000)" -c "VACUUM ANALYZE meter.meter_event" -c "VACUUM ANALYZE meter.audit_log" >/dev/null
read -r EV_BYTES AU_BYTES AU_ROWS < <("${PSQL[@]}" -tA -F ' ' -c "SELECT pg_total_relation_size('meter.meter_event'),
    pg_total_relation_size('meter.audit_log'), (SELECT count(*) FROM meter.audit_log)")

lists() { curl -s http://127.0.0.1:18791/__admin/stats | python3 -c 'import json,sys; print(json.load(sys.stdin)["requests"].get("GET /v1/events/ 200", 0))'; }
run() { # mode -> "requests seconds result_json"
    local before id t0 status
    before=$(lists)
    t0=$(date +%s.%N)
    id=$("${PSQL[@]}" -tAc "SELECT meter.reconcile_meter_to_polar('$DAY_END', '24 hours', '$1')")
    until status=$("${PSQL[@]}" -tAc "SELECT status FROM meter.reconcile_run WHERE id = $id") && [ "$status" = done ]; do
        [ "$status" = failed ] && { "${PSQL[@]}" -tAc "SELECT last_error FROM meter.reconcile_run WHERE id = $id" >&2; exit 1; }
        sleep 0.5
    done
    echo "$(( $(lists) - before )) $(secs_since "$t0") $id"
}
read -r CLEAN_REQ CLEAN_S CLEAN_ID < <(run counts)
CLEAN=$("${PSQL[@]}" -tAc "SELECT jsonb_build_object('local_sent', result->'local_sent', 'drift', drift, 'missing', result#>'{missing_at_polar,count}', 'pairs_listed', result->'pairs_listed') FROM meter.reconcile_run WHERE id = $CLEAN_ID")
echo "clean: $CLEAN_REQ requests, ${CLEAN_S}s, $CLEAN"

curl -s -X DELETE "http://127.0.0.1:18791/__admin/events?every=100" >"$OUT/forgotten.json"
FORGOT=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["removed"])' "$OUT/forgotten.json")
read -r GAP_REQ GAP_S GAP_ID < <(run counts)
GAP=$("${PSQL[@]}" -tAc "SELECT jsonb_build_object('local_sent', result->'local_sent', 'drift', drift, 'missing', result#>'{missing_at_polar,count}', 'pairs_listed', result->'pairs_listed') FROM meter.reconcile_run WHERE id = $GAP_ID")
# Every forgotten event is named among the run's findings, and nothing else is.
python3 -c 'import json,sys; print("\n".join(sorted(json.load(open(sys.argv[1]))["meter_event_ids"])))' "$OUT/forgotten.json" >"$OUT/forgotten.txt"
"${PSQL[@]}" -tAc "SELECT event_id FROM meter.reconcile_finding WHERE run_id = $GAP_ID AND kind = 'missing_at_polar' ORDER BY 1" | sort >"$OUT/found.txt"
NAMED=$(comm -12 "$OUT/forgotten.txt" "$OUT/found.txt" | wc -l)
EXTRA=$(comm -13 "$OUT/forgotten.txt" "$OUT/found.txt" | wc -l)
echo "1% missing: forgot $FORGOT, $GAP_REQ requests, ${GAP_S}s, named $NAMED of them (+$EXTRA others), $GAP"
[ "$NAMED" = "$FORGOT" ] && [ "$EXTRA" = 0 ] || { echo "the run did not name exactly the forgotten events" >&2; exit 1; }

at_polar() { awk -v r="$1" 'BEGIN{printf "%.0f", r / 450 * 60}'; }
per() { awk -v b="$1" -v n="$2" 'BEGIN{printf "%.0f", b / n}'; }
{
    echo "<!-- reconcile:start -->"
    echo "Measured $(date -u +%Y-%m-%d), durable cluster, optimised builds, against the emulator. Command: \`tests/bench/reconcile.sh $N $ORGS\` (also \`make bench\`)."
    echo
    echo "| day | Polar list requests | time (our side) | + time at Polar's limit (450/min) | result |"
    echo "|---|---|---|---|---|"
    echo "| clean, $N events, $ORGS customers, one event name each | **$CLEAN_REQ** | ${CLEAN_S} s | $(at_polar "$CLEAN_REQ") s | \`$CLEAN\` |"
    echo "| 1% missing ($FORGOT forgotten by Polar) | $GAP_REQ | ${GAP_S} s | $(at_polar "$GAP_REQ") s | \`$GAP\`; **every one of the $FORGOT named** in \`meter.reconcile_finding\`, nothing else |"
    echo
    echo "A clean day costs one count per (customer, event name) plus one for the window; a day where every customer lost events is listed in full (1 request per 100 events)."
    echo "<!-- reconcile:end -->"
    echo
    echo "<!-- storage:start -->"
    echo "After the reconcile benchmark above (same command): $N events of $ORGS organizations, recorded set-based, sent, matched with their Polar ids, audit chain sealed."
    echo
    echo "| table, with its indexes | bytes | rows | bytes per row | per 1M events |"
    echo "|---|---|---|---|---|"
    echo "| \`meter.meter_event\` | $EV_BYTES | $N | $(per "$EV_BYTES" "$N") | $(awk -v b="$EV_BYTES" -v n="$N" 'BEGIN{printf "%.0f MiB", b/n*1e6/1048576}') |"
    echo "| \`meter.audit_log\` | $AU_BYTES | $AU_ROWS | $(per "$AU_BYTES" "$AU_ROWS") | $(awk -v b="$AU_BYTES" -v n="$N" 'BEGIN{printf "%.0f MiB", b/n*1e6/1048576}') |"
    echo "<!-- storage:end -->"
} >"$OUT/section.md"
# Two sections from one run.
awk '/<!-- reconcile:start -->/,/<!-- reconcile:end -->/' "$OUT/section.md" >"$OUT/reconcile.md"
awk '/<!-- storage:start -->/,/<!-- storage:end -->/' "$OUT/section.md" >"$OUT/storage.md"
write_section reconcile "$OUT/reconcile.md"
write_section storage "$OUT/storage.md"
