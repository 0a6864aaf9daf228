#!/usr/bin/env bash
# Citus for the distributed suites: built from source when missing, and a
# coordinator plus two workers on loopback ports, each a cluster of its own
# (scripts/cluster.sh's way: owned by postgres, 127.0.0.1 only).
#   scripts/citus.sh build            install Citus into PostgreSQL 15 (idempotent)
#   scripts/citus.sh start PORT DB    coordinator on PORT, workers on PORT+1, PORT+2;
#                                     DB on all three with citus (and pg_cron on the coordinator)
#   scripts/citus.sh stop|destroy
# CITUS_SRC is where the Citus source is: a directory holding a
# citus-*-src*.tar.gz and, for PostgreSQL 15.20, its patch (default below).
set -euo pipefail
cd "$(dirname "$0")/.."
B=/usr/lib/postgresql/15/bin
CITUS_SRC=${CITUS_SRC:-../shared/citus}
NODES=(citus-coord citus-w1 citus-w2)

build() {
    [ -f "$($B/pg_config --pkglibdir)/citus.so" ] && { echo "citus: installed"; return 0; }
    local tarball
    tarball=$(ls "$CITUS_SRC"/citus-*src*.tar.gz 2>/dev/null | head -1)
    [ -n "$tarball" ] || { echo "citus: no source tarball in CITUS_SRC=$CITUS_SRC" >&2; exit 1; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends autoconf flex \
        libcurl4-openssl-dev liblz4-dev libzstd-dev libkrb5-dev libssl-dev libicu-dev libselinux1-dev \
        libxslt1-dev libpam0g-dev libreadline-dev postgresql-server-dev-15 >/dev/null
    local dir
    dir=$(mktemp -d)
    tar -xzf "$tarball" -C "$dir"
    local src
    src=$(find "$dir" -maxdepth 2 -name configure -printf '%h\n' | head -1)
    # PostgreSQL 15.20 declares have_createdb_privilege() itself; Citus 13.2.2 too.
    if grep -q have_createdb_privilege "$($B/pg_config --includedir-server)/commands/dbcommands.h"; then
        for p in "$CITUS_SRC"/*have_createdb_privilege*.patch; do
            patch -d "$src" -p1 --forward -s <"$p"
        done
    fi
    (cd "$src" && ./configure -q PG_CONFIG=$B/pg_config >/dev/null && make -s -j2 >/dev/null && make -s install >/dev/null)
    rm -rf "$dir"
    echo "citus: built and installed"
}

start() {
    local port=$1 db=$2 i=0
    for n in "${NODES[@]}"; do
        local p=$((port + i)) d=$PWD/.pm/$n
        if [ ! -f "$d/data/PG_VERSION" ]; then
            install -d -o postgres -g postgres "$PWD/.pm" "$d"
            runuser -u postgres -- $B/initdb -D "$d/data" -U postgres --auth=trust --no-sync -E UTF8 --locale=C >/dev/null
            # Citus turns TLS on with a self-made X.509 v1 certificate when it
            # finds none; rustls (polar-meterd) refuses v1, as should anyone
            # deploying it. A v3 certificate, as a real deployment has.
            openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=127.0.0.1" \
                -addext "subjectAltName=IP:127.0.0.1" \
                -keyout "$d/data/server.key" -out "$d/data/server.crt" 2>/dev/null
            chown postgres:postgres "$d/data/server.key" "$d/data/server.crt"
            chmod 600 "$d/data/server.key"
            {
                echo "listen_addresses = '127.0.0.1'"
                echo "port = $p"
                echo "ssl = on"
                echo "unix_socket_directories = '$d'"
                if [ $i = 0 ]; then
                    echo "shared_preload_libraries = 'citus, pg_cron'"
                    echo "cron.database_name = '$db'"
                    echo "cron.use_background_workers = on"
                else
                    echo "shared_preload_libraries = 'citus'"
                fi
                # Keep two-phase-commit records (no periodic recovery), so a
                # test can count them: it proves recordings never needed one.
                echo "citus.recover_2pc_interval = -1"
                echo "max_connections = 300"
                echo "max_worker_processes = 32"
                echo "max_prepared_transactions = 100"
                echo "shared_buffers = 256MB"
                echo "fsync = off"
                echo "synchronous_commit = off"
                echo "full_page_writes = off"
                echo "log_min_messages = warning"
                echo "log_line_prefix = '%m [%p] %d %u '"
            } >>"$d/data/postgresql.conf"
        fi
        runuser -u postgres -- $B/pg_ctl -D "$d/data" status >/dev/null 2>&1 ||
            runuser -u postgres -- $B/pg_ctl -D "$d/data" -l "$d/log" -w -t 60 start >/dev/null
        i=$((i + 1))
    done
    local psql=(psql -h 127.0.0.1 -U postgres -X -q -v ON_ERROR_STOP=1)
    for i in 0 1 2; do
        "${psql[@]}" -p $((port + i)) -tAc "SELECT 1 FROM pg_database WHERE datname = '$db'" | grep -q 1 ||
            "${psql[@]}" -p $((port + i)) -c "CREATE DATABASE $db"
        "${psql[@]}" -p $((port + i)) -d "$db" -c "CREATE EXTENSION IF NOT EXISTS citus"
    done
    "${psql[@]}" -p "$port" -d "$db" -c "SELECT citus_set_coordinator_host('127.0.0.1', $port)" >/dev/null
    for i in 1 2; do
        "${psql[@]}" -p "$port" -d "$db" -tAc "SELECT 1 FROM pg_dist_node WHERE nodeport = $((port + i))" | grep -q 1 ||
            "${psql[@]}" -p "$port" -d "$db" -c "SELECT citus_add_node('127.0.0.1', $((port + i)))" >/dev/null
    done
    echo "citus: coordinator 127.0.0.1:$port, workers :$((port + 1)) :$((port + 2)), database $db"
}

case ${1:-} in
build) build ;;
start) start "$2" "$3" ;;
stop) for n in "${NODES[@]}"; do scripts/cluster.sh stop "$n"; done ;;
destroy) for n in "${NODES[@]}"; do scripts/cluster.sh destroy "$n"; done ;;
*) echo "usage: $0 build | start PORT DB | stop | destroy" >&2; exit 2 ;;
esac
