#!/usr/bin/env bash
# PostgreSQL 15 with pg_cron and polar_meter, on a plain Debian base (no
# official-image machinery). First start: initdb, the configuration, database
# polar_meter with both extensions, and the sidecar's least-privilege login.
# Every start: the extension updated to the installed version. Then postgres
# runs in the foreground as PID 1's child (exec), so signals stop it cleanly.
#   POSTGRES_PASSWORD[_FILE]      the superuser's password (required on first start)
#   POLAR_METERD_PASSWORD[_FILE]  polar_meterd's password (required on first start)
set -euo pipefail
PGBIN=/usr/lib/postgresql/15/bin
export PGDATA=${PGDATA:-/var/lib/postgresql/data}

secret() { # NAME: the value of NAME, or of the file named by NAME_FILE
    local file_var="$1_FILE"
    if [ -n "${!file_var:-}" ]; then cat "${!file_var}"; else printf '%s' "${!1:-}"; fi
}
sql_literal() { printf "'%s'" "${1//\'/\'\'}"; }

if [ "$(id -u)" = 0 ]; then
    install -d -o postgres -g postgres -m 700 "$PGDATA"
    install -d -o postgres -g postgres -m 2775 /var/run/postgresql
    exec setpriv --reuid=postgres --regid=postgres --init-groups "$0" "$@"
fi

local_psql() { psql -X -q -v ON_ERROR_STOP=1 -h /var/run/postgresql -U postgres "$@"; }
start_local() { "$PGBIN/pg_ctl" -D "$PGDATA" -w -t 60 -o "-c listen_addresses=''" start >/dev/null; }
stop_local() { "$PGBIN/pg_ctl" -D "$PGDATA" -w -m fast stop >/dev/null; }

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    su_pw=$(secret POSTGRES_PASSWORD)
    meterd_pw=$(secret POLAR_METERD_PASSWORD)
    [ -n "$su_pw" ] && [ -n "$meterd_pw" ] || {
        echo "first start: set POSTGRES_PASSWORD and POLAR_METERD_PASSWORD (or their _FILE forms)" >&2
        exit 1
    }
    "$PGBIN/initdb" -D "$PGDATA" -U postgres -E UTF8 --locale=C.UTF-8 --auth-local=peer --auth-host=scram-sha-256 >/dev/null
    echo "include = '/etc/polar-meter/postgresql.conf'" >>"$PGDATA/postgresql.conf"
    echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
    start_local
    local_psql -c "ALTER ROLE postgres PASSWORD $(sql_literal "$su_pw")" -c "CREATE DATABASE polar_meter"
    local_psql -d polar_meter -c "CREATE EXTENSION pg_cron" -c "CREATE EXTENSION polar_meter" \
        -c "CREATE ROLE polar_meterd LOGIN PASSWORD $(sql_literal "$meterd_pw") IN ROLE polar_meter_sidecar"
    stop_local
    echo "polar-meter: initialised $PGDATA (database polar_meter, login polar_meterd)"
fi

# An image with a newer polar_meter updates the database's copy.
start_local
local_psql -d polar_meter -c "ALTER EXTENSION polar_meter UPDATE"
stop_local

exec "$PGBIN/postgres" -D "$PGDATA" "$@"
