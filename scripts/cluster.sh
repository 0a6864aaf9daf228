#!/usr/bin/env bash
# A throwaway PostgreSQL 15 cluster owned by `postgres` (PostgreSQL refuses
# root), listening on 127.0.0.1 only, with pg_cron preloaded.
#   scripts/cluster.sh start NAME PORT CRON_DB [durable]
#   scripts/cluster.sh stop NAME
#   scripts/cluster.sh log NAME
# Data lives in .pm/NAME. Non-durable clusters (tests) run with fsync off;
# `durable` keeps PostgreSQL's defaults (benchmarks, make up).
set -euo pipefail
cd "$(dirname "$0")/.."
B=/usr/lib/postgresql/15/bin
cmd=$1 name=$2
D=$PWD/.pm/$name
as_pg() { runuser -u postgres -- "$@"; }

case $cmd in
start)
    port=$3 cron_db=$4 mode=${5:-fast}
    install -d -o postgres -g postgres "$PWD/.pm" "$D"
    chmod 755 "$PWD/.pm"
    if [ ! -f "$D/data/PG_VERSION" ]; then
        as_pg $B/initdb -D "$D/data" -U postgres --auth=trust --no-sync -E UTF8 --locale=C >"$D/initdb.log"
        {
            echo "listen_addresses = '127.0.0.1'"
            echo "port = $port"
            echo "unix_socket_directories = '$D'"
            echo "shared_preload_libraries = 'pg_cron'"
            echo "cron.database_name = '$cron_db'"
            echo "cron.use_background_workers = on"
            echo "max_worker_processes = 32"
            echo "max_connections = 300"
            echo "shared_buffers = 512MB"
            echo "log_min_messages = warning"
            echo "log_line_prefix = '%m [%p] %d %u '"
            if [ "$mode" != durable ]; then
                echo "fsync = off"
                echo "synchronous_commit = off"
                echo "full_page_writes = off"
            fi
        } >>"$D/data/postgresql.conf"
    fi
    if ! as_pg $B/pg_ctl -D "$D/data" status >/dev/null 2>&1; then
        as_pg $B/pg_ctl -D "$D/data" -l "$D/log" -w -t 60 start >/dev/null
    fi
    ;;
stop)
    if [ -f "$D/data/PG_VERSION" ] && as_pg $B/pg_ctl -D "$D/data" status >/dev/null 2>&1; then
        as_pg $B/pg_ctl -D "$D/data" -m fast -w stop >/dev/null
    fi
    ;;
destroy)
    "$0" stop "$name"
    rm -rf "$D"
    ;;
log)
    tail -n 60 "$D/log" 2>/dev/null || true
    ;;
*)
    echo "usage: $0 start|stop|destroy|log NAME ..." >&2
    exit 2
    ;;
esac
