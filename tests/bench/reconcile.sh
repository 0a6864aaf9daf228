#!/usr/bin/env bash
# Reconciliation at scale (target: compute_drift over 1M events finishes in
# seconds). 1M sent events over 100 orgs and a 24 h window, Polar's list of
# them (less 1%) already handed back; times meter.reconcile_finish (drift,
# missing/unexpected by id, polar_event_id write-back) and compute_drift alone.
#   usage: tests/bench/reconcile.sh [events]
set -euo pipefail
cd "$(dirname "$0")/../.."
. tests/bench/lib.sh
N=${1:-1000000}
PORT=55442
B=/usr/lib/postgresql/15/bin
PSQL=(psql -h 127.0.0.1 -p $PORT -U postgres -X -q -v ON_ERROR_STOP=1 -d pm_rec)
OUT=$(mktemp -d)

scripts/deps.sh
cargo pgrx install -p polar_meter --profile perf --pg-config $B/pg_config >/dev/null
trap 'scripts/cluster.sh stop rec || true' EXIT
scripts/cluster.sh destroy rec
scripts/cluster.sh start rec $PORT postgres durable
psql -h 127.0.0.1 -p $PORT -U postgres -X -q -c "CREATE DATABASE pm_rec"
"${PSQL[@]}" -c "CREATE EXTENSION polar_meter" 2>/dev/null
# Bench data straight into the tables (record_event's cost is measured elsewhere).
"${PSQL[@]}" <<SQL
INSERT INTO meter.organization (id, name) SELECT 'org' || i, 'Org ' || i FROM generate_series(1, 100) i;
INSERT INTO meter.meter_event (organization_id, idempotency_key, event_name, event_timestamp, metadata, payload_hash,
                               external_id, polar_status, sent_at)
SELECT 'org' || (1 + i % 100), 'k' || i, (ARRAY['api.request', 'tokens.used', 'job.run'])[1 + i % 3],
       '2026-01-01T00:00:00Z'::timestamptz + (i % 86400) * interval '1 second', '{}', '\x00', 'x' || i, 'sent', now()
FROM generate_series(1, $N) i;
INSERT INTO meter.reconcile_run (window_start, window_end, status) VALUES ('2026-01-01T00:00:00Z', '2026-01-02T00:00:00Z', 'running');
INSERT INTO meter.reconcile_remote (run_id, polar_event_id, meter_event_id, external_customer_id, event_name, event_timestamp)
SELECT 1, gen_random_uuid()::text, e.id, e.organization_id, e.event_name, e.event_timestamp
FROM meter.meter_event e WHERE hashtext(e.idempotency_key) % 100 <> 0;
VACUUM ANALYZE meter.meter_event;
VACUUM ANALYZE meter.reconcile_remote;
SQL
T0=$(date +%s.%N)
RESULT=$("${PSQL[@]}" -tAc "SELECT jsonb_build_object('local_sent', r->'local_sent', 'drift', r->'drift', 'missing', r->'missing_at_polar'->'count') FROM meter.reconcile_finish(1) r" 2>/dev/null)
T1=$(date +%s.%N)
FINISH=$(awk -v a="$T0" -v b="$T1" 'BEGIN{printf "%.1f", b-a}')
# compute_drift alone, on the per-customer, per-name counts of those 1M events.
T0=$(date +%s.%N)
"${PSQL[@]}" -tAc "WITH l AS (SELECT organization_id o, event_name n, count(*) c FROM meter.meter_event GROUP BY 1, 2),
  lj AS (SELECT jsonb_object_agg(o, names) j FROM (SELECT o, jsonb_object_agg(n, c) names FROM l GROUP BY o) x)
  SELECT (meter.compute_drift(lj.j, lj.j))->'drift' FROM lj" >/dev/null
T1=$(date +%s.%N)
DRIFT=$(awk -v a="$T0" -v b="$T1" 'BEGIN{printf "%.2f", b-a}')
echo "events=$N reconcile_finish=${FINISH}s compute_drift(with aggregation)=${DRIFT}s result=$RESULT"
{
    echo "<!-- reconcile:start -->"
    echo "Measured $(date -u +%Y-%m-%d), durable cluster, optimised build. Command: \`tests/bench/reconcile.sh $N\` (also \`make bench\`)."
    echo
    echo "| events in the window | \`reconcile_finish\` (drift, missing/unexpected by id, polar_event_id write-back) | \`compute_drift\` incl. aggregating the 1M rows | result |"
    echo "|---|---|---|---|"
    echo "| $N | ${FINISH} s | ${DRIFT} s | \`$RESULT\` |"
    echo "<!-- reconcile:end -->"
} >"$OUT/section.md"
write_section reconcile "$OUT/section.md"
