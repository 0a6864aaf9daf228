#!/usr/bin/env bash
# The pg_regress goldens: each sql/<name>.sql is run by psql against a fresh
# database cloned from TEMPLATE and its output compared with
# expected/<name>.out. schedules runs in CRON_DB (where pg_cron lives), in a
# transaction it rolls back.
#   usage: run.sh PORT TEMPLATE CRON_DB [--accept]
# --accept copies the results over the expected files (after a deliberate
# change of an answer; review the diff before committing it).
set -euo pipefail
PORT=$1 TEMPLATE=$2 CRON_DB=$3
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../../.." && pwd)
OUT=$ROOT/target/regress
B=/usr/lib/postgresql/15/bin
REGRESS=$(dirname "$("$B/pg_config" --pgxs)")/../test/regress/pg_regress
PSQL=(psql -h 127.0.0.1 -p "$PORT" -U postgres -X -q -v ON_ERROR_STOP=1)
"${PSQL[@]}" -c "DROP DATABASE IF EXISTS pm_regress" -c "CREATE DATABASE pm_regress TEMPLATE $TEMPLATE"
rm -rf "$OUT"
mkdir -p "$OUT"
cd "$HERE"   # \i common/setup.sql is relative to here
status=0
run() {
    local db=$1
    shift
    "$REGRESS" --use-existing --bindir="$B" --host=127.0.0.1 --port="$PORT" --user=postgres \
        --dbname="$db" --inputdir=. --outputdir="$OUT" "$@" || status=1
}
run pm_regress pure keys events audit
run "$CRON_DB" schedules
if [ "${4:-}" = --accept ]; then
    cp "$OUT"/results/*.out expected/
    exit 0
fi
[ $status -eq 0 ] || cat "$OUT"/regression.diffs 2>/dev/null
exit $status
