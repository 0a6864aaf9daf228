#!/usr/bin/env bash
# Each isolation spec must fail when the behaviour it proves is broken: for
# each, a copy of the database gets one function rewritten without that
# behaviour, and the spec is run against it, expecting a failure.
#   usage: mutations.sh <port> <template database>
set -euo pipefail
cd "$(dirname "$0")"
PORT=$1 TEMPLATE=$2
B=/usr/lib/postgresql/15/bin
ISOLATION=$(dirname "$("$B/pg_config" --pgxs)")/../test/isolation/pg_isolation_regress
export PGOPTIONS="-c client_min_messages=warning"
PSQL=(psql -h 127.0.0.1 -p "$PORT" -U postgres -X -q -v ON_ERROR_STOP=1)
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"; "${PSQL[@]}" -c "DROP DATABASE IF EXISTS pm_mutant" >/dev/null 2>&1' EXIT

# spec | function | sed expression that removes the behaviour
mutants=(
  "events_idempotent_race|meter._record_batch(text,uuid,jsonb)|s/ON CONFLICT ON CONSTRAINT meter_event_organization_id_idempotency_key_key DO NOTHING//"
  "outbox_claims|meter.claim_delivery(text,int,interval)|s/FOR UPDATE SKIP LOCKED/FOR UPDATE/"
  "outbox_held|meter._held(text,uuid,uuid[])|s/ AND e.batch_id = _held.batch_id//"
  "keys_revoke_verify|meter._verify_api_key(text,text)|s/IF r.revoked_at IS NOT NULL THEN/IF false THEN/"
  "audit_sealer_writers|meter.seal_audit_chain(text,int)|s/WHERE a.organization_id = org_id AND a.row_hash IS NULL/& AND a.id > coalesce((SELECT max(z.id) FROM meter.audit_log z WHERE z.organization_id = org_id AND z.row_hash IS NOT NULL), 0)/"
)
for m in "${mutants[@]}"; do
    IFS='|' read -r spec fn expr <<<"$m"
    "${PSQL[@]}" -c "DROP DATABASE IF EXISTS pm_mutant" -c "CREATE DATABASE pm_mutant TEMPLATE $TEMPLATE" >/dev/null
    original=$("${PSQL[@]}" -d pm_mutant -At -c "SELECT pg_get_functiondef('$fn'::regprocedure)")
    mutant=$(sed "$expr" <<<"$original")
    if [ "$mutant" = "$original" ]; then
        echo "mutation of $fn for $spec no longer applies: update $0" >&2
        exit 1
    fi
    "${PSQL[@]}" -d pm_mutant <<<"$mutant" >/dev/null
    if "$ISOLATION" --use-existing --bindir=$B --host=127.0.0.1 --port="$PORT" --user=postgres \
        --dbname=pm_mutant --inputdir=. --outputdir="$OUT" "$spec" >/dev/null 2>&1; then
        echo "$spec passed with $fn broken: it proves nothing" >&2
        exit 1
    fi
    echo "$spec fails with $fn broken, as it must"
done
