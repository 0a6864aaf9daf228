# Shared by the benchmark scripts (source it from the repository root).
B=/usr/lib/postgresql/15/bin

# write_section NAME FILE: replaces the <!-- NAME:start --> ... <!-- NAME:end -->
# block of BENCHMARKS.md with FILE (which carries both markers), or appends it.
write_section() {
    local name=$1 file=$2 tmp
    tmp=$(mktemp)
    if grep -q "<!-- $name:start -->" BENCHMARKS.md; then
        awk -v f="$file" -v s="<!-- $name:start -->" -v e="<!-- $name:end -->" \
            '$0 == s {while ((getline l < f) > 0) print l; skip = 1} $0 == e {skip = 0; next} !skip' BENCHMARKS.md >"$tmp"
        mv "$tmp" BENCHMARKS.md
    else
        cat "$file" >>BENCHMARKS.md
    fi
    echo "wrote BENCHMARKS.md ($name)"
}

# bench_build: optimised binaries and extension (thin LTO: a 2-core machine).
bench_build() {
    scripts/deps.sh
    command -v wrk >/dev/null || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q wrk; }
    cargo build -q -p polar-meterd -p polar-emulator --profile perf
    cargo pgrx install -p polar_meter --profile perf --pg-config $B/pg_config >/dev/null
}

# bench_cluster NAME PORT DB: a fresh durable cluster (fsync and synchronous
# commit on, pg_cron pointed at DB) with DB holding pg_cron and polar_meter,
# and a sidecar login role NAME_meterd. Sets PSQL to run SQL in DB.
bench_cluster() {
    local name=$1 port=$2 db=$3
    scripts/cluster.sh destroy "$name"
    scripts/cluster.sh start "$name" "$port" "$db" durable
    psql -h 127.0.0.1 -p "$port" -U postgres -X -q -c "CREATE DATABASE $db"
    PSQL=(psql -h 127.0.0.1 -p "$port" -U postgres -X -q -v ON_ERROR_STOP=1 -d "$db")
    "${PSQL[@]}" -c "CREATE EXTENSION pg_cron" -c "CREATE EXTENSION polar_meter" \
        -c "CREATE ROLE ${name}_meterd LOGIN IN ROLE polar_meter_sidecar" 2>/dev/null
}

# bench_acme_key: organization 'acme' with pg_cron's jobs off (nothing but
# the benchmark runs); prints a fence:meter key of it.
bench_acme_key() {
    "${PSQL[@]}" -c "SELECT meter.upsert_organization('acme', 'Acme', 'billing@acme.example')" \
        -c "SELECT cron.unschedule(jobid) FROM cron.job" >/dev/null
    "${PSQL[@]}" -tAc "SELECT key FROM meter.create_api_key('acme', 'bench')"
}

# wait_http URL: until it answers 2xx (30 s at most).
wait_http() {
    for _ in $(seq 300); do curl -fs -o /dev/null "$1" && return 0; sleep 0.1; done
    echo "$1 did not come up" >&2
    return 1
}

# secs_since T0: seconds since a `date +%s.%N` stamp, one decimal.
secs_since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}'; }

# median of the numbers on stdin.
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

# pct P: the P-th percentile (ms) of microsecond latencies on stdin.
pct() { sort -n | awk -v p="$1" '{a[NR]=$1} END {i=int(NR*p/100); if (i<1) i=1; printf "%.2f", a[i]/1000}'; }

# to_ms: wrk's latency (850us, 1.2ms, 2s) in milliseconds.
to_ms() { awk '{v=$1; if (v ~ /us$/) {sub(/us/,"",v); v/=1000} else if (v ~ /ms$/) {sub(/ms/,"",v)} else if (v ~ /s$/) {sub(/s/,"",v); v*=1000}; printf "%.2f", v}'; }

# rss_mib PID: the process's peak resident set (VmHWM), MiB.
rss_mib() { awk '/VmHWM/{printf "%.1f", $2/1024}' "/proc/$1/status"; }
