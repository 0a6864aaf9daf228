#!/usr/bin/env bash
# The delivery path against 0.3.0, paired (issue: the typed boundary moved
# Polar's event body from SQL into the sidecar). Two measures, each in runs
# taking turns, medians reported:
#   drain  a backlog of N events (one organization) from the outbox to an
#          unthrottled emulator and back as sent, by one sidecar:
#            0.4    this release's sidecar, a database of this release
#                   (claim_delivery: events as stored; the sidecar encodes)
#            0.3.0  the 0.3.0 sidecar (scripts/compat-sidecar.sh perf), a
#                   database created at 0.3.0 (claim_events: Polar's body
#                   built in SQL)
#   claim  the database's side alone: N events claimed 1000 at a time and
#          reported sent, in one DO block, for 0.4's claim_delivery, for
#          0.4's deprecated claim_events wrapper, and for 0.3.0's claim_events.
# Both 0.3.0 variants run 0.3.0's SQL on this build's library (as an
# upgrade-in-progress database does); the claim path calls no Rust helper.
#   usage: tests/bench/claim.sh [events] [repeats]
set -euo pipefail
cd "$(dirname "$0")/../.."
. tests/bench/lib.sh
N=${1:-100000}
REPEATS=${2:-5}
PORT=55442
EMU_PORT=18796
OUT=$(mktemp -d)
TOKEN=polar_oat_claim_benchmark_0000000000000000000000000

bench_build
scripts/compat-sidecar.sh perf
install -m 644 tests/upgrade/polar_meter--*.sql "$($B/pg_config --sharedir)/extension/"
OLD=target/compat/polar-meterd-0.3.0-perf
cleanup() {
    for p in ${SIDE:-} ${EMU:-}; do kill "$p" 2>/dev/null || true; done
    scripts/cluster.sh stop claim || true
}
trap cleanup EXIT
bench_cluster claim $PORT pm_claim
ADMIN=(psql -h 127.0.0.1 -p $PORT -U postgres -X -q -v ON_ERROR_STOP=1)

# fresh DB VERSION: a database with the extension at VERSION, organization
# acme and a backlog of N events.
fresh() {
    "${ADMIN[@]}" -d postgres -c "DROP DATABASE IF EXISTS $1" -c "CREATE DATABASE $1"
    "${ADMIN[@]}" -d "$1" -c "CREATE EXTENSION polar_meter VERSION '$2'" \
        -c "SELECT meter.upsert_organization('acme', 'Acme', 'billing@acme.example')" >/dev/null
    "${ADMIN[@]}" -d "$1" >/dev/null <<SQL
DO \$\$
BEGIN
    FOR c IN 0 .. ($N - 1) / 1000 LOOP
        PERFORM meter.record_events_for_org('acme',
            (SELECT jsonb_agg(jsonb_build_object('idempotency_key', 'c-' || i, 'event_name', 'api.request',
                    'event_timestamp', now() - interval '1 minute', 'metadata', jsonb_build_object('i', i, 'model', 'm' || i % 7)))
             FROM generate_series(c * 1000 + 1, least((c + 1) * 1000, $N)) i));
    END LOOP;
END
\$\$;
SQL
    "${ADMIN[@]}" -d "$1" -c "VACUUM ANALYZE" -c CHECKPOINT
}

sent() { "${ADMIN[@]}" -d "$1" -tAc "SELECT count(*) FROM meter.meter_event WHERE polar_status = 'sent'"; }

drain() { # binary database -> events/s
    local bin=$1 db=$2 t0
    target/perf/polar-emulator --listen 127.0.0.1:$EMU_PORT --tokens $TOKEN --rate-limit 1000000 >"$OUT/emu.log" 2>&1 &
    EMU=$!
    wait_http http://127.0.0.1:$EMU_PORT/__admin/stats
    t0=$(date +%s.%N)
    DATABASE_URL="postgres://claim_meterd@127.0.0.1:$PORT/$db" POLAR_METER_LISTEN=127.0.0.1:0 \
        POLAR_METER_ADMIN_LISTEN=127.0.0.1:0 LOG_FORMAT=json RUST_LOG=warn \
        POLAR_ACCESS_TOKEN=$TOKEN POLAR_API_URL=http://127.0.0.1:$EMU_PORT POLAR_RATE_LIMIT=100000 \
        "$bin" serve >"$OUT/side.log" 2>&1 &
    SIDE=$!
    until [ "$(sent "$db")" -ge "$N" ]; do sleep 0.1; done
    local secs
    secs=$(secs_since "$t0")
    kill "$SIDE" "$EMU"; wait "$SIDE" "$EMU" 2>/dev/null || true
    SIDE= EMU=
    awk -v n="$N" -v s="$secs" 'BEGIN{printf "%.0f", n/s}'
}

claim() { # database function -> events/s through claim + delivery_sent, SQL only
    "${ADMIN[@]}" -d "$1" -tA <<SQL | tail -1
UPDATE meter.organization SET polar_customer_id = 'cus_acme' WHERE id = 'acme';
UPDATE meter.meter_event SET polar_customer_id = 'cus_acme';
CREATE TEMP TABLE t (started timestamptz);
INSERT INTO t VALUES (clock_timestamp());
DO \$\$
DECLARE
    b uuid;
    ids uuid[];
BEGIN
    LOOP
        SELECT min(c.batch_id::text)::uuid, array_agg(c.event_id) INTO b, ids
        FROM meter.$2('acme', 1000, '1 minute') c;
        EXIT WHEN b IS NULL;
        PERFORM meter.delivery_sent('acme', b, ids);
    END LOOP;
END
\$\$;
SELECT round($N / extract(epoch FROM clock_timestamp() - started)) FROM t;
SQL
}

for r in $(seq "$REPEATS"); do
    fresh pm_new 0.4.0
    fresh pm_old 0.3.0
    if ((r % 2)); then
        new=$(drain target/perf/polar-meterd pm_new); old=$(drain "$OLD" pm_old)
    else
        old=$(drain "$OLD" pm_old); new=$(drain target/perf/polar-meterd pm_new)
    fi
    fresh pm_new 0.4.0
    fresh pm_old 0.3.0
    fresh pm_wrap 0.4.0
    c_new=$(claim pm_new claim_delivery)
    c_wrap=$(claim pm_wrap claim_events)
    c_old=$(claim pm_old claim_events)
    echo "$r $new $old $c_new $c_wrap $c_old" | tee -a "$OUT/runs"
done

col() { awk -v c="$1" '{print $c}' "$OUT/runs" | median; }
list() { awk -v c="$1" '{printf "%s%s", (NR>1?", ":""), $c}' "$OUT/runs"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%+.0f%%", (a/b-1)*100}'; }
D_NEW=$(col 2) D_OLD=$(col 3) C_NEW=$(col 4) C_WRAP=$(col 5) C_OLD=$(col 6)
cat >"$OUT/section" <<MD
<!-- claim:start -->
## The delivery path against 0.3.0, paired ($(date -u +%Y-%m-%d))

\`tests/bench/claim.sh $N $REPEATS\`: a backlog of $N events of one organization, on a
durable cluster of its own, each run on a fresh database; the variants take turns.
**drain**: one sidecar moves the backlog to an unthrottled emulator and reports it sent
(events/s from the sidecar's start to the last \`sent\`). **claim**: the database's side
alone, 1000 events claimed and reported sent at a time in one DO block. 0.3.0 is its
sidecar (\`scripts/compat-sidecar.sh perf\`) on a database created at 0.3.0 (Polar's body
built in SQL by its \`claim_events\`), on this build's library.

| measure | 0.4 | 0.3.0 | 0.4 against 0.3.0 | runs (0.4; 0.3.0) |
|---|---|---|---|---|
| drain, events/s | **$D_NEW** | $D_OLD | $(ratio "$D_NEW" "$D_OLD") | $(list 2); $(list 3) |
| claim + report in SQL, events/s | **$C_NEW** (\`claim_delivery\`) | $C_OLD (\`claim_events\`) | $(ratio "$C_NEW" "$C_OLD") | $(list 4); $(list 6) |
| the deprecated wrapper, events/s | $C_WRAP (0.4's \`claim_events\`) | | $(ratio "$C_WRAP" "$C_OLD") | $(list 5) |
<!-- claim:end -->
MD
write_section claim "$OUT/section"
cat "$OUT/section"
